"""Rotate-half RoPE families whose attention modules sit elsewhere than Llama's: JetMoE
(``model.layers[i].self_attention``) and DBRX (``transformer.blocks[i].norm_attn_norm``, the
norm + attention block that receives the cache). (Falcon, at ``transformer.h[i].self_attention``,
is served by adapters/alibi.py, which picks RoPE or ALiBi by ``config.alibi``.)"""

from kvpress_lite import Adapter, hookimpl, rope_positions


@hookimpl
def kvpress_lite_register_adapters(register):
    register(
        Adapter(
            name="jetmoe",
            model_types=("jetmoe",),
            attention_path="layers.*.self_attention",
            positions=rope_positions("rotary_emb"),
            description="JetMoE (rotate-half RoPE, mixture of attention heads)",
        )
    )
    register(
        Adapter(
            name="dbrx",
            model_types=("dbrx",),
            attention_path="blocks.*.norm_attn_norm",
            positions=rope_positions("rotary_emb"),
            description="DBRX (rotate-half RoPE, fine-grained MoE)",
        )
    )
