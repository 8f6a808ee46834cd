"""Composite causal LMs (multimodal wrappers): the press serves the language model inside.

Gemma 3 4B+, Gemma 4, Gemma 3n, GOT-OCR2, Fuyu, ... load as a wrapper whose ``model`` holds
a vision or audio tower and a text decoder (``get_decoder()``), with the text config at
``config.get_text_config()``. An adapter knows the *text* family; :func:`text_view` hands it
a view of the wrapper in which ``config`` is the text config and ``base_model`` the text
decoder, so where the attention modules are, how positions work and what cache layers the
model builds are read exactly as for the stand-alone text model.

The press's call hooks stay on the wrapper's own base model (``Gemma3Model``): it sees the
user's ``input_ids`` and 2D mask, hands position_ids within the cache, and the wrapper
builds its masks from the cache as the text model does. Image / audio inputs are refused at
the call (:func:`multimodal_inputs`): the wrapper treats them specially (Gemma 3 attends
bidirectionally inside an image block, and an eviction could cut through one), and that is
not verified yet.

>>> view = text_view(model)            # doctest: +SKIP
>>> view.config.model_type             # doctest: +SKIP
'gemma3_text'
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

# kwargs through which a wrapper takes images, video or audio (a call carrying one is refused)
MEDIA_PREFIXES = ("pixel_values", "image_", "video", "audio_", "input_features", "input_audio", "patch_")
# token-type ids that mark media tokens when non-zero (Gemma 3's bidirectional image blocks)
MEDIA_TYPE_IDS = ("token_type_ids", "mm_token_type_ids")


class TextView:
    """The text language model inside a composite causal LM, as an adapter sees it.

    ``config`` is the text config, ``base_model`` the text decoder; every other attribute is
    the wrapper's. Not a module: hooks go on the real modules it points at."""

    def __init__(self, wrapper: nn.Module, config: Any, decoder: nn.Module) -> None:
        self.wrapper, self.config, self.base_model = wrapper, config, decoder

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["wrapper"], name)


def text_view(model: nn.Module) -> Optional[TextView]:
    """A :class:`TextView` of ``model`` when it is a composite causal LM (a text sub-config and a
    text decoder other than itself and its base model), else None."""
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    text = get_text() if callable(get_text) else None
    if text is None or text is config or getattr(text, "model_type", None) == getattr(config, "model_type", None):
        return None
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    outer = getattr(model, "base_model", model)
    if not isinstance(decoder, nn.Module) or decoder is model or decoder is outer:
        return None
    return TextView(model, text, decoder)


def multimodal_inputs(kwargs: dict) -> list[str]:
    """Names of the image / video / audio inputs this call carries (empty for a text-only call)."""
    found = [name for name, value in kwargs.items()
             if value is not None and name.startswith(MEDIA_PREFIXES) and isinstance(value, (torch.Tensor, list, tuple))]
    for name in MEDIA_TYPE_IDS:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and bool((value != 0).any()):
            found.append(name)
    return found
