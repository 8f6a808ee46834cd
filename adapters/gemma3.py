"""Gemma 3 (text): attention at ``model.layers[i].self_attn``, rotate-half RoPE with two
bases (local layers 10k, global layers 1M), and sliding-window layers five out of six.

The two bases live in one rotary module (``{layer_type}_inv_freq`` buffers, transformers
5.x) or in two modules (``rotary_emb`` for global layers and ``rotary_emb_local`` for the
sliding ones, transformers 4.5x): the positions factory below reads whichever is there,
one frequency tensor per layer. The sliding layers are planned by the press itself (see
``attachment.plan_layers``): trimmed like full layers when their window (512 for the 270M
model) is wider than the capacity, left alone when it fits inside the press's window.
"""

import kvpress_lite as kvl
from kvpress_lite.adapter import base_model
from kvpress_lite.positions import rope_type


def gemma3_positions(model) -> kvl.Rotary:
    config, base = model.config, base_model(model)
    types = list(config.layer_types)
    rotary = base.rotary_emb
    if hasattr(rotary, "full_attention_inv_freq") or hasattr(rotary, "sliding_attention_inv_freq"):  # 5.x
        return kvl.rope_positions("rotary_emb", per_layer_type=True)(model)
    local = getattr(base, "rotary_emb_local", None)
    if local is None:
        raise kvl.UnsupportedModelError(
            f"{type(model).__name__}: found neither per-layer-type inv_freq buffers nor rotary_emb_local; the gemma3 "
            "adapter needs updating for this transformers release"
        )
    freqs = {"full_attention": rotary.inv_freq.double(), "sliding_attention": local.inv_freq.double()}
    return kvl.Rotary(inv_freq=[freqs[kind] for kind in types], rope_type=rope_type(config),
                      description="RoPE (rotate-half, local and global bases)")


@kvl.hookimpl
def kvpress_lite_register_adapters(register):
    register(
        kvl.Adapter(
            name="gemma3",
            model_types=("gemma3_text",),
            attention_path="layers.*.self_attn",
            positions=gemma3_positions,
            description="Gemma 3 text (two RoPE bases, sliding + global layers)",
        )
    )
