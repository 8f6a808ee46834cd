"""Per-stream state of the press and the plan of one model call.

A *stream* is one cache object being filled call after call. The press keeps, for each
stream, how many tokens went in, how many entries each pressed layer stores, where the
oldest window entry sits, and whatever the position scheme keeps per layer (RoPE: the
pristine keys of the sinks).

Layout of a full layer cache (``capacity`` = C slots, W = C - n_sink)::

    slots [0, n_sink)   the sinks, always there, in stream order
    slots [n_sink, C)   the window, kept as a ring: the oldest entry sits at `next_slot`

Attention does not care in which order stored entries sit (every stored entry is
visible to every new token, and positions are already baked in), so a single new token
simply overwrites the oldest window slot (:func:`core.ring_slot`): no copy of the cache.
A step of several tokens (a prompt chunk) gathers the kept entries back into stream
order (:func:`core.sink_window_indices`). Which entries survive is decided by those core
functions alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from . import cache_access

from .core import padded_sink_window_indices, ring_slot, sink_window_indices
from .positions import PositionScheme, Trim


@dataclass
class LayerState:
    scheme_state: dict = field(default_factory=dict)  # the position scheme's own per-layer state
    keys_ref: Optional[torch.Tensor] = None  # the tensor the press left in the layer (tamper check)


@dataclass
class Stream:
    n_sink: int
    capacity: int
    batch: int
    stored: int = 0  # entries in every pressed layer after the last call
    next_slot: int = 0  # physical slot of the oldest window entry
    # Unpadded streams count with ints (every row alike); padded ones with [batch] tensors.
    real_seen: Union[int, torch.Tensor] = 0  # real (non-pad) tokens taken in
    shift: Union[int, torch.Tensor] = 0  # real tokens evicted = how far the sinks move
    valid: Optional[torch.Tensor] = None  # [batch, stored] bool, padded streams only
    offset: int = 0  # subtracted from every position handed to the model (see PositionScheme.rebase_step)
    sinks_fixed: bool = False  # True once the sinks sit at slots [0, n_sink) for good
    gathered: bool = False  # True after the first gather put sinks at slots [0, n_sink)
    ordered: bool = False  # keep entries in stream order (no ring): the scheme reads positions off the order
    broken: bool = False
    layers: dict[int, LayerState] = field(default_factory=dict)  # pressed layer index -> its state
    settings: tuple = ()  # the press settings that filled it (see conversation.settings_of)
    recent_tokens: Optional[torch.Tensor] = None  # [batch, <= capacity] ids of the last tokens taken in
    sink_tokens: Optional[torch.Tensor] = None  # [batch, <= n_sink] ids of the sinks

    def __post_init__(self) -> None:
        self.next_slot = self.n_sink

    def start_padding(self, valid: torch.Tensor) -> None:
        """Switch to per-row bookkeeping for a left-padded batch (``valid``: [batch, stored])."""
        self.valid = valid
        self.real_seen = valid.sum(1)
        self.shift = torch.zeros(self.batch, dtype=torch.long)

    def layer(self, layer_idx: int) -> LayerState:
        return self.layers.setdefault(layer_idx, LayerState())

    @property
    def window(self) -> int:
        return self.capacity - self.n_sink

    @property
    def padded(self) -> bool:
        return self.valid is not None

    @property
    def longest_row(self) -> int:
        """Real tokens taken in by the longest row."""
        return int(self.real_seen.max()) if self.padded else int(self.real_seen)

    @property
    def shortest_row(self) -> int:
        """Real tokens taken in by the shortest row."""
        return int(self.real_seen.min()) if self.padded else int(self.real_seen)


@dataclass
class CallPlan:
    """What one model call does to every pressed layer; computed once, applied per layer."""

    stream: Stream
    q: int  # new tokens in this call
    new_valid: Optional[torch.Tensor]  # [batch, q] bool for padded streams, else None
    stored_before: int
    kind: str  # "none" | "ring" | "gather"
    index: Optional[torch.Tensor] = None  # gather: [C] or [batch, C] physical indices to keep
    slot: int = -1  # ring: the slot the new token overwrites
    shift_after: Union[int, torch.Tensor] = 0  # sink shift once this call is done
    shared: dict = field(default_factory=dict)  # computed once per call, used by every layer (e.g. a phase)
    evicted: int = 0  # entries dropped per layer, summed over rows
    new_sinks: Optional[torch.Tensor] = None  # [batch, n_sink] bool: sink slots taking a new entry
    valid_after: Optional[torch.Tensor] = None
    next_slot_after: int = 0

    @property
    def total(self) -> int:
        return self.stored_before + self.q


def plan_call(stream: Stream, q: int, new_valid: Optional[torch.Tensor]) -> CallPlan:
    """Decide what to keep once this call's ``q`` tokens are appended to every pressed layer."""
    n_sink, capacity = stream.n_sink, stream.capacity
    stored, total = stream.stored, stream.stored + q
    valid_all = None
    if stream.padded:
        valid_all = torch.cat([stream.valid, new_valid], dim=1)  # [batch, total], physical order
    plan = CallPlan(stream, q, new_valid, stored, "none", shift_after=stream.shift, next_slot_after=stream.next_slot)
    if total <= capacity:
        plan.valid_after = valid_all
        return plan

    if q == 1 and stored == capacity and stream.sinks_fixed and not stream.ordered:
        plan.kind = "ring"
        plan.slot, plan.next_slot_after = ring_slot(stream.next_slot, n_sink, capacity)
        if valid_all is None:
            gone = 1
        else:
            gone = valid_all[:, plan.slot].long()
            plan.valid_after = valid_all[:, :capacity].clone()
            plan.valid_after[:, plan.slot] = valid_all[:, capacity]
        plan.shift_after = stream.shift + gone
        plan.evicted = stream.batch
        return plan

    # Stream order of the physical slots: sinks, the ring from its oldest entry, then the new tokens.
    ring = list(range(n_sink, stored))
    turn = stream.next_slot - n_sink if stored == capacity else 0
    order = list(range(min(n_sink, stored))) + ring[turn:] + ring[:turn] + list(range(stored, total))
    order_t = torch.tensor(order, dtype=torch.long)
    if stream.sinks_fixed or not stream.padded:
        index = order_t[sink_window_indices(total, n_sink, capacity)]
    else:  # logical (stream-order) indices per row, mapped to physical slots
        index = order_t[padded_sink_window_indices(valid_all[:, order_t], n_sink, capacity)]
        if stream.gathered:  # sink slots whose occupant changes (padding giving way to a real token)
            plan.new_sinks = index[:, :n_sink] != torch.arange(n_sink)
    plan.kind, plan.index = "gather", index
    plan.next_slot_after = n_sink
    if valid_all is None:
        real_gone = total - capacity
    else:
        kept_valid = valid_all.gather(1, index) if index.dim() == 2 else valid_all[:, index]
        real_gone = valid_all.sum(1) - kept_valid.sum(1)
        plan.valid_after = kept_valid
    plan.shift_after = stream.shift + real_gone
    plan.evicted = stream.batch * (total - capacity)
    return plan


