"""The press over transformers' quantized KV cache.

The fp8 backend (``QuantizedCache(backend="fp8")``, ``Fp8QuantizedLayer``) stores float8 entries
at one per-tensor scale frozen by the first update, appended as they come: the press drops and
keeps its entries exactly (as bytes) and writes re-positioned sinks back at that scale. Checked:
no-op while the stream fits (bit-equal), absolute positions equal the same fp8 cache without the
press under the sink+window mask, the sinks equal an independent rotate-half rotation of their
first dequantized values re-quantized at the layer's scale, and the memory against the
unquantized press at equal capacity. The quanto / HQQ backends re-quantize their whole block at
every flush: refused by name.
"""

from __future__ import annotations

import pytest
import torch
import transformers
import transformers.cache_utils as cache_utils

import kvpress_lite as kvl
from bounds import float32_bound
from kvpress_lite.tiny import tiny_model

N_SINK, CAPACITY, STREAM = 2, 8, 40
HAS_FP8 = hasattr(cache_utils, "Fp8QuantizedLayer")
needs_fp8 = pytest.mark.skipif(not HAS_FP8, reason="this transformers has no fp8 cache layer "
                               "(test_group_wise_quantized_caches_are_refused covers its backends)")


def fp8_cache(model):
    return transformers.QuantizedCache(backend="fp8", config=model.config)


@torch.no_grad()
def stream(model, ids, cache, extra=None):
    out = model(input_ids=ids[:, :4], past_key_values=cache, use_cache=True)
    logits = [out.logits[0, -1]]
    for t in range(4, ids.shape[1]):
        kwargs = extra(t) if extra else {}
        out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True, **kwargs)
        logits.append(out.logits[0, -1])
    return torch.stack(logits), cache


def ids_of(seed=0):
    return torch.randint(0, 128, (1, STREAM), generator=torch.Generator().manual_seed(seed))


@needs_fp8
def test_fp8_no_op_while_the_stream_fits():
    model = tiny_model("llama", 2)
    want, _ = stream(model, ids_of(), fp8_cache(model))
    with kvl.apply_press(model, n_sink=N_SINK, capacity=64):
        got, _ = stream(model, ids_of(), fp8_cache(model))
    assert torch.equal(got, want)


@needs_fp8
def test_fp8_at_absolute_positions_equals_the_fp8_cache_under_the_sink_window_mask():
    model = tiny_model("llama", 2)
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY, position_shift=False):
        got, cache = stream(model, ids_of(), fp8_cache(model))
    assert all(layer._quantized_keys[0].shape[-2] == CAPACITY == layer.cumulative_length for layer in cache.layers)

    def visible(t):  # the reference: no press, every entry kept, the evicted ones masked out
        mask = torch.tensor([[1 if j < N_SINK or j >= t - (CAPACITY - N_SINK) else 0 for j in range(t + 1)]])
        return dict(attention_mask=mask, position_ids=torch.tensor([[t]]))

    want, _ = stream(model, ids_of(), fp8_cache(model), visible)
    scale = want.abs().max().clamp(min=1.0)
    assert float((got - want).abs().max() / scale) <= float32_bound(model.config, STREAM, runs=2)


def rotate_half_by(x: torch.Tensor, shift: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE rotation of keys ``[..., seq, head_dim]`` by ``shift`` positions, rotate-half layout, float64."""
    angle = shift * inv_freq.double()
    cos, sin = torch.cat([angle.cos()] * 2), torch.cat([angle.sin()] * 2)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x.double() * cos + rotated * sin


@needs_fp8
def test_fp8_sinks_are_their_first_values_rotated_and_requantized_at_the_layer_scale():
    model = tiny_model("llama", 1)
    ids = ids_of(1)
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY):
        _, cache = stream(model, ids[:, :CAPACITY], fp8_cache(model))  # full, nothing evicted yet
        layer = cache.layers[0]
        data, scale = layer._quantized_keys
        first = data[..., :N_SINK, :].float() * scale  # the sinks as stored at positions 0, 1
        out = None
        for t in range(CAPACITY, STREAM):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
    evicted = STREAM - CAPACITY
    want = rotate_half_by(first, evicted, model.model.rotary_emb.inv_freq)
    data, scale = cache.layers[0]._quantized_keys
    got = data[..., :N_SINK, :].float().double() * scale
    step = want.abs() * 2.0**-3 + float(scale) * 2.0**-9  # one e4m3 step (3 mantissa bits; subnormals)
    assert out is not None and bool(((got - want).abs() <= step).all())
    assert not torch.allclose(got, first.double())  # they did move


@needs_fp8
def test_fp8_press_memory_against_the_unquantized_press_at_equal_capacity():
    model = tiny_model("llama", 2)

    def kv_bytes(cache) -> int:
        total = 0
        for layer in cache.layers:
            tensors = [layer._quantized_keys[0], layer._quantized_values[0]] if hasattr(layer, "_quantized_keys") \
                else [layer.keys, layer.values]
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total

    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY):
        _, quantized = stream(model, ids_of(), fp8_cache(model))
        _, full = stream(model, ids_of(), transformers.DynamicCache(config=model.config))
    assert kv_bytes(full) == 4 * kv_bytes(quantized)  # float32 entries against one byte each, same entries


def test_group_wise_quantized_caches_are_refused():
    """quanto / HQQ: a block re-quantized as a whole at every flush; trimming it is not exact."""
    from transformers.cache_utils import QuantizedLayer

    class Probe(QuantizedLayer):  # the layer class both backends share, without their packages
        def _quantize(self, tensor, axis):
            return tensor

        def _dequantize(self, q_tensor):
            return q_tensor

    model = tiny_model("llama", 2)
    cache = transformers.DynamicCache(config=model.config)
    cache.layers = [Probe(residual_length=4) for _ in cache.layers]
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY):
        with pytest.raises(kvl.UnsupportedGenerationError, match="quanto / HQQ"):
            model(input_ids=ids_of()[:, :4], past_key_values=cache, use_cache=True)


@needs_fp8
def test_fp8_generate_equals_a_plain_loop_under_the_press():
    model = tiny_model("llama", 2)
    prompt = ids_of(3)[:, :4]  # the prompt the loop takes in one call: fp8's scale is frozen by the first update
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY):
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), past_key_values=fp8_cache(model),
                             max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
        loop, cache = stream(model, out.sequences[:, :-1], fp8_cache(model))
    gen = torch.stack(out.logits)[:, 0]
    assert out.sequences.shape[1] == 34 and max(layer.get_seq_length() for layer in cache.layers) == CAPACITY
    assert float((gen - loop).abs().max() / loop.abs().max().clamp(min=1.0)) <= float32_bound(
        model.config, CAPACITY + 1, runs=2)
