"""GPT-NeoX (Pythia) and GPT-NeoX-Japanese: attention at ``gpt_neox.layers[i].attention``,
cache keyword ``layer_past``; RoPE on the first ``rotary_ndims`` features of each head only
(a quarter for Pythia), in ``rotate_half`` layout. The partial rotary needs nothing
special here: the rotary module's ``inv_freq`` has ``rotary_ndims / 2`` entries."""

from kvpress_lite import Adapter, hookimpl, rope_positions


@hookimpl
def kvpress_lite_register_adapters(register):
    register(
        Adapter(
            name="gpt_neox",
            model_types=("gpt_neox", "gpt_neox_japanese"),
            attention_path="layers.*.attention",
            positions=rope_positions("rotary_emb"),
            description="GPT-NeoX / Pythia (partial RoPE)",
        )
    )
