"""Position schemes: how a family encodes positions, told to the press through one protocol.

StreamingLLM assigns positions *within the cache*: the kept tokens relate as if they sat at
0..L-1 contiguously. What that takes depends on how the family encodes positions, and that
is all a :class:`PositionScheme` says. The press calls four methods, never asks which
class it holds, so a plugin may bring its own scheme:

``check(model, capacity=..., position_shift=...)``
    At ``apply_press``: raise :class:`UnsupportedModelError` naming the config field or
    module at fault and what to do. Nothing is refused later, at a forward.
``position_ids(stream_positions, capacity=..., position_shift=...)``
    The positions handed to the model for the new tokens, from their positions in the
    stream (``[batch, q]``, already minus any rebase offset).
``after_trim(keys, trim)``
    Called once per layer after entries were dropped, with that layer's kept keys
    (``[batch, kv_heads, kept, head_dim]``, sinks first): adjust what the kept entries
    carry (RoPE rotates the sinks forward by the number of evicted tokens).
``rebase_step(stream_length, capacity)`` / ``rebase(keys, layer_idx, step)``
    For schemes whose positions grow without bound: how far to move every stored key back
    so positions stay small (0: never), and doing it to one layer.
``ordered_cache``
    True when the model reads positions off the order of the cache entries (ALiBi): the
    press then keeps them in stream order rather than overwriting the oldest slot.

Built-in schemes: :class:`Rotary` (rotate-half or interleaved pairs, full or partial, a
different base per layer, a rotary slice anywhere in the head), :class:`AbsoluteEmbedding`
(learned or sinusoidal tables added to the input: GPT-2, OPT, XGLM) and :class:`Alibi`
(BLOOM, MPT, Falcon: the bias follows key distance in the cache). Adapters name theirs with
the factories :func:`rope_positions`, :func:`learned_positions`,
:func:`sinusoidal_positions` and :func:`alibi_positions`.

Example: what a scheme hands the model::

    >>> import torch
    >>> scheme = AbsoluteEmbedding(max_positions=8, description="learned")
    >>> scheme.position_ids(torch.tensor([[20]]), capacity=8, position_shift=True).tolist()
    [[7]]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from .cache_access import RECURRENT_LAYER_TYPES, base_model
from .core import rope_phase, rope_rotate, to_rotary_pairs, write_rotated
from .errors import UnsupportedModelError

# RoPE variants whose frequencies do not depend on sequence length: a rotation by `shift`
# positions is then the same at every point of the stream, which the sink shift relies on.
SHIFTABLE_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")

Shift = Union[int, torch.Tensor]  # one count for the whole batch, or one per row ([batch])


@dataclass
class Trim:
    """What one trim did, as a scheme's :meth:`PositionScheme.after_trim` sees it.

    ``sink_shift``: tokens evicted so far in the stream (minus the rebase offset), i.e. how
    far the sinks must move to sit next to the window; ``state``: a dict the scheme may keep
    per stream and layer; ``shared``: a dict shared by every layer of one call (to compute a
    phase once per step); ``new_sinks``: ``[batch, n_sink]`` bool, the sink slots that took
    a new entry in this trim (a padded row whose real tokens arrive after its first trim),
    None when the sinks stayed where they were.
    """

    layer_idx: int
    n_sink: int
    sink_shift: Shift
    state: dict
    shared: dict
    new_sinks: Optional[torch.Tensor] = None


class PositionScheme:
    """The protocol every position scheme follows; this base hands positions through and
    does nothing to kept entries (right for a family whose keys carry no position).

    Subclass it in a plugin and override what your family needs; see the module docstring.
    """

    description: str = "no positions in the keys"
    #: positions the model can be handed at most (a learned table's rows), None: unbounded
    max_positions: Optional[int] = None
    #: True when the model reads positions off the order of the cache entries (ALiBi builds its
    #: bias from their index): the press then keeps them in stream order instead of as a ring
    ordered_cache: bool = False
    #: which slot of a cache layer carries the positions :meth:`after_trim` and :meth:`rebase` move:
    #: "keys", or "values" for multi-head latent attention (DeepSeek V2/V3 store the position-free
    #: latent as the keys and the rotated shared key part as the values)
    rotary_slot: str = "keys"

    def check(self, model: nn.Module, *, capacity: Optional[int], position_shift: bool) -> None:
        """Raise :class:`UnsupportedModelError` if the press cannot serve ``model`` this way."""

    def position_ids(self, stream_positions: torch.Tensor, *, capacity: int, position_shift: bool) -> torch.Tensor:
        """Positions ``[batch, q]`` to hand the model for this call's tokens."""
        return stream_positions

    def after_trim(self, keys: torch.Tensor, trim: Trim) -> None:
        """Adjust the kept keys of one layer in place after entries were dropped."""

    def rebase_step(self, stream_length: int, capacity: int) -> int:
        """How many positions to move every stored key back before this call (0: none).
        ``stream_length``: the stream position the next token would get."""
        return 0

    def rebase(self, keys: torch.Tensor, layer_idx: int, step: int) -> None:
        """Move the stored keys of one layer back by ``step`` positions, in place."""
        raise NotImplementedError(f"{type(self).__name__} does not rebase")

    def static_unsupported(self) -> Optional[str]:
        """Why the static-shape (compiled) cache cannot serve this scheme, or None when it can."""
        return None

    def static_rotary(self, layer_idx: int) -> Optional[tuple]:
        """For the static cache: ``(rotary_start, rotary_dims, interleaved, inv_freq)`` of a layer
        whose sinks must be re-rotated, or None."""
        return None



