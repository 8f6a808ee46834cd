"""Micro-benchmarks (pytest-benchmark).

Run::

    pytest benchmarks/test_micro.py                       # timings table
    pytest benchmarks/test_micro.py --benchmark-json out.json
    KVPRESS_LITE_MICRO_MODELS=tiny-llama pytest benchmarks/test_micro.py --benchmark-disable   # smoke (the test suite)

* ``test_trim``: what the press runs on one layer after a call, through its own path
  (``stream.plan_call`` deciding with :mod:`kvpress_lite.core`, ``stream.apply_plan``
  trimming, the RoPE scheme re-rotating the sinks): a decode step on a full cache (the ring:
  one slot overwritten in place) and a prompt chunk (a gather), at real model shapes.
* ``test_compress`` / ``test_sink_window_indices``: the pure core functions alone.
* ``test_decode_step``: one decode step with and without the press at equal KV length: dense
  with ``capacity`` cached entries against the press full at ``capacity`` (both then attend to
  ``capacity + 1``). Models: ``KVPRESS_LITE_MICRO_MODELS`` (comma-separated names from
  ``kvpress-lite bench --list``), default one per family at real shape, random weights.
"""

from __future__ import annotations

import os

import pytest
import torch

from kvpress_lite.core import compress, sink_window_indices

N_SINK = 4

# one layer's keys at an eviction: [batch, kv_heads, seq, head_dim], and the capacity to keep
CORE_SHAPES = {
    "pythia-160m@257": ((1, 12, 257, 64), 256),
    "llama-1b@257": ((1, 8, 257, 64), 256),
    "llama-1b-chunk@508": ((1, 8, 508, 64), 256),  # a prompt chunk of 252 on a full cache
    "llama-2-7b@4097": ((1, 32, 4097, 128), 4096),
    "llama-1b-batch8@1025": ((8, 8, 1025, 64), 1024),
}


class _Layer:
    """A cache layer as the press sees it after transformers' update: keys/values [b, h, seq, d]."""

    def __init__(self, keys, values):
        self.keys, self.values = keys, values


@pytest.mark.parametrize("case", sorted(CORE_SHAPES))
def test_trim(benchmark, case):
    from kvpress_lite.positions import Rotary
    from kvpress_lite.stream import Stream, apply_plan, plan_call

    shape, capacity = CORE_SHAPES[case]
    q = shape[2] - capacity  # new tokens on a full cache: 1 (a decode step, the ring) or a chunk (a gather)
    scheme = Rotary(inv_freq=10000.0 ** (-torch.arange(0, shape[3], 2, dtype=torch.float64) / shape[3]))
    keys, values = torch.randn(shape), torch.randn(shape)

    def step():
        stream = Stream(N_SINK, capacity, batch=shape[0], stored=capacity, real_seen=10 * capacity, sinks_fixed=True)
        layer = _Layer(keys.clone() if q > 1 else keys, values.clone() if q > 1 else values)
        plan = plan_call(stream, q, None)
        apply_plan(plan, layer, 0, scheme, position_shift=True)
        return layer

    layer = benchmark(step)
    assert layer.keys.shape[-2] == capacity


@pytest.mark.parametrize("case", sorted(CORE_SHAPES))
def test_compress(benchmark, case):
    shape, capacity = CORE_SHAPES[case]
    keys, values = torch.randn(shape), torch.randn(shape)
    out_keys, out_values = benchmark(compress, keys, values, N_SINK, capacity)
    assert out_keys.shape[-2] == capacity and out_values.shape == out_keys.shape


@pytest.mark.parametrize("seq_len,capacity", [(257, 256), (8192, 256), (32768, 4096)])
def test_sink_window_indices(benchmark, seq_len, capacity):
    kept = benchmark(sink_window_indices, seq_len, N_SINK, capacity)
    assert kept.numel() == capacity


DEFAULT_MICRO_MODELS = "pythia-160m,gpt2-small,llama-1b"
MICRO_MODELS = [m for m in os.environ.get("KVPRESS_LITE_MICRO_MODELS", DEFAULT_MICRO_MODELS).split(",") if m]
DECODE_CAPACITY = int(os.environ.get("KVPRESS_LITE_MICRO_CAPACITY", "256"))
MICRO_ROUNDS = int(os.environ.get("KVPRESS_LITE_MICRO_ROUNDS", "10"))


@pytest.fixture(scope="module", params=MICRO_MODELS)
def model_context(request):
    from kvpress_lite_harness import models as shapes
    from kvpress_lite_harness.methods import ModelContext

    spec = shapes.MODELS[request.param]
    if spec.loader is not None:
        pytest.skip(f"{spec.name} needs its weights; the micro-benchmarks use random-weight shapes")
    model = shapes.build_model(spec)
    with torch.no_grad():
        yield ModelContext(model, "cpu", seed=0, stream_tokens=DECODE_CAPACITY + 4096)


@pytest.mark.parametrize("mode", ["dense", "sinks"])
def test_decode_step(benchmark, model_context, mode):
    from kvpress_lite_harness.methods import Dense, Press

    ctx = model_context
    if mode == "dense":
        method = Dense(ctx, fixed_length=DECODE_CAPACITY)  # DECODE_CAPACITY cached, the step attends to +1
    else:
        method = Press(ctx, N_SINK, DECODE_CAPACITY, position_shift=True)  # full: each step evicts one
    try:
        with torch.no_grad():
            method.prepare(DECODE_CAPACITY + 32)
            method.step()  # warm-up
            method.after_step()
            # setup (untimed) crops dense back to DECODE_CAPACITY before every round
            benchmark.pedantic(method.step, setup=method.after_step, rounds=MICRO_ROUNDS, iterations=1, warmup_rounds=1)
            assert method.kv_length() == DECODE_CAPACITY + (1 if mode == "dense" else 0)
    finally:
        method.close()
    benchmark.extra_info.update({"kv_length": DECODE_CAPACITY, "model": ctx.model.config.model_type, "mode": mode})
