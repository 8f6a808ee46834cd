"""Behaviour of the press beyond the reference match: equivalence before eviction,
restoration, statistics, chunked prompts, padded batches, dtypes, GPT-2 past n_positions,
scaled RoPE."""

import pytest
import torch
from transformers import DynamicCache

import kvpress_lite as kvl
from bounds import assert_float32_close
from helpers import cache_kwarg, generate, loop_logits
from tiny_models import FAMILIES, tiny_model

N_SINK, CAPACITY = 4, 32


def all_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_unpressed_model_until_first_eviction(family):
    model = tiny_model(family, "sdpa")
    ids = torch.randint(0, 128, (1, CAPACITY), generator=torch.Generator().manual_seed(3))
    dense = loop_logits(model, ids, 5)
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY) as press:
        pressed = loop_logits(model, ids, 5)
        assert press.stats.compressions == 0 and press.stats.evicted_tokens == 0
    assert_float32_close(pressed, dense, model, CAPACITY, runs=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_restores_the_model_exactly(family):
    model = tiny_model(family, "eager")
    ids = torch.randint(0, 128, (1, 80), generator=torch.Generator().manual_seed(4))
    hooks_before = all_hooks(model)
    before = loop_logits(model, ids, 10)
    press = kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY)
    assert all_hooks(model) > hooks_before
    pressed = loop_logits(model, ids, 10)
    press.remove()
    press.remove()  # idempotent
    assert all_hooks(model) == hooks_before
    after = loop_logits(model, ids, 10)
    assert torch.equal(before, after)
    assert not torch.allclose(pressed, before, atol=1e-3)  # the press did change something while on


def test_context_manager_removes_hooks_when_an_exception_escapes():
    model = tiny_model("llama")
    hooks_before = all_hooks(model)
    with pytest.raises(KeyError):
        with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY):
            assert all_hooks(model) > hooks_before
            raise KeyError("boom")
    assert all_hooks(model) == hooks_before
    kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY).remove()  # and the model is free again


def test_stats_count_what_happened():
    model = tiny_model("gpt_neox")
    ids = torch.randint(0, 128, (1, 50), generator=torch.Generator().manual_seed(5))
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY) as press:
        assert press.stats.cache_length == []
        loop_logits(model, ids, 20)  # 20-token prompt, then 29 single tokens
        stats = press.stats
        assert stats.cache_length == [CAPACITY, CAPACITY]
        assert stats.evicted_tokens == 49 - CAPACITY
        assert stats.compressions == 49 - CAPACITY  # one per call that overflowed
        assert stats.seen_tokens == 49 and stats.streams == 1 and stats.capacity == CAPACITY
        loop_logits(model, ids[:, :10], 5)  # a new cache starts a new stream
        assert press.stats.streams == 2 and press.stats.cache_length == [9, 9]


def test_compression_ratio_sets_capacity_from_each_streams_prompt():
    model = tiny_model("llama")
    with kvl.apply_press(model, n_sink=2, compression_ratio=0.7) as press:
        loop_logits(model, torch.randint(0, 128, (1, 101)), 100)
        assert press.stats.capacity == 30 and press.stats.cache_length == [30, 30]
        loop_logits(model, torch.randint(0, 128, (1, 51)), 50)
        assert press.stats.capacity == 15 and press.stats.cache_length == [15, 15]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunk", [None, 7])
