"""Families with RoPE on their sliding-window layers only and no position encoding (NoPE) on
their global layers: Cohere 2 (interleaved pairs), EXAONE 4, AFMoE, ... The global layers'
keys carry no position, so the press moves nothing there; the sliding layers' sinks are rotated
when the press trims those layers (windows wider than its capacity). Ergo does the same with a
base per layer type, NoPE where ``config.rope_parameters`` names none (interleaved pairs)."""

from kvpress_lite import Adapter, hookimpl
from kvpress_lite_adapters._rope_extra import layer_types_rope_positions, rope_parameters_layer_positions

HALF = ("afmoe", "exaone4", "exaone_moe", "flint", "kolibri1")
INTERLEAVED = ("cohere2", "cohere2_moe")


@hookimpl
def kvpress_lite_register_adapters(register):
    register(
        Adapter(
            name="rope_sliding_nope_global",
            model_types=HALF,
            attention_path="layers.*.self_attn",
            positions=layer_types_rope_positions("rotary_emb", ("sliding_attention",)),
            description="rotate-half RoPE on sliding layers, NoPE global layers (EXAONE 4, AFMoE)",
        )
    )
    register(
        Adapter(
            name="cohere2",
            model_types=INTERLEAVED,
            attention_path="layers.*.self_attn",
            positions=layer_types_rope_positions("rotary_emb", ("sliding_attention",), interleaved=True),
            description="Cohere 2: interleaved RoPE on sliding layers, NoPE global layers",
        )
    )
    register(
        Adapter(
            name="ergo",
            model_types=("ergo",),
            attention_path="layers.*.self_attn",
            positions=rope_parameters_layer_positions("rotary_emb", interleaved=True),
            description="Ergo: interleaved RoPE on sliding layers, NoPE global layers",
        )
    )
