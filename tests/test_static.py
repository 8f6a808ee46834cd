"""Static-shape streaming (kvpress_lite.static): a fixed cache that torch.compile compiles once.

Same semantics as the eager press (which test_press_reference checks against the float64
reference): the static cache, run eagerly, gives the eager press's logits; compiled, it gives
the same logits for 2,000+ steps with zero recompiles after warm-up."""

import pytest
import torch
import transformers

import kvpress_lite as kvl
from bounds import assert_float32_close
from kvpress_lite.cache_access import model_cache_kwarg, output_cache
from kvpress_lite.static import StreamingCache, prefill
from kvpress_lite.tiny import tiny_model as any_family
from kvpress_lite.tiny import two_layer_pattern
from tiny_models import tiny_model

N_SINK, CAPACITY = 4, 32
FIVE = int(transformers.__version__.split(".")[0]) >= 5
needs_5 = pytest.mark.skipif(not FIVE, reason="static-shape streaming needs transformers >= 5 (refused on 4.x, "
                                              "see test_static_mode_is_refused_where_it_cannot_serve)")


def ids_of(length, seed=0):
    return torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def stream(model, ids, cache, prompt_len, forward=None):
    """Prompt in one call, then token by token; logits [T - 1, vocab] like helpers.loop_logits."""
    forward, name = forward or model, model_cache_kwarg(model)
    logits = [model(input_ids=ids[:, :prompt_len], use_cache=True, **{name: cache}).logits[0]]
    for t in range(prompt_len, ids.shape[1] - 1):
        logits.append(forward(input_ids=ids[:, t : t + 1], use_cache=True, **{name: cache}).logits[0])
    return torch.cat(logits)


def press_logits(model, ids, prompt_len, **press_kwargs):
    from transformers import DynamicCache

    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY, **press_kwargs):
        return stream(model, ids, DynamicCache(config=model.config), prompt_len)


@needs_5
@pytest.mark.parametrize("family", ["llama", "gpt_neox", "cohere", "phi", "qwen3", "gptj"])
def test_the_static_cache_gives_the_eager_press_logits(family):
    """Rotate-half, interleaved (cohere) and partial (gpt_neox, phi) RoPE, and a rotary table of
    fixed rows read by position (gptj: the positions handed stay below 2 * capacity), token by
    token past the capacity."""
    model = tiny_model(family, "sdpa") if family in ("llama", "gpt_neox") else any_family(family, 2, "sdpa")
    ids = ids_of(150, 1)
    want = press_logits(model, ids, 10)
    got = stream(model, ids, StreamingCache(model, n_sink=N_SINK, capacity=CAPACITY), 10)
    assert_float32_close(got, want, model, CAPACITY + 1, runs=2)
    assert (got[100:] - stream(model, ids, StreamingCache(model, n_sink=0, capacity=CAPACITY), 10)[100:]).abs().max() > 1e-2


def sliding_cases():
    """(family, window, every layer slides) for the families whose layer pattern has sliding
    layers (narrow and wide windows) and those with an optional window on every layer (wide)."""
    if not FIVE:
        return []
    from kvpress_lite.tiny import all_model_types, layer_variants, optional_window, windowed_variant

    types = all_model_types()
    windowed = [t for t in types if any(windowed_variant(t, v) for v in layer_variants(t))]
    return ([(t, w, False) for t in windowed for w in (4, 2 * CAPACITY)]
            + [(t, 2 * CAPACITY, True) for t in types if optional_window(t)])


@needs_5
@pytest.mark.parametrize("family, window, every_layer", sliding_cases())
def test_sliding_window_layers_stream_as_under_the_eager_press(family, window, every_layer):
    """A sliding window no wider than the press's window (4 - 1 <= 28) keeps its own ring of
    `window` slots at the positions the model was handed, as transformers does (the 10-token
    prompt overflows it); one wider than the capacity (64 - 1 > 32) is pressed like a full
    layer. Token by token to 80, through a re-base; every family the eager press serves."""
    try:
        model = any_family(family, 2, "eager", layer=two_layer_pattern(family), window=window, sliding=every_layer)
        kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY).remove()
        StreamingCache(model, n_sink=N_SINK, capacity=CAPACITY)
    except Exception as exc:  # not built tiny, not served by the press, or refused by the static cache (a
        # multimodal wrapper: tests/test_wrappers.py): the conformance suite records why
        pytest.skip(f"{family}: {exc}"[:200])
    ids = ids_of(80, 6)
    want = press_logits(model, ids, 10)
    cache = StreamingCache(model, n_sink=N_SINK, capacity=CAPACITY)
    got = stream(model, ids, cache, 10)
    assert_float32_close(got, want, model, CAPACITY + 1, runs=2)
    assert {layer.keys.shape[-2] for layer in cache.layers} == (
        {window, CAPACITY + 1} if window - 1 <= CAPACITY - N_SINK else {CAPACITY + 1})


@needs_5
def test_a_long_prompt_goes_in_through_prefill_token_by_token():
    model = tiny_model("llama", "sdpa")
    ids = ids_of(100, 2)
    cache = StreamingCache(model, n_sink=N_SINK, capacity=CAPACITY)
    last = prefill(model, ids, cache)
    want = press_logits(model, ids, 100, prefill_chunk_size=1)  # the eager press, token by token
    assert_float32_close(last.logits[0, -1], want[-1], model, CAPACITY + 1, runs=2)
    with pytest.raises(kvl.UnsupportedGenerationError, match="kvpress_lite.static.prefill"):
        model(input_ids=ids[:, :50], use_cache=True,
              **{model_cache_kwarg(model): StreamingCache(model, n_sink=N_SINK, capacity=CAPACITY)})


