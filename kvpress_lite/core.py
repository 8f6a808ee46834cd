"""The StreamingLLM compression as pure tensor functions.

Nothing here imports transformers: these functions work on plain key/value tensors of
shape ``[batch, kv_heads, seq, head_dim]`` and are what every adapter shares.

StreamingLLM (Xiao et al., 2023, arXiv:2309.17453) keeps the first ``n_sink`` entries
of a stream (the "attention sinks") and the most recent ``capacity - n_sink`` entries,
and drops the middle.

Example
-------
>>> import torch
>>> k = torch.arange(10.).view(1, 1, 10, 1)
>>> keys, _ = compress(k, k, n_sink=2, capacity=5)
>>> keys.flatten().tolist()
[0.0, 1.0, 7.0, 8.0, 9.0]
"""

from __future__ import annotations

import math
import operator

import torch

__all__ = [
    "as_int",
    "validate_budget",
    "sink_window_indices",
    "padded_sink_window_indices",
    "ring_slot",
    "compress",
    "rope_rotate",
    "rope_phase",
    "to_rotary_pairs",
    "write_rotated",
]


def as_int(name: str, value: object) -> int:
    """``value`` as a Python int if it is an integer of any kind (numpy and torch scalars
    included, bools excluded); otherwise a ``ValueError`` naming the argument.

    >>> as_int("capacity", 256)
    256
    """
    if not isinstance(value, bool) and not (isinstance(value, torch.Tensor) and value.is_floating_point()):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise ValueError(f"{name} must be an integer, got {type(value).__name__} ({value!r})")


def validate_budget(n_sink: int, capacity: int) -> None:
    """Raise ``ValueError`` unless ``0 <= n_sink < capacity`` (both integers).

    >>> validate_budget(4, 256)
    """
    n_sink, capacity = as_int("n_sink", n_sink), as_int("capacity", capacity)
    if n_sink < 0:
        raise ValueError(f"n_sink must be >= 0 (the number of first tokens kept as attention sinks), got {n_sink}")
    if capacity <= n_sink:
        raise ValueError(
            f"capacity must be greater than n_sink: the cache keeps n_sink={n_sink} sinks plus at least one "
            f"recent token, got capacity={capacity}. Use e.g. capacity={n_sink + 252}."
        )


