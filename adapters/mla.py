"""Multi-head latent attention (DeepSeek V2 / V3 and the families built on its layout).

On transformers 5.x the attention calls ``cache.update(kv_nope, k_rot, ...)``: the cache's key
slot holds the position-free latent ``[batch, 1, seq, kv_lora_rank]`` and its value slot the
rotated shared key part ``[batch, 1, seq, qk_rope_head_dim]``. Both trim along the sequence like
any cache; re-positioning the sinks means rotating the *value* slot
(``rope_positions(..., rotary_slot="values")``). DeepSeek V3's layout is rotate-half (its
``rope_interleave`` weights are de-interleaved before the cache), DeepSeek V2 rotates
interleaved pairs. Kimi-Linear's latent attention layers carry no positions (NoPE), beside its
linear-attention layers (a hybrid: see adapters/hybrid.py). Each type passed the conformance
checks (eager and sdpa) on transformers 5.25; 4.5x cached the expanded keys instead, so these
are refused there.
"""

import kvpress_lite as kvl

from ._verified import from_transformers_5

HALF = ("deepseek_v3", "glm4_moe_lite", "minicpm3", "youtu", "sarvam_mla", "axk1", "bailing_hybrid")
INTERLEAVED = ("deepseek_v2",)
NOPE = ("kimi_linear",)
ALL = HALF + INTERLEAVED + NOPE
WHY = "its latent attention cached the expanded keys and values there, not the latent and its rotary part"


def _v5(factory):
    return from_transformers_5(factory, ALL, WHY)


@kvl.hookimpl
def kvpress_lite_register_adapters(register):
    register(kvl.Adapter(name="mla", model_types=HALF, attention_path="layers.*.self_attn",
                         positions=_v5(kvl.rope_positions("rotary_emb", rotary_slot="values")),
                         description="multi-head latent attention (rotate-half RoPE part in the value slot)"))
    register(kvl.Adapter(name="mla_interleaved", model_types=INTERLEAVED, attention_path="layers.*.self_attn",
                         positions=_v5(kvl.rope_positions("rotary_emb", interleaved=True, rotary_slot="values")),
                         description="multi-head latent attention (interleaved RoPE part in the value slot)"))
    register(kvl.Adapter(name="mla_nope", model_types=NOPE, attention_path="layers.*.self_attn",
                         positions=_v5(kvl.no_positions()),
                         description="latent attention without positions beside linear-attention layers"))