@needs_5
def test_generate_streams_through_the_static_cache():
    model = tiny_model("llama", "sdpa")
    prompt = ids_of(12, 3)
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=120, min_new_tokens=120, do_sample=False,
                  output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY):
        want = model.generate(prompt, **kwargs)
    cache = StreamingCache(model, n_sink=N_SINK, capacity=CAPACITY)
    got = model.generate(prompt, **{model_cache_kwarg(model): cache}, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    assert_float32_close(torch.stack(got.logits), torch.stack(want.logits), model, CAPACITY + 1, runs=2)
    assert output_cache(got).layers[0].keys.shape[-2] == CAPACITY + 1  # fixed, however long the stream


@needs_5
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_compiled_streaming_compiles_once_and_never_recompiles(family):
    """gemma3_text: a sliding-window layer (window 4: a ring of its own) beside a full one."""
    if family == "llama":
        model, ids = tiny_model("llama", "sdpa"), ids_of(2_100, 4)
    else:
        model, ids = any_family(family, 2, "sdpa", layer=two_layer_pattern(family)), ids_of(300, 4)
    compiled_cache = StreamingCache(model, n_sink=N_SINK, capacity=CAPACITY)
    eager_cache = StreamingCache(model, n_sink=N_SINK, capacity=CAPACITY)
    from torch._dynamo.utils import counters

    forward, name = torch.compile(model.forward), model_cache_kwarg(model)
    torch._dynamo.reset()
    counters.clear()  # reset() keeps the counts of earlier tests
    got, want = [], []
    try:
        with torch.no_grad():
            for cache in (compiled_cache, eager_cache):
                model(input_ids=ids[:, :8], use_cache=True, **{name: cache})  # the prompt runs eager
            for t in range(8, ids.shape[1]):
                if t == 40:  # warmed up (filling, then full): from here on a recompile is an error
                    torch._dynamo.config.error_on_recompile = True
                got.append(forward(input_ids=ids[:, t : t + 1], use_cache=True, **{name: compiled_cache}).logits)
                want.append(model(input_ids=ids[:, t : t + 1], use_cache=True, **{name: eager_cache}).logits)
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert counters["stats"]["unique_graphs"] == 1  # one graph for every single-token step
    assert_float32_close(torch.cat(got), torch.cat(want), model, CAPACITY + 1, runs=2)  # compiled vs eager kernels
    assert int(compiled_cache.get_seq_length()) == ids.shape[1]  # and the cache kept its capacity + 1 slots throughout


@needs_5
def test_generate_compiles_its_decoding_step_once_and_streams_on():
    """generate() compiles its own decoding step for a compileable cache (on a GPU by default, on
    a CPU when told: compile_config._compile_all_devices): one graph and no recompile over 340
    tokens (10x the capacity, 10 re-bases), after a prompt longer than the cache. The tokens are
    the eager press's, the logits the float64 reference's."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    from reference import reference_logits, streaming_visible

    model, ids, new = tiny_model("llama", "sdpa"), ids_of(50, 5), 340
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                  output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY, prefill_chunk_size=1):
        want = model.generate(ids, **kwargs)
    cache = StreamingCache(model, n_sink=N_SINK, capacity=CAPACITY)
    prefill(model, ids[:, :-1], cache)  # generate() then takes the last prompt token alone
    config = CompileConfig(fullgraph=True, mode="default")
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    torch._dynamo.reset()
    counters.clear()
    torch._dynamo.config.error_on_recompile = True
    try:
        got = model.generate(ids, compile_config=config, **{model_cache_kwarg(model): cache}, **kwargs)
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(got.sequences, want.sequences)
    reference = reference_logits(model, got.sequences[0], streaming_visible(N_SINK, CAPACITY), rope_positions="cache")
    assert_float32_close(torch.stack(got.logits)[:, 0], reference[49:-1], model, CAPACITY + 1, runs=1)


def test_static_mode_is_refused_where_it_cannot_serve():
    if not FIVE:
        with pytest.raises(kvl.UnsupportedModelError, match="transformers >= 5"):
            StreamingCache(tiny_model("llama"), capacity=CAPACITY)
        return
    with pytest.raises(kvl.UnsupportedModelError, match="absolute position tables"):
        StreamingCache(tiny_model("gpt2"), capacity=CAPACITY)
    with pytest.raises(kvl.UnsupportedModelError, match="ALiBi"):
        StreamingCache(any_family("bloom", 2), capacity=CAPACITY)
    model = tiny_model("llama", "sdpa")
    rows, padded, name = ids_of(10).repeat(2, 1), torch.ones(2, 10, dtype=torch.long), model_cache_kwarg(model)
    padded[0, :3] = 0  # a left-padded batch: the eager press serves it, the static cache refuses it
    with pytest.raises(kvl.UnsupportedGenerationError, match="pads some rows"):
        model(input_ids=rows, attention_mask=padded, **{name: StreamingCache(model, n_sink=N_SINK, capacity=CAPACITY)})
    with pytest.raises(kvl.UnsupportedGenerationError, match="pads some rows"):
        model.generate(rows, attention_mask=padded, max_new_tokens=2, pad_token_id=0,
                       **{name: StreamingCache(model, n_sink=N_SINK, capacity=CAPACITY)})
    # a sliding window between the press's window and its capacity would see some sinks, not others
    with pytest.raises(kvl.UnsupportedModelError, match="sliding-window"):
        StreamingCache(tiny_model("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=0,
                                  layer_types=["sliding_attention", "full_attention"]), n_sink=2, capacity=16)