@dataclass
class Rotary(PositionScheme):
    """Rotary position embedding (RoPE).

    ``inv_freq``: ``[rotary_dims/2]`` frequencies, or one such tensor per layer (Gemma 3's
    local and global bases). ``interleaved``: adjacent pairs (GPT-J, GLM, Cohere) instead of
    ``rotate_half`` halves. ``rotary_start``: where the rotary features begin in a head (0
    for Llama and GPT-NeoX's partial rotary; the end of the head for latent attention).

    Positions: the query keeps its stream position and so do the window keys (their
    distances are those of the text); the sinks are rotated forward by the number of evicted
    tokens, from a pristine complex128 copy, so the query sees positions 0..L-1.
    """

    inv_freq: Union[torch.Tensor, Sequence[torch.Tensor]]
    interleaved: bool = False
    rotary_start: int = 0
    rope_type: str = "default"
    rebase_period: int = 2**15
    description: str = ""
    position_table: Optional[int] = None  # rows of a precomputed sin/cos table the model reads (GPT-J)
    rotary_slot: str = "keys"  # "values": latent attention's rotated key part (see PositionScheme)

    def __post_init__(self) -> None:
        if not self.description:
            layout = "interleaved pairs" if self.interleaved else "rotate-half"
            where = ", in the value slot (latent attention)" if self.rotary_slot == "values" else ""
            self.description = f"RoPE ({layout}, {self.rotary_dims(0)} rotary dims{where})"

    def _freq(self, layer_idx: int) -> torch.Tensor:
        if isinstance(self.inv_freq, torch.Tensor):
            return self.inv_freq
        return self.inv_freq[layer_idx]

    def rotary_dims(self, layer_idx: int) -> int:
        return 2 * self._freq(layer_idx).numel()

    def check(self, model: nn.Module, *, capacity: Optional[int], position_shift: bool) -> None:
        if position_shift and self.rope_type not in SHIFTABLE_ROPE_TYPES:
            raise UnsupportedModelError(
                f"RoPE type {self.rope_type!r} of {type(model).__name__} (config.rope_parameters / rope_scaling) is not "
                "supported with position_shift=True: its frequencies depend on the sequence length, so a cache cannot "
                f"be re-positioned by a fixed rotation. Supported: {SHIFTABLE_ROPE_TYPES}. Use position_shift=False "
                "to keep absolute positions instead."
            )
        if capacity is not None:
            self.rebase_period = max(self.rebase_period, 4 * capacity)
        if self.position_table is not None and capacity is not None:
            # positions handed stay below rebase_period + one call (at most `capacity` tokens)
            if 2 * capacity >= self.position_table:
                raise ValueError(
                    f"capacity={capacity} is too large for the {self.position_table}-row rotary table of "
                    f"{type(model).__name__}: the press re-bases positions to stay inside the table, which needs "
                    f"capacity < {self.position_table // 2}."
                )
            self.rebase_period = min(self.rebase_period, self.position_table - capacity)

    def after_trim(self, keys: torch.Tensor, trim: Trim) -> None:
        if not trim.n_sink:
            return
        start, dims = self.rotary_start, self.rotary_dims(trim.layer_idx)
        sinks = keys[..., : trim.n_sink, start : start + dims]
        if "sink_pairs" not in trim.state:  # first trim: the sinks still carry their original rotation
            trim.state["sink_pairs"] = to_rotary_pairs(sinks, dims, self.interleaved)
        elif trim.new_sinks is not None:  # entries new to the sinks come unrotated from the window
            fresh = to_rotary_pairs(sinks, dims, self.interleaved)
            new = trim.new_sinks.to(keys.device).view(*trim.new_sinks.shape[:1], 1, -1, 1)
            trim.state["sink_pairs"] = torch.where(new, fresh, trim.state["sink_pairs"])
        freq = self._freq(trim.layer_idx)
        key = ("phase", id(freq))
        if key not in trim.shared:  # one phase per distinct base, shared by its layers
            trim.shared[key] = rope_phase(trim.sink_shift, freq).to(keys.device)
        write_rotated(sinks, trim.state["sink_pairs"], trim.shared[key], self.interleaved)

    def static_unsupported(self) -> Optional[str]:
        if self.rotary_slot != "keys":
            return ("its rotary key part is stored in the cache's value slot (latent attention), which the static "
                    "cache does not re-rotate; use the eager press")
        return super().static_unsupported()

    def static_rotary(self, layer_idx: int) -> Optional[tuple]:
        dims = self.rotary_dims(layer_idx)
        return (self.rotary_start, dims, self.interleaved, self._freq(layer_idx)) if dims else None

    def rebase_step(self, stream_length: int, capacity: int) -> int:
        # float32 angles lose precision as positions grow (0.06 rad of spacing at 1e6): once past
        # the period, move everything back so the oldest kept window entry sits at `capacity`
        return stream_length - capacity if stream_length >= self.rebase_period else 0

    def rebase(self, keys: torch.Tensor, layer_idx: int, step: int) -> None:
        start, dims = self.rotary_start, self.rotary_dims(layer_idx)
        part = keys[..., start : start + dims]
        part.copy_(rope_rotate(part, -step, self._freq(layer_idx), dims, self.interleaved))


