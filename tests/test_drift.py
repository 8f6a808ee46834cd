"""No drift: after 20,000 evictions the sink keys the model attends to are within one
rounding of a float64 reference, in float16 and bfloat16.

The stream is driven through the press's own per-step path (plan_call, apply_plan,
commit_plan) on a stand-in cache layer that grows by concatenation exactly like
transformers' DynamicLayer, so no model forward is needed for 20,000 steps.
"""

import pytest
import torch

from kvpress_lite.positions import Rotary
from kvpress_lite.stream import Stream, apply_plan, commit_plan, plan_call

STEPS = 20_000
N_SINK, CAPACITY, HEADS, HEAD_DIM = 4, 16, 2, 64


class GrowingLayer:
    """Stand-in for transformers' DynamicLayer: update() concatenates."""

    def __init__(self):
        self.keys = self.values = None

    def update(self, k, v):
        self.keys = k if self.keys is None else torch.cat([self.keys, k], dim=-2)
        self.values = v if self.values is None else torch.cat([self.values, v], dim=-2)


def reference_rotation(x64, shift, inv_freq64):
    """Float64 rotate_half RoPE by `shift` positions, written plainly."""
    half = x64.shape[-1] // 2
    angle = shift * inv_freq64  # float64, no reduction needed at this size
    c, s = torch.cos(angle), torch.sin(angle)
    x1, x2 = x64[..., :half], x64[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of the dtype's numbers around |x| (one unit in the last place)."""
    info = torch.finfo(x.dtype)
    exponent = torch.floor(torch.log2(x.double().abs().clamp(min=info.tiny)))
    return torch.pow(2.0, exponent) * info.eps


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sinks_stay_within_one_rounding_after_20000_evictions(dtype):
    gen = torch.Generator().manual_seed(0)
    inv_freq = 10000.0 ** (-torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    positions = Rotary(inv_freq=inv_freq)
    layer = GrowingLayer()
    stream = Stream(N_SINK, CAPACITY, batch=1)
    stream.sinks_fixed = True
    originals = None
    for step in range(CAPACITY + STEPS):
        k = torch.randn(1, HEADS, 1, HEAD_DIM, generator=gen).to(dtype)
        layer.update(k, k.clone())
        plan = plan_call(stream, 1, None)
        apply_plan(plan, layer, 0, positions, position_shift=True)
        commit_plan(plan)
        if step == N_SINK - 1:
            originals = layer.keys[..., :N_SINK, :].clone()
    assert int(stream.shift) == STEPS  # one eviction per step once full
    got = layer.keys[..., :N_SINK, :]
    want = reference_rotation(originals.double(), float(STEPS), inv_freq)
    err = (got.double() - want).abs()
    # one rounding of the float64 result: at most half an ulp of the stored value (one ulp for slack)
    assert bool((err <= ulp(want.to(dtype))).all()), float(err.max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compounded_rotation_would_fail_the_same_bound(dtype):
    """The bound above is tight enough to catch the failure mode of re-rotating stored keys."""
    gen = torch.Generator().manual_seed(0)
    inv_freq = 10000.0 ** (-torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    x = torch.randn(1, HEADS, N_SINK, HEAD_DIM, generator=gen).to(dtype)
    compounded = x.clone()
    for _ in range(2000):  # rotate the stored (rounded) keys by one position again and again
        compounded = reference_rotation(compounded.double(), 1.0, inv_freq).to(dtype)
    want = reference_rotation(x.double(), 2000.0, inv_freq)
    assert not bool(((compounded.double() - want).abs() <= ulp(want.to(dtype))).all())