def sink_window_indices(
    seq_len: int, n_sink: int, capacity: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Indices kept out of ``seq_len`` entries: ``[0, n_sink)`` then the last ``capacity - n_sink``.

    Returns all of ``range(seq_len)`` when ``seq_len <= capacity``. Indices are sorted, so
    the kept entries stay in stream order.

    >>> sink_window_indices(10, 2, 5).tolist()
    [0, 1, 7, 8, 9]
    """
    validate_budget(n_sink, capacity)
    if seq_len <= capacity:
        return torch.arange(seq_len, device=device)
    window = capacity - n_sink
    return torch.cat(
        [torch.arange(n_sink, device=device), torch.arange(seq_len - window, seq_len, device=device)]
    )


def padded_sink_window_indices(valid: torch.Tensor, n_sink: int, capacity: int) -> torch.Tensor:
    """Per row of a left-padded batch: which entries survive, ``[batch, capacity]`` indices.

    ``valid`` is ``[batch, seq]`` bool in stream order (False: padding). Each row keeps its
    own first ``n_sink`` *real* entries as sinks, then its newest ``capacity - n_sink``
    entries. A row with fewer real entries so far holds padding in its spare sink slots,
    *after* its real sinks (so a real sink keeps its slot while the spare ones fill up on
    later trims); otherwise indices are in stream order.

    >>> valid = torch.tensor([[False, False, True, True, True, True]])
    >>> padded_sink_window_indices(valid, 1, 3).tolist()
    [[2, 4, 5]]
    >>> padded_sink_window_indices(valid, 2, 3).tolist()  # real sinks at 2 and 3 before the window
    [[2, 3, 5]]
    """
    validate_budget(n_sink, capacity)
    window = capacity - n_sink
    rows = []
    for row in valid.tolist():
        real = [j for j, ok in enumerate(row) if ok]
        pads = [j for j, ok in enumerate(row) if not ok]
        sinks = real[:n_sink]
        sinks = sinks + pads[: n_sink - len(sinks)]  # a short row pins padding in its spare sink slots, for now
        chosen = set(sinks)
        rest = [j for j in range(len(row)) if j not in chosen]
        rows.append(sinks + rest[len(rest) - window :])
    return torch.tensor(rows, dtype=torch.long, device=valid.device)


def ring_slot(next_slot: int, n_sink: int, capacity: int) -> tuple[int, int]:
    """One token into a full cache kept as a ring: the slot it overwrites (the oldest window
    entry, at ``next_slot``) and where the oldest entry sits afterwards.

    Slots ``[0, n_sink)`` hold the sinks; ``[n_sink, capacity)`` the window, whose oldest entry
    moves one slot on (wrapping) per token. The kept set is exactly
    ``sink_window_indices`` of the stream, in another physical order.

    >>> ring_slot(4, 2, 5)
    (4, 2)
    """
    window = capacity - n_sink
    if not n_sink <= next_slot < capacity:
        raise ValueError(f"next_slot must lie in the window [{n_sink}, {capacity}), got {next_slot}")
    return next_slot, n_sink + (next_slot - n_sink + 1) % window


def compress(
    keys: torch.Tensor, values: torch.Tensor, n_sink: int, capacity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the sinks and the most recent window of a key/value pair along the sequence axis.

    ``keys`` and ``values`` are ``[batch, kv_heads, seq, head_dim]`` (``values`` may have a
    different last dimension). Returns new tensors of length ``min(seq, capacity)``; the
    inputs are returned unchanged when nothing needs to go.

    >>> k = torch.zeros(2, 3, 300, 8)
    >>> compress(k, k, 4, 256)[0].shape
    torch.Size([2, 3, 256, 8])
    """
    seq_len = keys.shape[-2]
    if values.shape[-2] != seq_len:
        raise ValueError(f"keys and values disagree on sequence length: {seq_len} vs {values.shape[-2]}")
    validate_budget(n_sink, capacity)
    if seq_len <= capacity:
        return keys, values
    kept = sink_window_indices(seq_len, n_sink, capacity, device=keys.device)
    return keys.index_select(-2, kept), values.index_select(-2, kept)


def rope_rotate(
    x: torch.Tensor,
    shift: int | torch.Tensor,
    inv_freq: torch.Tensor,
    rotary_dims: int | None = None,
    interleaved: bool = False,
) -> torch.Tensor:
    """Rotate RoPE-encoded vectors forward by ``shift`` positions.

    ``x`` is ``[..., seq, head_dim]`` and already rotary-encoded; rotations compose, so the
    result equals encoding the raw vector at its old position plus ``shift``. Only the first
    ``rotary_dims`` features are rotated (GPT-NeoX's partial rotary; default: all), in
    ``rotate_half`` layout (first half paired with second half) or, with
    ``interleaved=True``, in adjacent pairs (GPT-J style). ``shift`` is an int or a tensor
    broadcastable to ``x.shape[:-2]`` (one shift per batch row, say).

    Angles are computed in float64 and reduced modulo 2*pi before the single cast to
    ``x.dtype``: rotating a pristine copy by a large total shift costs one rounding, however
    large the shift.

    >>> inv_freq = torch.tensor([1.0, 0.1])
    >>> x = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    >>> rope_rotate(rope_rotate(x, 3, inv_freq), -3, inv_freq).allclose(x)
    True
    """
    head_dim = x.shape[-1]
    rotary_dims = head_dim if rotary_dims is None else rotary_dims
    if rotary_dims % 2 or rotary_dims > head_dim:
        raise ValueError(f"rotary_dims must be even and <= head_dim ({head_dim}), got {rotary_dims}")
    if inv_freq.numel() != rotary_dims // 2:
        raise ValueError(f"inv_freq has {inv_freq.numel()} frequencies, expected rotary_dims/2 = {rotary_dims // 2}")
    shift = torch.as_tensor(shift, dtype=torch.float64, device=x.device)
    # [..., 1, rotary_dims/2]: broadcast over the sequence axis
    angles = shift.reshape(*shift.shape, 1, 1) * inv_freq.to(device=x.device, dtype=torch.float64)
    angles = torch.remainder(angles, 2 * math.pi)
    cos, sin = angles.cos(), angles.sin()

    rot = x[..., :rotary_dims].to(torch.float64)
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    else:
        half = rotary_dims // 2
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    if rotary_dims == head_dim:
        return out.to(x.dtype)
    return torch.cat([out.to(x.dtype), x[..., rotary_dims:]], dim=-1)


# -- the same rotation split in three, for the press's hot path -------------------------
# A sink key's rotary features are held as complex numbers (one per frequency); rotating
# by `shift` positions is then one complex multiplication by a phase that is shared by
# every layer of the model, computed once per step.


def rope_phase(shift: int | torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """``exp(i * shift * inv_freq)`` in complex128, angles reduced mod 2*pi in float64.

    ``shift`` is an int or a ``[batch]`` tensor; the result is ``[rotary_dims/2]`` or
    ``[batch, 1, 1, rotary_dims/2]`` (broadcasting over heads and sequence).

    >>> rope_phase(0, torch.ones(2)).tolist()
    [(1+0j), (1+0j)]
    """
    inv_freq = inv_freq.to(torch.float64)
    if isinstance(shift, torch.Tensor):
        shift = shift.to(device=inv_freq.device, dtype=torch.float64).view(-1, 1, 1, 1)
    angles = torch.remainder(shift * inv_freq, 2 * math.pi)
    return torch.polar(torch.ones_like(angles), angles)


def to_rotary_pairs(x: torch.Tensor, rotary_dims: int, interleaved: bool = False) -> torch.Tensor:
    """The rotary features of ``x`` ``[..., head_dim]`` as complex128 ``[..., rotary_dims/2]``."""
    rot = x[..., :rotary_dims].to(torch.float64)
    if interleaved:
        return torch.view_as_complex(rot.unflatten(-1, (-1, 2)).contiguous())
    half = rotary_dims // 2
    return torch.complex(rot[..., :half], rot[..., half:])


def write_rotated(dest: torch.Tensor, pairs: torch.Tensor, phase: torch.Tensor, interleaved: bool = False) -> None:
    """Write ``pairs * phase`` into the rotary features of ``dest`` in place (one rounding).

    Inverse of :func:`to_rotary_pairs`: ``write_rotated(x, to_rotary_pairs(x, d), rope_phase(s, f))``
    equals ``rope_rotate(x, s, f, d)``.
    """
    rotated = pairs * phase
    half = pairs.shape[-1]
    if interleaved:
        dest[..., : 2 * half].copy_(torch.view_as_real(rotated).flatten(-2))
    else:
        dest[..., :half].copy_(rotated.real)
        dest[..., half : 2 * half].copy_(rotated.imag)
