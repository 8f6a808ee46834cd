"""Per-stream state of the press and the plan of one model call.

A *stream* is one cache object being filled call after call. The press keeps, for each
stream, how many tokens went in, how many entries each layer stores, where the oldest
window entry sits, and the pristine (never re-rotated) keys of the sinks.

Layout of a full layer cache (``capacity`` = C slots, W = C - n_sink)::

    slots [0, n_sink)   the sinks, always there, in stream order
    slots [n_sink, C)   the window, kept as a ring: the oldest entry sits at `next_slot`

Attention does not care in which order stored entries sit (every stored entry is
visible to every new token, and RoPE or learned positions are already baked in), so a
single new token simply overwrites the oldest window slot: no copy of the cache. A step
of several tokens (a prompt chunk) gathers the kept entries back into stream order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from .adapter import LearnedPositions, PositionScheme, Rope
from .core import rope_phase, rope_rotate, to_rotary_pairs, write_rotated


@dataclass
class LayerState:
    sink_pairs: Optional[torch.Tensor] = None  # [batch, kv_heads, n_sink, rotary_dims/2] complex128, as first encoded
    keys_ref: Optional[torch.Tensor] = None  # the tensor the press left in the layer (tamper check)


@dataclass
class Stream:
    n_sink: int
    capacity: int
    batch: int
    stored: int = 0  # entries in every layer after the last call
    next_slot: int = 0  # physical slot of the oldest window entry
    # Unpadded streams count with ints (every row alike); padded ones with [batch] tensors.
    real_seen: Union[int, torch.Tensor] = 0  # real (non-pad) tokens taken in
    shift: Union[int, torch.Tensor] = 0  # real tokens evicted = how far the sinks move
    valid: Optional[torch.Tensor] = None  # [batch, stored] bool, padded streams only
    offset: int = 0  # subtracted from every RoPE position handed to the model (see rebase)
    sinks_fixed: bool = False  # True once the sinks sit at slots [0, n_sink)
    broken: bool = False
    layers: list[LayerState] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.next_slot = self.n_sink

    def start_padding(self, valid: torch.Tensor) -> None:
        """Switch to per-row bookkeeping for a left-padded batch (``valid``: [batch, stored])."""
        self.valid = valid
        self.real_seen = valid.sum(1)
        self.shift = torch.zeros(self.batch, dtype=torch.long)

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


@dataclass
class CallPlan:
    """What one model call does to every layer; computed once, applied per layer."""

    stream: Stream
    q: int  # new tokens in this call
    new_valid: Optional[torch.Tensor]  # [batch, q] bool for padded streams, else None
    stored_before: int
    kind: str  # "none" | "ring" | "gather"
    index: Optional[torch.Tensor] = None  # gather: [C] or [batch, C] physical indices to keep
    slot: int = -1  # ring: the slot the new token overwrites
    shift_after: Union[int, torch.Tensor] = 0  # sink shift once this call is done
    phase: Optional[torch.Tensor] = None  # rope_phase(shift_after - offset), shared by every layer
    evicted: int = 0  # entries dropped per layer, summed over rows
    valid_after: Optional[torch.Tensor] = None
    next_slot_after: int = 0

    @property
    def total(self) -> int:
        return self.stored_before + self.q


def plan_call(stream: Stream, q: int, new_valid: Optional[torch.Tensor]) -> CallPlan:
    """Decide what to keep once this call's ``q`` tokens are appended to every layer."""
    n_sink, capacity, window = stream.n_sink, stream.capacity, stream.window
    stored, total = stream.stored, stream.stored + q
    valid_all = None
    if stream.padded:
        valid_all = torch.cat([stream.valid, new_valid], dim=1)  # [batch, total], physical order
    plan = CallPlan(stream, q, new_valid, stored, "none", shift_after=stream.shift, next_slot_after=stream.next_slot)
    if total <= capacity:
        plan.valid_after = valid_all
        return plan

    if q == 1 and stored == capacity and stream.sinks_fixed:
        slot = stream.next_slot
        plan.kind, plan.slot = "ring", slot
        plan.next_slot_after = n_sink + (slot - n_sink + 1) % window
        if valid_all is None:
            gone = 1
        else:
            gone = valid_all[:, slot].long()
            plan.valid_after = valid_all[:, :capacity].clone()
            plan.valid_after[:, slot] = valid_all[:, capacity]
        plan.shift_after = stream.shift + gone
        plan.evicted = stream.batch
        return plan

    # Stream order of the physical slots: sinks, the ring from its oldest entry, then the new tokens.
    ring = list(range(n_sink, stored))
    turn = stream.next_slot - n_sink if stored == capacity else 0
    order = list(range(min(n_sink, stored))) + ring[turn:] + ring[:turn] + list(range(stored, total))
    order_t = torch.tensor(order, dtype=torch.long)
    if stream.sinks_fixed or not stream.padded:
        index = torch.cat([order_t[:n_sink], order_t[total - window :]])
    else:
        index = _padded_first_trim(valid_all[:, order_t], n_sink, window)  # logical -> map to physical
        index = order_t[index]
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
    """Advance the stream once every layer has applied ``plan``."""
    stream, new_valid = plan.stream, plan.new_valid
    stream.real_seen = stream.real_seen + (plan.q if new_valid is None else new_valid.sum(1))
    stream.stored = plan.total if plan.kind == "none" else stream.capacity
    stream.next_slot, stream.shift, stream.valid = plan.next_slot_after, plan.shift_after, plan.valid_after
    if plan.kind == "gather":
        stream.sinks_fixed = True


