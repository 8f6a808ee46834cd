"""What an adapter tells the press about one model family.

An :class:`Adapter` is data plus two small functions: how to recognise a model of the
family, where its attention modules sit (a dotted path from ``model.base_model`` with
``*`` for "every layer"), which keyword carries the cache into them (read off the live
``forward`` signature, so renames between transformers releases do not matter), and how
the family encodes positions (:class:`Rope` or :class:`LearnedPositions`).

Example: the whole Llama adapter::

    Adapter(name="llama", model_types=("llama",), attention_path="layers.*.self_attn",
            positions=rope_positions())
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Union

import torch
from torch import nn

from .errors import UnsupportedModelError

# Cache keyword names used by transformers' attention modules across releases:
# `past_key_value` (4.4x), `past_key_values` (4.5x-5.x), `cache` (later 5.x), `layer_past` (GPT-NeoX, GPT-2 of old).
DEFAULT_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")

# RoPE variants whose frequencies do not depend on sequence length: a rotation by `shift`
# positions is then the same at every point of the stream, which the sink shift relies on.
SHIFTABLE_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class Rope:
    """Rotary position embedding: ``inv_freq`` holds ``rotary_dims / 2`` frequencies.

    ``rotary_dims`` may be smaller than the head size (GPT-NeoX rotates a quarter of each
    head); ``interleaved`` selects GPT-J style pairs instead of ``rotate_half`` halves.
    """

    inv_freq: torch.Tensor
    interleaved: bool = False

    @property
    def rotary_dims(self) -> int:
        return 2 * self.inv_freq.numel()


@dataclass(frozen=True)
class LearnedPositions:
    """Learned absolute position embeddings (GPT-2's ``wpe``) with ``max_positions`` rows."""

    max_positions: int


PositionScheme = Union[Rope, LearnedPositions]


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
        ``model -> Rope | LearnedPositions``; see :func:`rope_positions` and
        :func:`learned_positions`. It may raise :class:`UnsupportedModelError`.
    cache_kwargs:
        Candidate names of the keyword carrying the cache into the attention module; the
        first one found in the module's ``forward`` signature is used.

    Example
    -------
    >>> Adapter(name="qwen2", model_types=("qwen2",), attention_path="layers.*.self_attn",
    ...         positions=rope_positions()).name
    'qwen2'
    """

    name: str
    model_types: tuple[str, ...]
    attention_path: str
    positions: Callable[[nn.Module], PositionScheme]
    cache_kwargs: tuple[str, ...] = DEFAULT_CACHE_KWARGS
    description: str = field(default="", compare=False)

    def matches(self, model: nn.Module) -> bool:
        """True when ``model``'s ``config.model_type`` is one of :attr:`model_types`."""
        config = getattr(model, "config", None)
        return getattr(config, "model_type", None) in self.model_types

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


def base_model(model: nn.Module) -> nn.Module:
    """The decoder without its head (``model.model`` of a Llama, ``model.transformer`` of GPT-2)."""
    return getattr(model, "base_model", model)


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


def rope_type(config) -> str:
    """The RoPE variant named by a config, across transformers' two spellings."""
    for attr in ("rope_parameters", "rope_scaling"):
        params = getattr(config, attr, None)
        if isinstance(params, dict):
            # 5.x may nest per-layer-type parameters: {"full_attention": {...}, ...}
            if "rope_type" not in params and "type" not in params and params:
                inner = next(iter(params.values()))
                params = inner if isinstance(inner, dict) else params
            kind = params.get("rope_type", params.get("type"))
            if kind:
                return str(kind)
    return "default"


def rope_positions(rotary_attr: str = "rotary_emb", interleaved: bool = False) -> Callable[[nn.Module], Rope]:
    """A ``positions`` function for RoPE families whose base model holds a rotary module.

    The frequencies are read off the model's own rotary module (``inv_freq``), so scaled
    variants whose frequencies are fixed (linear, llama3, yarn) come out right. Variants
    that change with the sequence length (``dynamic``, ``longrope``) are refused, because
    the press relies on a rotation by ``n`` positions meaning the same everywhere.
    """

    def positions(model: nn.Module) -> Rope:
        kind = rope_type(model.config)
        if kind not in SHIFTABLE_ROPE_TYPES:
            raise UnsupportedModelError(
                f"RoPE type {kind!r} of {type(model).__name__} is not supported: its frequencies depend on the "
                f"sequence length, so a cache cannot be re-positioned cheaply. Supported: {SHIFTABLE_ROPE_TYPES}. "
                "Use position_shift=False to keep absolute positions instead."
            )
        rotary = getattr(base_model(model), rotary_attr, None)
        inv_freq = getattr(rotary, "inv_freq", None)
        if not isinstance(inv_freq, torch.Tensor):
            raise UnsupportedModelError(
                f"{type(model).__name__}: no rotary module with `inv_freq` at base_model.{rotary_attr}"
            )
        return Rope(inv_freq=inv_freq.detach().to(torch.float64).flatten(), interleaved=interleaved)

    return positions


def learned_positions(max_positions_attr: str = "n_positions") -> Callable[[nn.Module], LearnedPositions]:
    """A ``positions`` function for families with a learned absolute position table."""

    def positions(model: nn.Module) -> LearnedPositions:
        return LearnedPositions(max_positions=int(getattr(model.config, max_positions_attr)))

    return positions
