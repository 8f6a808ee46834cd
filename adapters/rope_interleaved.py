"""Llama-shaped families whose RoPE rotates adjacent pairs (GPT-J style, ``rotate_every_two``)
instead of ``rotate_half`` halves: attention at ``model.layers[i].self_attn``, frequencies
from the base model's ``rotary_emb``. A rotate-half adapter runs on these but is silently
wrong once the sinks move; the conformance check (e) tells them apart."""

from kvpress_lite import Adapter, hookimpl, rope_positions
from kvpress_lite_adapters._verified import from_transformers_5

MODEL_TYPES = ("cohere", "ernie4_5", "ernie4_5_moe", "glm", "glm4", "helium")


@hookimpl
def kvpress_lite_register_adapters(register):
    register(
        Adapter(
            name="rope_interleaved",
            model_types=MODEL_TYPES,
            attention_path="layers.*.self_attn",
            positions=from_transformers_5(rope_positions("rotary_emb", interleaved=True), ("ernie4_5_moe",),
                                          "a one-layer model does not build"),
            description="RoPE in interleaved pairs (Cohere, GLM, ERNIE 4.5, Helium)",
        )
    )
