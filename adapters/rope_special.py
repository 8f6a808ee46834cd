"""RoPE families whose rotary module needs a small translation (see ``_rope_extra``):

* GPT-J and CodeGen: attention at ``transformer.h[i].attn``; interleaved partial RoPE kept as a
  ``sin | cos`` table (``rotary_emb.embed_positions``) rather than ``inv_freq``;
* SmolLM3: RoPE on three layers of four, NoPE on the fourth (``config.no_rope_layers``);
* NanoChat: ``rotate_half`` written as ``cat(x2, -x1)``, a rotation by minus the angle;
* Llama 4: interleaved RoPE on its chunked-attention layers, NoPE with temperature tuning on every
  fourth, served with ``capacity <= attention_chunk_size`` (``_rope_extra.ChunkedRotary``).
"""

from kvpress_lite import Adapter, hookimpl
from kvpress_lite_adapters._rope_extra import (
    chunked_nope_layers_positions,
    nope_layers_positions,
    reversed_rope_positions,
    sincos_table_positions,
)


@hookimpl
def kvpress_lite_register_adapters(register):
    register(
        Adapter(
            name="gptj",
            model_types=("gptj", "codegen"),
            attention_path="h.*.attn",
            positions=sincos_table_positions("rotary_emb", "embed_positions", interleaved=True),
            description="GPT-J / CodeGen (interleaved partial RoPE from a sin|cos table)",
        )
    )
    register(
        Adapter(
            name="smollm3",
            model_types=("smollm3",),
            attention_path="layers.*.self_attn",
            positions=nope_layers_positions("rotary_emb", "no_rope_layers"),
            description="SmolLM3 (rotate-half RoPE, every fourth layer NoPE)",
        )
    )
    register(
        Adapter(
            name="nanochat",
            model_types=("nanochat",),
            attention_path="layers.*.self_attn",
            positions=reversed_rope_positions("rotary_emb"),
            description="NanoChat (RoPE rotating by minus the angle)",
        )
    )
    register(
        Adapter(
            name="llama4_text",
            model_types=("llama4_text",),
            attention_path="layers.*.self_attn",
            positions=chunked_nope_layers_positions("rotary_emb", "no_rope_layers", interleaved=True),
            description="Llama 4 (interleaved RoPE on three layers of four, NoPE with temperature tuning on the "
                        "fourth, chunked attention)",
        )
    )
