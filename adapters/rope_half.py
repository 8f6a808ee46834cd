"""Rotate-half RoPE families whose attention modules sit elsewhere than Llama's: JetMoE
(``model.layers[i].self_attention``) and DBRX (``transformer.blocks[i].norm_attn_norm``, the
norm + attention block that receives the cache). (Falcon, at ``transformer.h[i].self_attention``,
is served by adapters/alibi.py, which picks RoPE or ALiBi by ``config.alibi``.) Mllama's text model
(Llama 3.2 Vision) holds Llama layers and cross-attention layers (``cross_attn``, no ``self_attn``):
the path finds only the former."""

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
    register(
        Adapter(
            name="mllama_text",
            model_types=("mllama_text_model",),
            attention_path="layers.*.self_attn",  # the cross-attention layers hold cross_attn: never pressed
            positions=rope_positions("rotary_emb"),
            description="Mllama's text model (Llama 3.2 Vision): its self-attention layers (rotate-half RoPE); its "
                        "cross-attention layers run only with image states, which the press refuses",
        )
    )
