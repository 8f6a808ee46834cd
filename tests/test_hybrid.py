"""Hybrid models (attention layers beside SSM / linear-attention / convolution layers) under the press.

The semantics (README, "Hybrid models"): the recurrent layers see the whole stream, the attention
layers see sinks + window. Checked here on a tiny Qwen3.5 text model (linear attention + full
attention) streamed past 10x its capacity, against an independent reference written plainly: one
dense forward over the whole stream at absolute positions, in which the attention layer gets a 4D
mask of what each query kept and the linear-attention layer gets none (it runs over every token).
"""

from __future__ import annotations

import pytest
import torch
import transformers

import kvpress_lite as kvl
from bounds import float32_bound
from kvpress_lite.cache_access import model_cache_kwarg
from kvpress_lite.tiny import tiny_model

N_SINK, CAPACITY, STREAM = 2, 8, 96  # 12x the capacity
V5 = int(transformers.__version__.split(".")[0]) >= 5
on_5 = pytest.mark.skipif(not V5, reason="hybrids are served on transformers >= 5 (test_hybrids_are_refused_on_4x)")


@pytest.mark.skipif(V5, reason="the 4.x refusal; 5.x serves hybrids (the tests below)")
def test_hybrids_are_refused_on_4x():
    """4.5x keeps a hybrid's recurrent state in family-specific cache classes: refused by name."""
    model = tiny_model("lfm2", 2)
    with pytest.raises(kvl.UnsupportedModelError, match="transformers >= 5"):
        kvl.apply_press(model, capacity=CAPACITY)


def hybrid(attn: str = "eager"):
    model = tiny_model("qwen3_5_text", 2, attn, layer=[0, 3])  # layer 0 linear attention, layer 1 full attention
    assert list(model.config.layer_types) == ["linear_attention", "full_attention"]
    return model


def state_bytes(layer) -> dict:
    """Bytes per kind of tensor a cache layer holds: its keys/values, and its conv / recurrent states."""
    out = {}
    for name in ("keys", "values"):
        t = getattr(layer, name, None)
        if isinstance(t, torch.Tensor):
            out[name] = t.numel() * t.element_size()
    for name in ("conv_states", "recurrent_states"):
        for i, t in (getattr(layer, name, None) or {}).items():
            if isinstance(t, torch.Tensor):
                out[f"{name}[{i}]"] = t.numel() * t.element_size()
    return out


@torch.no_grad()
def stream(model, ids, cache_sizes=None):
    name = model_cache_kwarg(model)
    out = model(input_ids=ids[:, :4], use_cache=True)
    cache, logits = out.past_key_values, [out.logits[0, -1]]
    for t in range(4, ids.shape[1]):
        out = model(input_ids=ids[:, t : t + 1], use_cache=True, **{name: cache})
        logits.append(out.logits[0, -1])
        if cache_sizes is not None:
            cache_sizes.append([state_bytes(layer) for layer in cache.layers])
    return torch.stack(logits), cache


@on_5
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_hybrid_past_10x_its_capacity_is_exact_and_constant_in_every_layer(attn):
    model = hybrid(attn)
    ids = torch.randint(0, 128, (1, STREAM), generator=torch.Generator().manual_seed(3))
    sizes: list = []
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY, position_shift=False):
        got, cache = stream(model, ids, sizes)
    # memory: from the step the cache is full to the end, every layer holds the same bytes
    full = sizes[CAPACITY - 4:]
    assert all(s == full[0] for s in full), "a layer's state changed size after the cache was full"
    assert full[0][0] and "keys" not in full[0][0]  # layer 0: recurrent state only
    assert full[0][1]["keys"] == cache.layers[1].keys.element_size() * cache.layers[1].keys[0].numel()
    assert cache.layers[1].keys.shape[-2] == CAPACITY

    # the reference: query i of the attention layer sees the sinks and the CAPACITY - N_SINK keys before it
    allowed = torch.zeros(STREAM, STREAM, dtype=torch.bool)
    for i in range(STREAM):
        for j in range(i + 1):
            allowed[i, j] = j < N_SINK or j >= i - (CAPACITY - N_SINK)
    mask = torch.zeros(STREAM, STREAM).masked_fill(~allowed, torch.finfo(torch.float32).min).view(1, 1, STREAM, STREAM)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask={"full_attention": mask, "linear_attention": None},
                    position_ids=torch.arange(STREAM).view(1, -1), use_cache=False).logits[0, 3:]
    scale = ref.abs().max().clamp(min=1.0)
    assert float((got - ref).abs().max() / scale) <= float32_bound(model.config, STREAM, runs=2)


