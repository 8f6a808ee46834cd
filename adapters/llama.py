"""Llama and every family built the same way: attention at ``model.layers[i].self_attn``,
RoPE from the base model's ``rotary_emb`` in ``rotate_half`` layout (full or partial: the
rotary dims are read off ``inv_freq``), grouped-query attention (the cache holds
``num_key_value_heads`` heads).

Each type listed here passed the conformance checks of tests/conformance/ (exact against
independent dense references, eager and sdpa) on tiny random configs of transformers 5.24;
minicpm5_moe and param2moe came with 5.25 and passed there.
"""

from kvpress_lite import Adapter, hookimpl, rope_positions

MODEL_TYPES = (
    "llama",
    "apertus", "apertus1p5_text", "arcee", "aria_text", "bitnet", "cwm", "diffllama", "doge", "dots1", "exaone",
    "flex_olmo", "gemma", "gemma2", "glm4_moe", "gpt_oss", "granite", "granite_swa", "granitemoe", "granitemoe_swa",
    "granitemoeshared", "hy_v3", "hyperclovax", "internlm3", "iquestcoder", "jais2", "minimax_m2",
    "minimax_m3_vl_text", "minicpm5_moe", "ministral", "ministral3", "mistral", "mixtral", "nemotron", "olmo", "olmo2", "olmoe",
    "param2moe", "persimmon", "phi", "phi3", "phimoe", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "sarvam_moe", "seed_oss",
    "solar_open", "stablelm", "starcoder2", "vaultgemma", "emu3_text_model",
)


@hookimpl
def kvpress_lite_register_adapters(register):
    register(
        Adapter(
            name="llama",
            model_types=MODEL_TYPES,
            attention_path="layers.*.self_attn",
            positions=rope_positions("rotary_emb"),
            description="Llama-shaped families (rotate-half RoPE, full or partial, GQA)",
        )
    )