def commit_plan(plan: CallPlan) -> None:
    """Advance the stream once every pressed layer has applied ``plan``."""
    stream, new_valid = plan.stream, plan.new_valid
    stream.real_seen = stream.real_seen + (plan.q if new_valid is None else new_valid.sum(1))
    stream.stored = plan.total if plan.kind == "none" else stream.capacity
    stream.next_slot, stream.shift, stream.valid = plan.next_slot_after, plan.shift_after, plan.valid_after
    if plan.kind == "gather":
        stream.gathered = True
        # the sinks are final once every row's sink slots hold real tokens; until then each eviction
        # gathers again, so a row short of real tokens takes its own as they arrive
        stream.sinks_fixed = stream.valid is None or bool(stream.valid[:, : stream.n_sink].all())


def apply_plan(plan: CallPlan, layer, layer_idx: int, scheme: PositionScheme, position_shift: bool) -> None:
    """Trim one layer's cache (already updated with this call's tokens) as ``plan`` says, then
    let the position scheme adjust the kept entries."""
    keys, values = cache_access.stored_kv(layer)  # [batch, kv_heads, total, head_dim] (fp8: as bytes)
    stream, capacity = plan.stream, plan.stream.capacity
    state = stream.layer(layer_idx)
    if keys.shape[-2] != plan.total:
        stream.broken = True
        raise RuntimeError(
            f"kvpress-lite: cache layer {layer_idx} holds {keys.shape[-2]} entries after the update, expected "
            f"{plan.total}. Was the cache shared with another model or modified during the call?"
        )
    if plan.kind == "none":
        state.keys_ref = keys
        return
    tracked = torch.is_grad_enabled()  # a caller outside torch.no_grad(): store no views autograd could trip on
    with torch.no_grad():
        if plan.kind == "ring":  # the new token takes the oldest window slot: no copy of the cache
            keys.select(-2, plan.slot).copy_(keys.select(-2, capacity))
            values.select(-2, plan.slot).copy_(values.select(-2, capacity))
            keys, values = keys.narrow(-2, 0, capacity), values.narrow(-2, 0, capacity)
            if tracked:
                keys, values = keys.clone(), values.clone()
        else:
            keys, values = _gather(keys, plan.index), _gather(values, plan.index)
        if position_shift:
            shift = plan.shift_after - stream.offset
            slot = getattr(scheme, "rotary_slot", "keys")
            rotated = values if slot == "values" else keys
            fp8 = cache_access.is_fp8(layer)
            if fp8:  # rotate the float values of the sinks, then store them at the layer's frozen scale
                sinks = rotated.narrow(-2, 0, stream.n_sink)
                decoded = cache_access.fp8_decode(layer, rotated, slot)
            scheme.after_trim(decoded if fp8 else rotated, Trim(layer_idx, stream.n_sink, shift, state.scheme_state,
                                                                 plan.shared, plan.new_sinks))
            if fp8:
                sinks.copy_(cache_access.fp8_encode(layer, decoded.narrow(-2, 0, stream.n_sink), slot))
    cache_access.store_kv(layer, keys, values)
    state.keys_ref = keys