@dataclass
class AbsoluteEmbedding(PositionScheme):
    """An absolute position table added to the input (GPT-2's learned ``wpe``, OPT's learned
    table with its offset of 2, XGLM's sinusoids). Cached keys keep the position they were
    made with; with the shift a new token gets the cache slot it lands in (at most
    ``capacity - 1``), so the stream never leaves the table however long it runs.
    ``max_positions``: rows in the table (None: unbounded, e.g. sinusoids); ``offset``: the row
    of position 0, for tables the model indexes with the positions it is handed as they are
    (RoBERTa's start at ``padding_idx + 1``; ``max_positions`` then counts the rows from there)."""

    max_positions: Optional[int] = None
    description: str = "absolute position embedding"
    offset: int = 0

    def check(self, model: nn.Module, *, capacity: Optional[int], position_shift: bool) -> None:
        if position_shift and capacity is not None and self.max_positions is not None and capacity > self.max_positions:
            raise ValueError(
                f"capacity={capacity} exceeds the {self.max_positions} learned positions of {type(model).__name__}: "
                f"cache slots past {self.max_positions - 1} have no position embedding. Use capacity <= "
                f"{self.max_positions}."
            )

    def static_unsupported(self) -> Optional[str]:
        return "absolute position tables need the press's position hook to keep positions inside the table"

    def position_ids(self, stream_positions: torch.Tensor, *, capacity: int, position_shift: bool) -> torch.Tensor:
        if not position_shift:
            return stream_positions + self.offset
        q = stream_positions.shape[-1]
        bound = (capacity - q) + torch.arange(q, device=stream_positions.device).view(1, -1)
        return torch.minimum(stream_positions, bound).clamp(min=0) + self.offset


class Alibi(PositionScheme):
    """ALiBi (BLOOM, MPT, Falcon with ``alibi=True``): no position in the keys; the model
    biases each key by its distance, read off the attention mask the press builds for the
    compacted cache. So distances follow the cache, as the paper prescribes, and there are
    no absolute distances to keep: ``position_shift=False`` is refused."""

    description = "ALiBi (bias by key distance in the cache)"
    ordered_cache = True

    def static_unsupported(self) -> Optional[str]:
        return "ALiBi reads positions off the order of the cache entries, which a fixed ring does not keep"

    def check(self, model: nn.Module, *, capacity: Optional[int], position_shift: bool) -> None:
        if not position_shift:
            raise UnsupportedModelError(
                f"{type(model).__name__} uses ALiBi, whose biases follow the keys' distance within the cache: "
                "position_shift=False (absolute distances) cannot be honoured. Use position_shift=True."
            )


# -- factories: what an adapter names as its `positions` -----------------------------------

SchemeFactory = Callable[[nn.Module], PositionScheme]


