"""Static-shape streaming deep into a stream: the logits stay those of StreamingLLM however
many tokens went by.

transformers computes RoPE angles in float32 as position * inv_freq: handed positions that
grow with the stream, the model's angles drift (0.17 in the logits of the tiny Llama at 1e6
tokens, noise at 2**24, where float32 no longer holds every integer). The cache re-bases:
the model is never handed a position past 2 * capacity.

Getting 2**24 tokens deep takes hours token by token; instead the cache takes its sinks, then
its counter of tokens seen jumps by `depth` (what transformers' StaticLayer calls
`cumulative_length`), and the stream goes on. Token j after the jump sees stale slots at
first; once every layer's window holds only tokens after the jump (j >= layers * window), its
logits are a pure function of the sinks and the tokens since, which the float64 reference
(tests/reference.py, positions within the cache) computes on the short stream sinks + tokens.
"""

import pytest
import torch
import transformers

from kvpress_lite.cache_access import model_cache_kwarg
from kvpress_lite.static import StreamingCache
from bounds import assert_float32_close
from reference import reference_logits, streaming_visible
from tiny_models import tiny_model

N_SINK, CAPACITY = 4, 32
WINDOW = CAPACITY - N_SINK
CHECKED = 40  # tokens compared once the jump has washed out of every layer
KV = CAPACITY + 1  # what a query attends to: the reduction length of its softmax (tests/bounds.py)

pytestmark = pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5,
                                reason="static-shape streaming needs transformers >= 5")


@torch.no_grad()
def deep_stream(model, ids, depth, forward=None, cache=None):
    """Sinks, a jump of `depth` tokens, then the rest token by token; logits [T - N_SINK, vocab]."""
    cache = cache or StreamingCache(model, n_sink=N_SINK, capacity=CAPACITY)
    name, forward = model_cache_kwarg(model), forward or model
    model(input_ids=ids[:, :N_SINK], use_cache=True, **{name: cache})
    for layer in cache.layers:
        layer.cumulative_length.add_(depth)
    logits = [forward(input_ids=ids[:, t : t + 1], use_cache=True, **{name: cache}).logits[0, -1]
              for t in range(N_SINK, ids.shape[1])]
    return torch.stack(logits), cache


def check_against_reference(model, got, ids):
    """The last CHECKED of `got` (logits after each token past the sinks) against float64 StreamingLLM."""
    want = reference_logits(model, ids[0], streaming_visible(N_SINK, CAPACITY), rope_positions="cache")
    assert_float32_close(got[-CHECKED:], want[-CHECKED:], model, KV, runs=1)


def ids_for(model, seed):
    clean = model.config.num_hidden_layers * WINDOW  # tokens until no layer sees a stale slot
    return torch.randint(0, 128, (1, N_SINK + clean + CHECKED), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("depth", [10**6, 2**24 + 3, 2**40 + 11], ids=["1e6", "2^24+3", "2^40+11"])
@pytest.mark.parametrize("family", ["llama", "gpt_neox"])  # full and partial rotary
def test_logits_deep_into_a_stream_are_streamingllm(family, depth):
    model = tiny_model(family, "sdpa")
    ids = ids_for(model, depth % 97)
    cache, handed = StreamingCache(model, n_sink=N_SINK, capacity=CAPACITY), []

    def probe(module, args, kwargs):  # runs after the cache's own hook: sees what the model gets
        given = kwargs.get("position_ids")  # None: the model counts on from the cache's length
        handed.append(int(cache.get_seq_length()) if given is None else int(given.max()))

    handle = model.base_model.register_forward_pre_hook(probe, with_kwargs=True)
    try:
        got, _ = deep_stream(model, ids, depth, cache=cache)
    finally:
        handle.remove()
    check_against_reference(model, got, ids)
    assert max(handed) <= 2 * CAPACITY  # whatever the depth, the model sees small positions


def test_compiled_steps_deep_into_a_stream_stay_exact_without_recompiling():
    from torch._dynamo.utils import counters

    model = tiny_model("llama", "sdpa")
    ids = ids_for(model, 7)
    forward = torch.compile(model.forward)
    torch._dynamo.reset()
    counters.clear()  # reset() keeps the counts of earlier tests
    with torch.no_grad():  # warm up: fill, then past the capacity and through a re-base
        deep_stream(model, ids_for(model, 8)[:, : 2 * CAPACITY + 10], 0, forward)
    torch._dynamo.config.error_on_recompile = True
    try:
        got, cache = deep_stream(model, ids, 2**24 + 3, forward)
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert counters["stats"]["unique_graphs"] == 1
    check_against_reference(model, got, ids)
    # reset() starts the stream over: positions and all. Compiled and eager each against float64
    # (the kernels differ by CPU: AVX-512 and AVX2 round differently), then against each other
    cache.reset()
    again, _ = deep_stream(model, ids, 0, forward, cache)
    fresh, _ = deep_stream(model, ids, 0)
    check_against_reference(model, again, ids)
    check_against_reference(model, fresh, ids)
    assert_float32_close(again, fresh, model, KV, runs=2)


def test_a_rotary_table_of_fixed_rows_is_read_inside_it_deep_into_a_stream():
    """GPT-J reads cos/sin from a 512-row table by position: deep in a stream its logits are
    those of the same tokens at the start of one (no float64 reference for it: the two runs of
    the cache are compared, the first of them checked against the eager press in test_static)."""
    from kvpress_lite.tiny import tiny_model as any_family

    model = any_family("gptj", 2, "eager")
    ids = ids_for(model, 3)
    fresh, _ = deep_stream(model, ids, 0)
    deep, _ = deep_stream(model, ids, 2**24 + 3)
    assert_float32_close(deep[-CHECKED:], fresh[-CHECKED:], model, KV, runs=2)  # re-based: other angles, other rounding