@on_5
def test_the_recurrent_layers_carry_what_the_attention_layers_evicted():
    """The point of a hybrid under the press: change a token the attention layer has evicted
    (neither a sink nor in the window), and the last logits still change, through the
    linear-attention layer's state; a one-layer attention model under the same press cannot tell
    (its kept keys depend only on their own tokens).
    (The tiny model's random gates decay its state by ~0.15 a token, so the token is taken
    10 back, not 30: further back its trace is below float32.)"""
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(4))
    other = ids.clone()
    evicted = 40 - CAPACITY - 2  # the last token keeps the sinks and 33..39
    other[0, evicted] = (other[0, evicted] + 1) % 128
    for model, carries in ((hybrid(), True), (tiny_model("llama", 1), False)):
        with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY):
            a, _ = stream(model, ids)
            b, _ = stream(model, other)
        moved = float((a[-1] - b[-1]).abs().max())
        assert (moved > 1e-3) if carries else (moved == 0.0), (type(model).__name__, moved)


@on_5
def test_padded_batches_on_a_hybrid_are_refused_at_the_call():
    model = hybrid()
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY):
        with pytest.raises(kvl.UnsupportedGenerationError, match="padded batches are not supported on hybrid"):
            model(input_ids=ids, attention_mask=mask, use_cache=True)


def test_verify_on_a_hybrid_checks_its_attention_layers_and_names_its_recurrent_ones():
    if not V5:
        pytest.skip("hybrids are served on transformers >= 5 (test_hybrids_are_refused_on_4x)")
    report = kvl.verify(tiny_model("qwen3_5_text", 4))
    assert report.exact, str(report)
    kinds = {(c.name, c.layers.split(" (")[0]): c.status for c in report.checks}
    assert kinds[("shifted", "full_attention")] == "exact"
    assert kinds[("shifted", "linear_attention")] == "not applicable"


def test_a_pure_recurrent_model_is_refused_as_already_constant():
    model = tiny_model("mamba", 2)
    with pytest.raises(kvl.UnsupportedModelError, match="already runs at constant memory"):
        kvl.apply_press(model, capacity=CAPACITY)



@pytest.mark.skipif(V5, reason="the 4.x refusal; 5.x serves latent attention (tests/test_mla.py)")
def test_mla_is_refused_on_4x():
    with pytest.raises(kvl.UnsupportedModelError, match="transformers >= 5"):
        kvl.apply_press(tiny_model("deepseek_v3", 1), capacity=CAPACITY)


@on_5
@torch.no_grad()
def test_bamba_under_the_press_numbers_a_plain_loop_as_its_dense_forward():
    """Bamba (transformers 5.25) numbers each call's tokens from 0 when handed no position_ids, so its
    own plain decoding loop puts every new token at RoPE position 0 (generate() hands positions). The
    press hands every call its positions: a pressed plain loop over a stream that fits equals one
    dense forward over the stream, whatever the unpressed loop does."""
    model = tiny_model("bamba", 2)
    ids = torch.randint(0, 128, (1, CAPACITY), generator=torch.Generator().manual_seed(6))
    dense = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0]
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY):
        cache, got = None, []
        for t in range(CAPACITY):
            kwargs = {} if cache is None else {model_cache_kwarg(model): cache}
            out = model(input_ids=ids[:, t:t + 1], use_cache=True, **kwargs)
            cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache
            got.append(out.logits[0, -1])
    bound = float32_bound(model.config, CAPACITY, runs=2)
    err = float((torch.stack(got) - dense).abs().max() / dense.abs().max().clamp(min=1))
    assert err <= bound, (err, bound)
