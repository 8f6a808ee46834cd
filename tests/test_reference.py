"""Checks of the independent reference forward (tests/reference.py) and of the
tiny models (tests/tiny_models.py) against Hugging Face's own forward passes."""

import pytest
import torch

from bounds import assert_float32_close
from reference import dense_visible, reference_logits, streaming_visible
from tiny_models import FAMILIES, tiny_model

ALL_FAMILIES = FAMILIES + ("qwen2",)
ROPE_FAMILIES = tuple(f for f in ALL_FAMILIES if f != "gpt2")


def _ids(T, seed=1):
    return torch.randint(0, 128, (T,), generator=torch.Generator().manual_seed(seed))


def _hf_logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids[None], **kwargs).logits[0].double()


def _additive_mask(visible, T):
    """4D float mask [1, 1, T, T]: 0 where visible, dtype-min elsewhere.
    (A *boolean* 4D mask is silently added as 0/1 by eager attention.)"""
    allowed = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        allowed[i, list(visible(i))] = True
    return torch.zeros(1, 1, T, T).masked_fill(~allowed, torch.finfo(torch.float32).min)


# ----------------------------------------------------------------------------
# reference vs HF


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_dense_matches_hf(family, attn):
    model = tiny_model(family, attn)
    ids = _ids(160)
    ref = reference_logits(model, ids, dense_visible)
    assert ref.dtype == torch.float64 and ref.shape == (160, 128)
    assert_float32_close(_hf_logits(model, ids), ref, model, 160, runs=1)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_window_matches_hf_with_4d_mask(family, attn):
    """Absolute positions + a sink/window pattern == HF fed the same pattern as a mask."""
    model = tiny_model(family, attn)
    T = 96
    ids = _ids(T)
    visible = streaming_visible(n_sink=4, capacity=16)
    ref = reference_logits(model, ids, visible)
    hf = _hf_logits(model, ids, attention_mask=_additive_mask(visible, T))
    assert_float32_close(hf, ref, model, T, runs=1)


@pytest.mark.parametrize("family", ROPE_FAMILIES)
def test_cache_positions_match_hf_on_visible_subsequence(family):
    """One layer: query i in "cache" mode sees exactly what a dense forward over
    the tokens visible(i), at positions 0..n-1, gives for its last token."""
    model = tiny_model(family, num_hidden_layers=1)
    T = 80
    ids = _ids(T)
    visible = streaming_visible(n_sink=4, capacity=16)
    ref = reference_logits(model, ids, visible, rope_positions="cache")
    for i in (3, 16, 17, 30, 79):
        sub = ids[list(visible(i))]
        assert_float32_close(_hf_logits(model, sub)[-1], ref[i], model, len(sub), runs=1)


def test_gpt2_token_positions_match_hf_position_ids():
    model = tiny_model("gpt2", n_positions=128)
    T = 48
    ids = _ids(T)
    positions = [min(i, 5) + 2 * max(i - 5, 0) for i in range(T)]  # any ids < n_positions
    ref = reference_logits(model, ids, dense_visible, token_positions=positions)
    hf = _hf_logits(model, ids, position_ids=torch.tensor([positions]))
    assert_float32_close(hf, ref, model, T, runs=1)
    assert (ref - reference_logits(model, ids)).abs().max() > 1e-2  # wpe matters
    with pytest.raises(IndexError):  # like HF on CPU past n_positions
        reference_logits(model, _ids(130))


# ----------------------------------------------------------------------------
# sanity of the modes and patterns


@pytest.mark.parametrize("family", ROPE_FAMILIES)
def test_cache_equals_absolute_when_dense(family):
    model = tiny_model(family)
    ids = _ids(64)
    absolute = reference_logits(model, ids, dense_visible, "absolute")
    cache = reference_logits(model, ids, dense_visible, "cache")
    # float64 throughout, and dense: the same rotations by another route (~1e-13 of rounding)
    assert (absolute - cache).abs().max() < 1e-10


@pytest.mark.parametrize("family", ROPE_FAMILIES)
def test_cache_differs_from_absolute_with_window(family):
    model = tiny_model(family)
    T, capacity = 96, 16
    ids = _ids(T)
    visible = streaming_visible(n_sink=4, capacity=capacity)
    absolute = reference_logits(model, ids, visible, "absolute")
    cache = reference_logits(model, ids, visible, "cache")
    # a query at i <= capacity sees everything, so its cache ranks are its positions
    assert (absolute[: capacity + 1] - cache[: capacity + 1]).abs().max() < 1e-10
    assert (absolute[capacity + 1 :] - cache[capacity + 1 :]).abs().max() > 1e-2


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_window_changes_logits_only_after_capacity(family):
    """Weights are large enough that dropping keys changes the output visibly."""
    model = tiny_model(family)
    T, capacity = 96, 16
    ids = _ids(T)
    dense = reference_logits(model, ids)
    window = reference_logits(model, ids, streaming_visible(n_sink=4, capacity=capacity))
    assert (dense[: capacity + 1] - window[: capacity + 1]).abs().max() < 1e-10
    per_token = (dense - window).abs().amax(-1)[capacity + 1 :]
    assert per_token.min() > 1e-3
    assert per_token.mean() > 1e-1


def test_streaming_visible():
    vis = streaming_visible(n_sink=2, capacity=5)  # window W = 3
    assert list(vis(0)) == [0]
    assert list(vis(5)) == [0, 1, 2, 3, 4, 5]  # capacity + 1 keys, nothing dropped yet
    assert list(vis(9)) == [0, 1, 6, 7, 8, 9]  # sinks + W predecessors + itself
    chunked = streaming_visible(n_sink=2, capacity=5, chunk_starts=[0, 8])
    assert list(chunked(7)) == list(range(8))  # first chunk: s = 0
    assert list(chunked(10)) == [0, 1, 5, 6, 7, 8, 9, 10]  # s = 8: j >= 8 - 3
    assert list(streaming_visible(2, 5, lambda i: 8 if i >= 8 else 0)(10)) == list(chunked(10))
    assert list(streaming_visible(0, 3)(9)) == [6, 7, 8, 9]  # window only
    assert list(dense_visible(3)) == [0, 1, 2, 3]


def test_bad_visible_is_rejected():
    model = tiny_model("llama")
    with pytest.raises(ValueError):
        reference_logits(model, _ids(8), lambda i: [0])  # does not end with i
    with pytest.raises(ValueError):
        reference_logits(model, _ids(8), dense_visible, rope_positions="relative")


# ----------------------------------------------------------------------------
# the tiny models themselves


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_tiny_model_is_deterministic(family):
    a, b = tiny_model(family), tiny_model(family, "sdpa")
    assert not a.training
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    half = tiny_model(family, dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16
    assert torch.equal(next(half.parameters()), next(a.parameters()).to(torch.bfloat16))


def test_tiny_model_shapes():
    neox = tiny_model("gpt_neox")
    assert neox.gpt_neox.layers[0].attention.rotary_ndims == 4  # 0.25 of head_size 16
    assert neox.config.use_parallel_residual
    llama = tiny_model("llama")
    assert llama.config.num_key_value_heads == 2 and llama.config.num_attention_heads == 4
    assert tiny_model("gpt2").config.n_positions == 1024
    assert tiny_model("gpt2", n_positions=128).transformer.wpe.weight.shape == (128, 64)
    half_rotary = tiny_model("gpt_neox", partial_rotary_factor=0.5)
    assert half_rotary.gpt_neox.layers[0].attention.rotary_ndims == 8
    assert tiny_model("qwen2").config.sliding_window is None
