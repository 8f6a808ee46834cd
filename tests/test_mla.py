"""Multi-head latent attention (DeepSeek V2/V3 layout): the cache's value slot holds the rotated
key part, which the press re-rotates. Checked on a tiny DeepSeek V3 streamed far past its
capacity, against one dense forward written plainly: for each scored token, the one-layer model
over the tokens the press kept (sinks, window, the token) at positions 0..L-1."""

from __future__ import annotations

import pytest
import torch
import transformers

import kvpress_lite as kvl
from bounds import float32_bound
from kvpress_lite.tiny import tiny_model

pytestmark = pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5,
                                reason="4.x caches the expanded keys: refused there (test_mla_is_refused_on_4x)")
N_SINK, CAPACITY, STREAM = 2, 8, 90


@torch.no_grad()
def test_latent_attention_past_10x_its_capacity_matches_the_kept_tokens_at_cache_positions():
    model = tiny_model("deepseek_v3", 1)
    ids = torch.randint(0, 128, (1, STREAM), generator=torch.Generator().manual_seed(11))
    got = []
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY) as press:
        out = model(input_ids=ids[:, :1], use_cache=True)
        cache = out.past_key_values
        for t in range(1, STREAM):
            out = model(input_ids=ids[:, t : t + 1], use_cache=True, past_key_values=cache)
            got.append(out.logits[0, -1])
        assert press.positions.rotary_slot == "values"
    layer = cache.layers[0]
    assert layer.keys.shape[-2] == layer.values.shape[-2] == CAPACITY  # latent and rotary part, both bounded
    worst = 0.0
    for row, t in enumerate(range(1, STREAM)):
        kept = [j for j in range(t + 1) if j < N_SINK or j >= t - (CAPACITY - N_SINK)]
        ref = model(input_ids=ids[:, kept], attention_mask=torch.ones(1, len(kept), dtype=torch.long),
                    position_ids=torch.arange(len(kept)).view(1, -1), use_cache=False).logits[0, -1]
        worst = max(worst, float((got[row] - ref).abs().max() / ref.abs().max().clamp(min=1.0)))
    assert worst <= float32_bound(model.config, CAPACITY + 1, runs=2), worst


def test_verify_on_latent_attention_checks_its_value_slot_rotation():
    report = kvl.verify(tiny_model("deepseek_v3", 2))
    assert report.exact and any(c.name == "shifted" and c.status == "exact" for c in report.checks), str(report)
