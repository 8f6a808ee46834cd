"""Where a family was verified: some pass the conformance suite on transformers 5.x but not on
4.5x (a different module layout, or generate() and a plain loop disagree there). Their
positions factory is wrapped so that ``apply_press`` refuses them on the older release,
naming why, instead of running them unverified."""

import transformers

import kvpress_lite as kvl

MAJOR = int(transformers.__version__.split(".")[0])


def from_transformers_5(factory, model_types, why):
    """``factory`` unchanged on transformers >= 5; on 4.x a refusal for ``model_types``."""

    def positions(model):
        if MAJOR < 5 and model.config.model_type in model_types:
            raise kvl.UnsupportedModelError(
                f"{model.config.model_type} is verified on transformers >= 5 only ({why} on "
                f"{transformers.__version__}); upgrade transformers to use the press on it"
            )
        return factory(model)

    return positions
