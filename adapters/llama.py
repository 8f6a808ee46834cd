"""Llama (and SmolLM2, TinyLlama, ...): attention at ``model.layers[i].self_attn``,
full-width RoPE in ``rotate_half`` layout, grouped-query attention (the cache holds
``num_key_value_heads`` heads)."""

from kvpress_lite import Adapter, hookimpl, rope_positions


@hookimpl
def kvpress_lite_register_adapters(register):
    register(
        Adapter(
            name="llama",
            model_types=("llama",),
            attention_path="layers.*.self_attn",
            positions=rope_positions("rotary_emb"),
            description="Llama family (full RoPE, GQA)",
        )
    )
