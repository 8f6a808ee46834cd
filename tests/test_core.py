"""Property tests of the pure tensor functions (no transformers involved)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_lite.core import compress, rope_rotate, sink_window_indices, validate_budget

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@st.composite
def budgets(draw):
    n_sink = draw(st.integers(0, 8))
    capacity = draw(st.integers(n_sink + 1, n_sink + 40))
    seq = draw(st.integers(0, 80))
    return n_sink, capacity, seq


@settings(max_examples=200, deadline=None)
@given(budgets())
def test_kept_indices_are_exactly_sinks_and_newest_window(budget):
    n_sink, capacity, seq = budget
    kept = sink_window_indices(seq, n_sink, capacity).tolist()
    # written out plainly: every index, kept iff it is a sink or among the newest capacity - n_sink
    expected = [j for j in range(seq) if seq <= capacity or j < n_sink or j >= seq - (capacity - n_sink)]
    assert kept == expected
    assert len(kept) == min(seq, capacity)


@settings(max_examples=100, deadline=None)
@given(budgets(), st.integers(1, 3), st.integers(1, 3), st.integers(1, 9), st.sampled_from(DTYPES))
def test_compress_keeps_the_right_entries(budget, batch, heads, head_dim, dtype):
    n_sink, capacity, seq = budget
    # entry j of the sequence carries the value j in every feature, so we can read back which survived
    marks = torch.arange(seq, dtype=torch.float64).view(1, 1, seq, 1)
    keys = marks.expand(batch, heads, seq, head_dim).to(dtype)
    values = (marks * 2).expand(batch, heads, seq, head_dim + 1).to(dtype)
    k, v = compress(keys, values, n_sink, capacity)
    assert k.shape == (batch, heads, min(seq, capacity), head_dim)
    assert v.shape[-1] == head_dim + 1 and k.dtype == dtype
    expected = [j for j in range(seq) if seq <= capacity or j < n_sink or j >= seq - (capacity - n_sink)]
    # entries survive intact in every row and head (compared against the same cast: bf16 rounds large integers)
    assert torch.equal(k, keys[..., expected, :]) and torch.equal(v, values[..., expected, :])
    if dtype in (torch.float32, torch.float64):
        assert k[0, 0, :, 0].long().tolist() == expected


@pytest.mark.parametrize(
    "n_sink, capacity, match",
    [(-1, 10, "n_sink must be >= 0"), (4, 4, "capacity must be greater than n_sink"), (8, 3, "greater than n_sink"),
     (2.5, 10, "n_sink must be an int"), (2, "10", "capacity must be an int")],
)
def test_budget_errors_say_which_argument(n_sink, capacity, match):
    with pytest.raises(ValueError, match=match):
        validate_budget(n_sink, capacity)


def _plain_rope(x64, positions, inv_freq64, rotary_dims, interleaved):
    """RoPE written out pair by pair, in float64, as an independent reference."""
    out = x64.clone()
    half = rotary_dims // 2
    for f in range(half):
        angle = positions * inv_freq64[f]
        c, s = torch.cos(angle), torch.sin(angle)
        a, b = (2 * f, 2 * f + 1) if interleaved else (f, f + half)
        out[..., a] = x64[..., a] * c - x64[..., b] * s
        out[..., b] = x64[..., b] * c + x64[..., a] * s
    return out


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4).map(lambda h: 2 * h),  # half of rotary dims
    st.integers(0, 6),  # extra, unrotated features
    st.integers(-50_000, 50_000),
    st.booleans(),
)
def test_rope_rotate_matches_plain_rotation(half_rot, extra, shift, interleaved):
    rotary_dims = 2 * half_rot
    head_dim = rotary_dims + extra
    gen = torch.Generator().manual_seed(shift % 1000)
    x = torch.randn(2, 3, 5, head_dim, generator=gen, dtype=torch.float64)
    inv_freq = 10000.0 ** (-torch.arange(0, rotary_dims, 2, dtype=torch.float64) / rotary_dims)
    got = rope_rotate(x, shift, inv_freq, rotary_dims, interleaved)
    want = _plain_rope(x, torch.tensor(float(shift), dtype=torch.float64), inv_freq, rotary_dims, interleaved)
    # float64: an angle of shift * inv_freq carries ~shift * 2**-53 rad of rounding (< 1e-10 for any shift
    # drawn here, |x| ~ 1), so 1e-9 bounds two rotations computed in another order
    assert torch.allclose(got, want, atol=1e-9)
    assert torch.equal(got[..., rotary_dims:], x[..., rotary_dims:])  # partial rotary leaves the rest alone


def test_rope_rotate_per_row_shifts_and_composition():
    x = torch.randn(3, 2, 4, 8, dtype=torch.float64)
    inv_freq = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    shifts = torch.tensor([[0], [7], [123456]])  # [batch, 1] broadcasts over heads
    got = rope_rotate(x, shifts, inv_freq)
    for row, s in enumerate([0, 7, 123456]):
        # the same float64 operations per row, batched or not: only a reordered reduction could differ (~1e-16)
        assert torch.allclose(got[row], rope_rotate(x[row], s, inv_freq), atol=1e-12)
    # two rotations against one: angles up to 3345 rad in float64 carry ~3345 * 2**-53 = 4e-13 each
    assert torch.allclose(rope_rotate(rope_rotate(x, 1000, inv_freq), 2345, inv_freq), rope_rotate(x, 3345, inv_freq), atol=1e-9)


def test_rope_rotate_rejects_inconsistent_dims():
    with pytest.raises(ValueError, match="inv_freq has"):
        rope_rotate(torch.zeros(1, 1, 1, 8), 1, torch.ones(3))
    with pytest.raises(ValueError, match="rotary_dims must be even"):
        rope_rotate(torch.zeros(1, 1, 1, 8), 1, torch.ones(2), rotary_dims=5)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 6), st.integers(1, 12), st.integers(0, 60))
def test_the_ring_keeps_exactly_the_sink_window_set(n_sink, window, steps):
    """Driving a full cache token by token through ring_slot (what the press runs on single-token
    steps) holds, in some physical order, the same stream positions as sink_window_indices."""
    from kvpress_lite.core import ring_slot

    capacity = n_sink + window
    slots = list(range(capacity))  # slot -> stream position it holds; the cache starts full
    next_slot = n_sink
    for t in range(capacity, capacity + steps):
        slot, next_slot = ring_slot(next_slot, n_sink, capacity)
        slots[slot] = t
    seen = capacity + steps
    assert sorted(slots) == sink_window_indices(seen, n_sink, capacity).tolist()


def test_padded_rows_keep_their_own_first_real_tokens_as_sinks():
    from kvpress_lite.core import padded_sink_window_indices

    valid = torch.tensor([[False, False, False, True, True, True, True, True],
                          [True, True, True, True, True, True, True, True]])
    kept = padded_sink_window_indices(valid, n_sink=2, capacity=5).tolist()
    # row 0: real tokens start at 3, so sinks 3, 4 and the newest three of the rest
    assert kept == [[3, 4, 5, 6, 7], [0, 1, 5, 6, 7]]
