"""What an adapter tells the press about one model family.

An :class:`Adapter` is data plus two small functions: how to recognise a model of the
family, where its attention modules sit (a dotted path from ``model.base_model`` with
``*`` for "every layer"), which keyword carries the cache into them (read off the live
``forward`` signature, so renames between transformers releases do not matter), and how
the family encodes positions (a factory returning a
:class:`~kvpress_lite.positions.PositionScheme`). A :class:`Refusal` names model types the
press must not serve, with the reason, so ``apply_press`` can say why.

Example: the whole Llama adapter::

    Adapter(name="llama", model_types=("llama",), attention_path="layers.*.self_attn",
            positions=rope_positions())
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from torch import nn

from .cache_access import base_model  # noqa: F401 - adapters import it from here
from .errors import UnsupportedModelError
from .positions import SchemeFactory

# Cache keyword names used by transformers' attention modules across releases:
# `past_key_value` (4.4x), `past_key_values` (4.5x-5.x), `cache` (later 5.x), `layer_past` (GPT-NeoX, GPT-2 of old).
DEFAULT_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


@dataclass(frozen=True)
class Adapter:
    """Describes one model family to the press.

    Parameters
    ----------
    name:
        Unique adapter name (``apply_press(model, adapter=name)`` forces it).
    model_types:
        ``config.model_type`` values this adapter recognises.
    attention_path:
        Dotted path from ``model.base_model`` to the attention modules, ``*`` standing
        for every index of a module list: ``"layers.*.self_attn"``.
    positions:
        ``model -> PositionScheme``: :func:`~kvpress_lite.rope_positions`,
        :func:`~kvpress_lite.learned_positions`, :func:`~kvpress_lite.alibi_positions`, ...
        or a plugin's own. It may raise :class:`UnsupportedModelError`.
    cache_kwargs:
        Candidate names of the keyword carrying the cache into the attention module; the
        first one found in the module's ``forward`` signature is used.
    decoder_path:
        Dotted path from ``model.base_model`` to the module that takes the tokens, the
        cache and ``position_ids`` (where the press's call hooks go). Default ``""``: the
        base model itself. OPT's causal LM calls ``model.decoder`` directly: ``"decoder"``.
    position_module:
        Dotted path from ``model.base_model`` to the module that turns positions into
        embeddings, for families whose decoder takes no ``position_ids`` and counts positions
        from the cache length itself (the decoders of BART, Marian, Pegasus, Whisper, ...):
        the press hands its positions to that module's ``position_ids`` keyword instead.
        Default ``""``: the positions go to the decoder.

    Example
    -------
    >>> from kvpress_lite import rope_positions
    >>> Adapter(name="qwen2", model_types=("qwen2",), attention_path="layers.*.self_attn",
    ...         positions=rope_positions()).name
    'qwen2'
    """

    name: str
    model_types: tuple[str, ...]
    attention_path: str
    positions: SchemeFactory
    cache_kwargs: tuple[str, ...] = DEFAULT_CACHE_KWARGS
    description: str = field(default="", compare=False)
    decoder_path: str = ""
    position_module: str = ""

    def matches(self, model: nn.Module) -> bool:
        """True when ``model``'s ``config.model_type`` is one of :attr:`model_types`."""
        config = getattr(model, "config", None)
        return getattr(config, "model_type", None) in self.model_types

    def decoder(self, model: nn.Module) -> nn.Module:
        """The module whose calls the press intercepts (see :attr:`decoder_path`)."""
        if not self.decoder_path:
            return base_model(model)
        found = _walk(base_model(model), self.decoder_path.split("."))
        if len(found) != 1:
            raise UnsupportedModelError(
                f"adapter {self.name!r} found no single decoder module at {self.decoder_path!r} in "
                f"{type(model).__name__}"
            )
        return found[0]

    def positions_module(self, model: nn.Module) -> nn.Module | None:
        """The module that takes the press's ``position_ids`` (see :attr:`position_module`), or None."""
        if not self.position_module:
            return None
        found = _walk(base_model(model), self.position_module.split("."))
        if len(found) != 1 or "position_ids" not in inspect.signature(found[0].forward).parameters:
            raise UnsupportedModelError(
                f"adapter {self.name!r} found no single module taking position_ids at {self.position_module!r} in "
                f"{type(model).__name__}; the adapter needs updating for this transformers release."
            )
        return found[0]

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """The attention modules in layer order, found by walking :attr:`attention_path`."""
        found = _walk(base_model(model), self.attention_path.split("."))
        if not found:
            raise UnsupportedModelError(
                f"adapter {self.name!r} found no attention modules at {self.attention_path!r} "
                f"in {type(model).__name__}"
            )
        return found

    def cache_kwarg(self, attention: nn.Module) -> str:
        """The keyword through which ``attention.forward`` receives the cache."""
        params = inspect.signature(attention.forward).parameters
        for name in self.cache_kwargs:
            if name in params:
                return name
        raise UnsupportedModelError(
            f"adapter {self.name!r}: {type(attention).__name__}.forward takes none of the cache keywords "
            f"{self.cache_kwargs}; its parameters are {list(params)}. The adapter needs updating for this "
            "transformers release."
        )


def _walk(module: nn.Module, parts: list[str]) -> list[nn.Module]:
    if not parts:
        return [module]
    head, rest = parts[0], parts[1:]
    if head == "*":
        return [m for child in module.children() for m in _walk(child, rest)] if isinstance(
            module, (nn.ModuleList, nn.Sequential)
        ) else []
    child = getattr(module, head, None)
    return _walk(child, rest) if isinstance(child, nn.Module) else []


@dataclass(frozen=True)
class Refusal:
    """Model types the press must not serve, and why (shown by ``apply_press`` and
    ``kvpress-lite adapters --all``).

    >>> Refusal(model_types=("mamba",), reason="no attention KV cache to press").reason
    'no attention KV cache to press'
    """

    model_types: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class Wrapper:
    """Composite causal-LM types (multimodal wrappers) the press serves through their text model:
    ``apply_press`` reads the wrapper's text config and language model (``get_decoder()``) with
    the text family's adapter (see :mod:`kvpress_lite.wrappers`). Declared per type, once the
    conformance suite has proven the wrapper tiny; a type whose text model is refused is refused
    with that reason.

    >>> Wrapper(model_types=("gemma3",), description="Gemma 3 4B+ (vision)").model_types
    ('gemma3',)
    >>> Wrapper(model_types=("got_ocr2",), media=True).media
    True
    """

    model_types: tuple[str, ...]
    description: str = ""
    #: True where the wrapper's media tokens are ordinary causal cache entries (no bidirectional
    #: image block, no special mask: GOT-OCR2): calls carrying images are then served, as long as
    #: each such call fits in the cache in one piece; False: media calls are refused
    media: bool = False
