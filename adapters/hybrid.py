"""Hybrid models: attention layers beside SSM / linear-attention / convolution layers.

The press trims the attention layers (full and sliding) of a hybrid's cache to sinks + window
and leaves every other layer's state alone: transformers 5.x keeps those in
``LinearAttentionLayer`` entries of the same ``DynamicCache`` (a convolution window and a
recurrent state of fixed size), so the whole model runs at constant memory, and its
recurrent layers keep carrying what they took from the tokens the attention layers evicted.
Semantics (tests/conformance, check (f)): recurrent layers see the whole stream; attention
layers see sinks + window at positions within the cache.

The attention modules sit at ``model.layers[i].self_attn`` only in the layers that have one,
each with its own ``layer_idx`` (the press reads it), and take rotate-half RoPE from the base
model's ``rotary_emb`` (partial where the family rotates part of each head: the rotary dims
are read off ``inv_freq``). Qwen3.5's M-RoPE sections collapse to plain RoPE for text, where
the temporal, height and width positions are the same.

Verified on transformers >= 5 only: 4.5x keeps these states in family-specific cache classes.
"""

import kvpress_lite as kvl

from ._verified import from_transformers_5

# falcon_h1: Mamba-2 and attention in parallel in every layer, on one combined cache layer
ROPE = ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next", "lfm2", "bamba", "falcon_h1")
ROPE_PER_LAYER_TYPE = ("lfm3",)  # one `<layer_type>_inv_freq` per attention layer type
ROPE_POS_EMB = ("lfm2_moe",)  # its rotary module is the base model's `pos_emb`
NOPE = ("jamba", "granitemoehybrid")  # attention layers without positions
NOPE_MIXER = ("nemotron_h",)  # every layer's mixer takes the cache: Mamba-2, attention, MLP or MoE
MODEL_TYPES = ROPE + ROPE_PER_LAYER_TYPE + ROPE_POS_EMB + NOPE + NOPE_MIXER

WHY = "its recurrent layers live in a family-specific cache class there, not in DynamicCache's LinearAttentionLayer"


def _v5(factory):
    return from_transformers_5(factory, MODEL_TYPES, WHY)


@kvl.hookimpl
def kvpress_lite_register_adapters(register):
    what = "attention layers pressed, recurrent layers left whole"
    register(kvl.Adapter(name="hybrid", model_types=ROPE, attention_path="layers.*.self_attn",
                         positions=_v5(kvl.rope_positions("rotary_emb")),
                         description=f"hybrid (rotate-half RoPE): {what}"))
    register(kvl.Adapter(name="hybrid_per_layer_type", model_types=ROPE_PER_LAYER_TYPE,
                         attention_path="layers.*.self_attn",
                         positions=_v5(kvl.rope_positions("rotary_emb", per_layer_type=True)),
                         description=f"hybrid (RoPE with one base per layer type): {what}"))
    register(kvl.Adapter(name="hybrid_lfm2_moe", model_types=ROPE_POS_EMB, attention_path="layers.*.self_attn",
                         positions=_v5(kvl.rope_positions("pos_emb")),
                         description=f"LFM2-MoE hybrid (rotate-half RoPE at pos_emb): {what}"))
    register(kvl.Adapter(name="hybrid_nope", model_types=NOPE, attention_path="layers.*.self_attn",
                         positions=_v5(kvl.no_positions()),
                         description=f"hybrid (no positions in attention): {what}"))
    register(kvl.Adapter(name="nemotron_h", model_types=NOPE_MIXER, attention_path="layers.*.mixer",
                         positions=_v5(kvl.no_positions()),
                         description=f"Nemotron-H hybrid (no positions in attention): {what}"))