def rope_type(config: Any) -> str:
    """The RoPE variant named by a config, across transformers' spellings. Where parameters
    are given per layer type (5.x: ``{"full_attention": {...}, "sliding_attention": {...}}``)
    the first variant that cannot be shifted wins, so a check sees it."""
    for attr in ("rope_parameters", "rope_scaling"):
        params = getattr(config, attr, None)
        if not isinstance(params, dict):
            continue
        nested = [p for p in params.values() if isinstance(p, dict)]
        kinds = [str(p.get("rope_type", p.get("type", "default"))) for p in (nested or [params])]
        kinds = [k for k in kinds if k]
        if kinds:
            return next((k for k in kinds if k not in SHIFTABLE_ROPE_TYPES), kinds[0])
    return "default"


def _inv_freq(module: Any, buffer: str = "inv_freq") -> Optional[torch.Tensor]:
    freq = getattr(module, buffer, None)
    return freq.detach().to(torch.float64).flatten() if isinstance(freq, torch.Tensor) else None


def rope_positions(
    rotary_attr: str = "rotary_emb",
    interleaved: bool = False,
    *,
    rotary_start: Union[int, Callable[[Any], int]] = 0,
    per_layer_type: bool = False,
    rotary_slot: str = "keys",
) -> SchemeFactory:
    """A factory for RoPE families whose base model holds the rotary module at ``rotary_attr``.

    Frequencies are read off the model's own rotary module (``inv_freq``), so scaled
    variants with fixed frequencies (linear, llama3, yarn) come out right and partial rotary
    is the length of ``inv_freq``. ``per_layer_type=True``: the module holds one
    ``{layer_type}_inv_freq`` per entry of ``config.layer_types`` (Gemma 3's local and global
    bases). ``rotary_start``: first rotary feature of a head (an int or ``config -> int``).
    ``rotary_slot="values"``: the rotated key part is stored in the cache's value slot (multi-head
    latent attention, DeepSeek V2/V3).

    >>> rope_positions("rotary_emb", interleaved=True)  # doctest: +ELLIPSIS
    <function rope_positions.<locals>.positions at ...>
    """

    def positions(model: nn.Module) -> Rotary:
        config = model.config
        rotary = getattr(base_model(model), rotary_attr, None)
        if per_layer_type:
            types = list(getattr(config, "layer_types", None) or [])
            # a hybrid's recurrent layers (no attention, never pressed) have no frequencies: none to rotate
            freqs = [torch.zeros(0, dtype=torch.float64) if kind in RECURRENT_LAYER_TYPES
                     else _inv_freq(rotary, f"{kind}_inv_freq") for kind in types]
            if not types or any(f is None for f in freqs):
                raise UnsupportedModelError(
                    f"{type(model).__name__}: expected one `<layer_type>_inv_freq` buffer per config.layer_types entry "
                    f"on base_model.{rotary_attr}; found none for {types}. The adapter needs updating."
                )
            by_id: dict = {}
            inv_freq: Union[torch.Tensor, list] = [by_id.setdefault(kind, f) for kind, f in zip(types, freqs)]
        else:
            inv_freq = _inv_freq(rotary)
            if inv_freq is None:
                raise UnsupportedModelError(
                    f"{type(model).__name__}: no rotary module with `inv_freq` at base_model.{rotary_attr}; the "
                    "adapter needs updating for this model or transformers release"
                )
        start = rotary_start(config) if callable(rotary_start) else rotary_start
        return Rotary(inv_freq=inv_freq, interleaved=interleaved, rotary_start=start, rope_type=rope_type(config),
                      rotary_slot=rotary_slot)

    return positions


def learned_positions(max_positions_attr: str = "n_positions") -> SchemeFactory:
    """A factory for learned absolute position tables of ``config.<max_positions_attr>`` rows."""

    def positions(model: nn.Module) -> AbsoluteEmbedding:
        rows = int(getattr(model.config, max_positions_attr))
        return AbsoluteEmbedding(max_positions=rows, description=f"learned absolute ({rows} positions)")

    return positions


def sinusoidal_positions() -> SchemeFactory:
    """A factory for sinusoidal absolute positions added to the input (XGLM): unbounded."""
    return lambda model: AbsoluteEmbedding(max_positions=None, description="sinusoidal absolute")


def alibi_positions() -> SchemeFactory:
    """A factory for ALiBi families (BLOOM, MPT, Falcon with alibi)."""
    return lambda model: Alibi()


def no_positions() -> SchemeFactory:
    """A factory for families whose keys carry no position at all."""
    return lambda model: PositionScheme()


__all__ = [
    "Alibi",
    "AbsoluteEmbedding",
    "PositionScheme",
    "Rotary",
    "SHIFTABLE_ROPE_TYPES",
    "Trim",
    "alibi_positions",
    "learned_positions",
    "no_positions",
    "rope_positions",
    "rope_type",
    "sinusoidal_positions",
]