def _padded_first_trim(valid: torch.Tensor, n_sink: int, window: int) -> torch.Tensor:
    """Per row of a left-padded batch: the first ``n_sink`` *real* tokens become the sinks
    (padding stands in where a row has fewer), then the newest ``window`` entries.
    ``valid`` is [batch, total] in stream order; returns [batch, n_sink + window] indices."""
    rows = []
    for row in valid.tolist():
        real = [j for j, ok in enumerate(row) if ok]
        sinks = real[:n_sink]
        pads = [j for j, ok in enumerate(row) if not ok]
        sinks = sinks + pads[: n_sink - len(sinks)]  # a short row pins padding in its spare sink slots
        chosen = set(sinks)
        rest = [j for j in range(len(row)) if j not in chosen]
        rows.append(sorted(sinks) + rest[len(rest) - window :])
    return torch.tensor(rows, dtype=torch.long)


def apply_plan(plan: CallPlan, layer, state: LayerState, positions: PositionScheme, position_shift: bool) -> None:
    """Trim one layer's cache (already updated with this call's tokens) as ``plan`` says."""
    keys, values = layer.keys, layer.values  # [batch, kv_heads, total, head_dim]
    stream, capacity, n_sink = plan.stream, plan.stream.capacity, plan.stream.n_sink
    if keys.shape[-2] != plan.total:
        stream.broken = True
        raise RuntimeError(
            f"kvpress-lite: a cache layer holds {keys.shape[-2]} entries after the update, expected {plan.total}. "
            "Was the cache shared with another model or modified during the call?"
        )
    if plan.kind == "none":
        state.keys_ref = keys
        return
    with torch.no_grad():
        if plan.kind == "ring":  # the new token takes the oldest window slot: no copy of the cache
            keys.select(-2, plan.slot).copy_(keys.select(-2, capacity))
            values.select(-2, plan.slot).copy_(values.select(-2, capacity))
            keys, values = keys.narrow(-2, 0, capacity), values.narrow(-2, 0, capacity)
        else:
            keys, values = _gather(keys, plan.index), _gather(values, plan.index)
        if n_sink and position_shift and isinstance(positions, Rope):
            sinks = keys[..., :n_sink, :]
            if state.sink_pairs is None:  # first eviction: the sinks still carry their original rotation
                state.sink_pairs = to_rotary_pairs(sinks, positions.rotary_dims, positions.interleaved)
            if plan.phase is None:
                plan.phase = rope_phase(plan.shift_after - stream.offset, positions.inv_freq).to(keys.device)
            write_rotated(sinks, state.sink_pairs, plan.phase, positions.interleaved)
    layer.keys, layer.values = keys, values
    state.keys_ref = keys


def rebase(stream: Stream, layers: list, positions: Rope, period: int) -> bool:
    """Keep RoPE positions small however long the stream runs.

    The query and the window keys carry absolute positions, and float32 angles lose
    precision as positions grow (0.06 rad of spacing at position 1e6). Once the positions
    handed to the model pass ``period``, every stored key is rotated back by ``R`` positions
    (one float64 rotation, O(capacity) once per ``R`` tokens, so a key is rebased at most once
    while it lives when ``R`` exceeds the window) and ``R`` is subtracted from every later
    position; the sinks follow through their phase. Returns True when it rebased.
    """
    seen = int(stream.real_seen if not stream.padded else stream.real_seen.min())
    if stream.stored < stream.capacity or not stream.sinks_fixed or seen - stream.offset < period:
        return False
    step = seen - stream.offset - stream.capacity
    with torch.no_grad():
        for layer in layers[: len(stream.layers)]:
            # the sinks too: they carry the phase written for this step in the old coordinates
            # (the next trim rewrites them from their pristine copy in the new ones)
            stored = layer.keys[..., : stream.stored, :]
            stored.copy_(rope_rotate(stored, -step, positions.inv_freq, positions.rotary_dims, positions.interleaved))
    stream.offset += step
    return True


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    index = index.to(x.device)
    if index.dim() == 1:
        return x.index_select(-2, index)
    b, h, _, d = x.shape
    return x.gather(2, index.view(b, 1, -1, 1).expand(b, h, index.shape[1], d))


def positions_for(stream: Stream, plan: CallPlan, new_valid: Optional[torch.Tensor], scheme: PositionScheme,
                  position_shift: bool) -> torch.Tensor:
    """Position ids ``[batch, q]`` for this call's tokens.

    RoPE: the absolute (real-token) position. With the sink shift this makes the query and
    every kept key relate exactly as if the cache held positions 0..L-1 contiguously.
    Learned positions with ``position_shift``: the slot the token takes in the cache,
    never above ``capacity - 1``.
    """
    q = plan.q
    if new_valid is None:
        pos = torch.arange(stream.real_seen, stream.real_seen + q).view(1, -1).expand(stream.batch, q)
    else:
        pos = (stream.real_seen.view(-1, 1) + new_valid.long().cumsum(1) - 1).clamp(min=0)
    if stream.offset:
        pos = pos - stream.offset
    if isinstance(scheme, LearnedPositions) and position_shift:
        bound = (stream.capacity - q) + torch.arange(q).view(1, -1)
        pos = torch.minimum(pos, bound).clamp(min=0)
    return pos