def rebase(stream: Stream, layers: dict[int, object], scheme: PositionScheme) -> int:
    """Keep positions small however long the stream runs, where the scheme asks for it.

    Once the scheme's :meth:`~PositionScheme.rebase_step` says so, every stored key of every
    attention layer (pressed or sliding, the sinks included: they carry the phase written
    in the old coordinates, and the next trim rewrites them from their pristine copy in the
    new ones) moves back by ``step`` positions, and ``step`` is subtracted from every later
    position. O(capacity) once per period, so a key is rebased at most once while it lives.
    ``layers``: layer index -> cache layer. Returns the step (0: nothing done).
    """
    if stream.stored < stream.capacity or not stream.sinks_fixed:
        return 0
    step = scheme.rebase_step(stream.shortest_row - stream.offset, stream.capacity)
    if step <= 0:
        return 0
    with torch.no_grad():
        for layer_idx, layer in layers.items():
            slot = getattr(scheme, "rotary_slot", "keys")
            if cache_access.is_fp8(layer):  # rotated as floats, stored again at the frozen scale (one rounding)
                stored = cache_access.stored_kv(layer)[0 if slot == "keys" else 1]
                decoded = cache_access.fp8_decode(layer, stored, slot)
                scheme.rebase(decoded, layer_idx, step)
                stored.copy_(cache_access.fp8_encode(layer, decoded, slot))
                continue
            keys = getattr(layer, slot, None)
            if keys is not None and keys.numel():
                scheme.rebase(keys, layer_idx, step)
    stream.offset += step
    return step


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    index = index.to(x.device)
    if index.dim() == 1:
        return x.index_select(-2, index)
    b, h, _, d = x.shape
    return x.gather(2, index.view(b, 1, -1, 1).expand(b, h, index.shape[1], d))


def stream_positions(stream: Stream, q: int, new_valid: Optional[torch.Tensor]) -> torch.Tensor:
    """Positions ``[batch, q]`` of this call's tokens in the stream (real tokens counted, minus
    the rebase offset); the position scheme turns them into what the model is handed."""
    if new_valid is None:
        pos = torch.arange(stream.real_seen, stream.real_seen + q).view(1, -1).expand(stream.batch, q)
    else:
        pos = (stream.real_seen.view(-1, 1) + new_valid.long().cumsum(1) - 1).clamp(min=0)
    return pos - stream.offset if stream.offset else pos
