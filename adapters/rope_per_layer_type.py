"""Families whose rotary module holds one ``<layer_type>_inv_freq`` per entry of
``config.layer_types`` (a local and a global base: Gemma 3, OLMo 3, ...). Sliding-window
layers narrower than the press's window keep their own window; wider ones are trimmed by the
press like full layers (both regimes are checked in tests/conformance/)."""

from kvpress_lite import Adapter, hookimpl, rope_positions

# gemma3_text has its own adapter (adapters/gemma3.py, which also reads the two rotary modules of 4.5x)
MODEL_TYPES = ("cohere_compass_text", "gemma3n_text", "gemma4_text", "gemma4_unified_text", "laguna", "mellum",
               "mimo_v2_flash", "olmo3")


@hookimpl
def kvpress_lite_register_adapters(register):
    register(
        Adapter(
            name="rope_per_layer_type",
            model_types=MODEL_TYPES,
            attention_path="layers.*.self_attn",
            positions=rope_positions("rotary_emb", per_layer_type=True),
            description="RoPE with one base per layer type (Gemma 3 local/global)",
        )
    )
    register(
        Adapter(
            name="modernbert_decoder",
            model_types=("modernbert-decoder",),
            attention_path="layers.*.attn",
            positions=rope_positions("rotary_emb", per_layer_type=True),
            description="ModernBERT decoder (RoPE with a local and a global base)",
        )
    )