def test_long_prompt_is_prefilled_in_chunks_with_bounded_memory(family, chunk):
    model = tiny_model(family)
    peak = []
    # registered before the press, so it runs before the press trims: it sees the largest cache
    first_attention = kvl.find_adapter(model).attention_modules(model)[0]
    name = kvl.find_adapter(model).cache_kwarg(first_attention)

    def record(module, args, kwargs, output):
        peak.append(kwargs[name].layers[0].keys.shape[-2])

    handle = first_attention.register_forward_hook(record, with_kwargs=True)
    prompt = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(6))
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY, prefill_chunk_size=chunk) as press:
        out = model(input_ids=prompt, use_cache=True)
        assert out.logits.shape == (1, 200, 128)  # every prompt token gets its logits back
        assert press.stats.cache_length == [CAPACITY, CAPACITY]
    handle.remove()
    step = chunk or CAPACITY - N_SINK
    assert max(peak) <= CAPACITY + step
    assert len(peak) == -(-200 // step)


def padded_batch_logits(model, long_row, short_row, new_tokens, shift):
    """generate() over the two rows left-padded into one batch, under a press of capacity 24;
    the raw logits [steps, batch, vocab]."""
    pad = long_row.shape[1] - short_row.shape[1]
    batch = torch.cat([long_row, torch.cat([torch.zeros(1, pad, dtype=torch.long), short_row], 1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    with kvl.apply_press(model, n_sink=N_SINK, capacity=24, position_shift=shift) as press:
        out = model.generate(batch, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        assert press.stats.cache_length == [24, 24]
    return torch.stack(out.logits)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shift", [False, True])
def test_left_padded_batch_rows_match_their_solo_runs(family, shift):
    model = tiny_model(family, "eager")
    gen = torch.Generator().manual_seed(7)
    long_row, short_row = torch.randint(0, 128, (1, 30), generator=gen), torch.randint(0, 128, (1, 12), generator=gen)
    with kvl.apply_press(model, n_sink=N_SINK, capacity=24, position_shift=shift):
        _, solo_long = generate(model, long_row, 40)
        _, solo_short = generate(model, short_row, 40)
    logits = padded_batch_logits(model, long_row, short_row, 40, shift)  # [steps, batch, vocab]
    assert_float32_close(logits[:, 0], solo_long, model, 24 + 1, runs=2)
    assert_float32_close(logits[:, 1], solo_short, model, 24 + 20, runs=2)  # a 20-token chunk sees up to 44


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 0.05), (torch.bfloat16, 0.3)])
@pytest.mark.parametrize("family", FAMILIES)
def test_half_precision_streams_track_float32(family, dtype, tol):
    ids = torch.randint(0, 128, (1, 120), generator=torch.Generator().manual_seed(8))
    model32, model_half = tiny_model(family), tiny_model(family, dtype=dtype)
    with kvl.apply_press(model32, n_sink=N_SINK, capacity=CAPACITY):
        want = loop_logits(model32, ids, 10)
    with kvl.apply_press(model_half, n_sink=N_SINK, capacity=CAPACITY) as press:
        got = loop_logits(model_half, ids, 10)
        assert press.stats.cache_length == [CAPACITY, CAPACITY]
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert (got.float() - want).abs().mean() < tol


def test_sampling_generate_keeps_the_cache_bounded():
    model = tiny_model("llama")
    torch.manual_seed(0)
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY) as press:
        out = model.generate(torch.randint(0, 128, (2, 9)), do_sample=True, top_k=20, max_new_tokens=100,
                             min_new_tokens=100, pad_token_id=0)
        assert out.shape == (2, 109) and press.stats.cache_length == [CAPACITY, CAPACITY]


def test_gpt2_streams_past_n_positions_with_bounded_positions():
    model = tiny_model("gpt2", n_positions=128)
    seen = []
    handle = model.transformer.wpe.register_forward_pre_hook(lambda m, args: seen.append(int(args[0].max())))
    with kvl.apply_press(model, n_sink=N_SINK, capacity=64) as press:
        ids, logits = generate(model, torch.randint(0, 128, (1, 20)), 500)
        assert ids.shape[1] == 520 and torch.isfinite(logits).all()
        assert press.stats.cache_length == [64, 64]
    handle.remove()
    assert max(seen) == 63  # bounded by capacity - 1, reached once the cache is full
    with kvl.apply_press(model, n_sink=N_SINK, capacity=64, position_shift=False):
        with pytest.raises(kvl.UnsupportedGenerationError, match="past the 128 learned positions"):
            generate(model, torch.randint(0, 128, (1, 20)), 200)
    with pytest.raises(ValueError, match="exceeds the 128 learned positions"):
        kvl.apply_press(model, n_sink=N_SINK, capacity=200)


@pytest.mark.parametrize(
    "scaling",
    [{"rope_type": "linear", "factor": 2.0},
     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64},
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}],
    ids=lambda s: s["rope_type"],
)
def test_scaled_rope_keeps_positions_within_the_cache(scaling):
    """One layer: the last token's logits under the press equal the model run densely on just
    the tokens the cache holds, at positions 0..L-1 (the paper's semantics), with the model's
    own scaled rotary embedding."""
    model = tiny_model("llama", num_hidden_layers=1, rope_scaling=dict(scaling))
    ids = torch.randint(0, 128, (1, 90), generator=torch.Generator().manual_seed(9))
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY):
        pressed = loop_logits(model, ids, 1)[-1]
    # the last step feeds token 88; the cache then holds the sinks and tokens 60..87
    visible = list(range(N_SINK)) + list(range(88 - (CAPACITY - N_SINK), 89))
    with torch.no_grad():
        dense = model(input_ids=ids[:, visible]).logits[0, -1]
    assert_float32_close(pressed, dense, model, CAPACITY + 1, runs=2)


def test_dynamic_rope_is_refused_but_allowed_without_shift():
    model = tiny_model("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(kvl.UnsupportedModelError, match="'dynamic' .* not supported"):
        kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY)
    kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY, position_shift=False).remove()


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_rebase_keeps_rope_positions_small_without_changing_logits(family):
    model = tiny_model(family)
    ids = torch.randint(0, 128, (1, 400), generator=torch.Generator().manual_seed(10))
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY):
        plain = loop_logits(model, ids, 10)
    handed = []
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY) as press:
        press.positions.rebase_period = 3 * CAPACITY  # instead of 2**15, so a short test rebases several times
        # registered after the press's own pre-hook, so it sees the positions the press hands on
        handle = model.base_model.register_forward_pre_hook(
            lambda m, args, kwargs: handed.append(int(kwargs["position_ids"].max())), with_kwargs=True)
        rebased = loop_logits(model, ids, 10)
        handle.remove()
    assert max(handed) < 3 * CAPACITY and handed[-1] < 100  # without the rebase the last would be 398
    assert_float32_close(rebased, plain, model, CAPACITY + 1, runs=2)  # other angles, other rounding


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("short_len", [10, 22], ids=["no-real-token-at-first-eviction", "two-real-tokens"])
def test_padded_rows_keep_their_own_sinks_when_the_batch_prompt_overflows(family, shift, short_len):
    """The longest prompt (60) overflows the cache (24), so the batch is prefilled in chunks of 20 and the
    first eviction comes while the short row holds no or only two real tokens: it must still end up with its
    own first four tokens as sinks, exactly like its solo run (issue 8)."""
    model = tiny_model(family, "eager")
    gen = torch.Generator().manual_seed(11)
    long_row, short_row = torch.randint(0, 128, (1, 60), generator=gen), torch.randint(0, 128, (1, short_len), generator=gen)
    with kvl.apply_press(model, n_sink=N_SINK, capacity=24, position_shift=shift):
        _, solo_short = generate(model, short_row, 60)
    logits = padded_batch_logits(model, long_row, short_row, 60, shift)
    assert_float32_close(logits[:, 1], solo_short, model, 24 + 20, runs=2)  # a 20-token chunk sees up to 44
