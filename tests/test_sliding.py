"""Sliding-window cache layers beside the press (Mistral, Gemma 2/3, Qwen2 with
use_sliding_window, ...). A layer that keeps more than the capacity is trimmed like a full
layer; one narrower than the press's window is left to transformers; in between is refused
at apply_press. References are dense forwards of the same model without the press."""

import pytest
import torch
from transformers import DynamicCache

import kvpress_lite as kvl
from bounds import assert_float32_close
from helpers import cache_kwarg
from tiny_models import tiny_model

N_SINK, CAPACITY = 2, 16
WINDOW = CAPACITY - N_SINK


def sliding_model(window, layer_types):
    return tiny_model("qwen2", num_hidden_layers=len(layer_types), use_sliding_window=True,
                      sliding_window=window, layer_types=layer_types, max_window_layers=0)


@torch.no_grad()
def stream(model, ids, prompt_len=4):
    """Prompt, then token by token; returns the logits of the last token of every call and the cache."""
    cache, name = DynamicCache(config=model.config), cache_kwarg(model)
    out = model(input_ids=ids[:, :prompt_len], use_cache=True, **{name: cache})
    logits = [out.logits[0, -1]]
    for t in range(prompt_len, ids.shape[1]):
        logits.append(model(input_ids=ids[:, t : t + 1], use_cache=True, **{name: cache}).logits[0, -1])
    return torch.stack(logits), cache


@torch.no_grad()
def dense_last(model, tokens, positions):
    return model(input_ids=tokens.view(1, -1), position_ids=torch.tensor([positions]),
                 attention_mask=torch.ones(1, len(positions), dtype=torch.long), use_cache=False).logits[0, -1]


@pytest.mark.parametrize("shift", [True, False], ids=["shifted", "absolute"])
def test_a_sliding_layer_wider_than_the_capacity_is_pressed_exactly(shift):
    model = sliding_model(24, ["sliding_attention"])  # keeps 23 > 16: the press trims it
    ids = torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(0))
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY, position_shift=shift, adapter="llama") as press:
        got, cache = stream(model, ids)
        assert press.stats.cache_length == [CAPACITY]
    assert cache.layers[0].keys.shape[-2] == CAPACITY
    for row, t in enumerate(range(3, 60)):
        kept = [j for j in range(t + 1) if j < N_SINK or j >= t - WINDOW]
        positions = list(range(len(kept))) if shift else kept
        ref = dense_last(model, ids[0, kept], positions)  # one layer: keys depend on token and position only
        assert_float32_close(got[row], ref, model, CAPACITY + 1, runs=2)


def test_a_sliding_layer_narrower_than_the_window_is_left_alone():
    model = sliding_model(8, ["sliding_attention", "full_attention"])  # keeps 7 <= window 14
    ids = torch.randint(0, 128, (1, 50), generator=torch.Generator().manual_seed(1))
    _, dense_cache = stream(model, ids)
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY, position_shift=False, adapter="llama") as press:
        _, cache = stream(model, ids)
        assert press.stats.cache_length == [7, CAPACITY]  # what each layer really holds
    # the sliding layer runs first and never sees the press: its cache is the dense model's
    assert cache.layers[0].keys.shape[-2] == 7
    torch.testing.assert_close(cache.layers[0].keys, dense_cache.layers[0].keys, atol=0, rtol=0)
    assert cache.layers[1].keys.shape[-2] == CAPACITY < dense_cache.layers[1].keys.shape[-2]


def test_a_pressed_sliding_layer_bounds_the_chunks_of_a_long_prompt():
    model = sliding_model(24, ["sliding_attention", "full_attention"])
    ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(2))
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY, adapter="llama") as press:
        out = model(input_ids=ids, use_cache=True)  # 100 tokens in one call: chunks of at most 23 - 16 = 7
        assert out.logits.shape[1] == 100 and torch.isfinite(out.logits).all()
        assert press.stats.cache_length == [CAPACITY, CAPACITY]


def test_a_sliding_window_between_window_and_capacity_is_refused_at_apply_press():
    model = sliding_model(16, ["sliding_attention", "full_attention"])  # keeps 15: 14 < 15 <= 16
    with pytest.raises(kvl.UnsupportedModelError, match=r"config.sliding_window=16.*capacity <= 14.*capacity >= 17"):
        kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY, adapter="llama")
    with pytest.raises(kvl.UnsupportedModelError, match="not compression_ratio"):
        kvl.apply_press(model, n_sink=N_SINK, compression_ratio=0.5, adapter="llama")
    kvl.apply_press(model, n_sink=N_SINK, capacity=14, adapter="llama").remove()
    kvl.apply_press(model, n_sink=N_SINK, capacity=17, adapter="llama").remove()


def test_every_layer_sliding_and_narrow_is_refused():
    model = sliding_model(8, ["sliding_attention"])
    with pytest.raises(kvl.UnsupportedModelError, match="nothing for the press to bound"):
        kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY, adapter="llama")


def test_a_cache_built_without_the_config_is_refused_on_a_sliding_model():
    model = sliding_model(8, ["sliding_attention", "full_attention"])
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(3))
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY, adapter="llama"):
        with pytest.raises(kvl.UnsupportedGenerationError, match=r"DynamicCache\(config=model.config\)"):
            model(input_ids=ids, use_cache=True, **{cache_kwarg(model): DynamicCache()})
        out = model(input_ids=ids, use_cache=True)  # the model's own cache is built from its config
        assert torch.isfinite(out.logits).all()
