"""OPT: attention at ``model.decoder.layers[i].self_attn``; learned absolute positions with
an offset of 2 (the table has ``max_position_embeddings + 2`` rows; the model adds the
offset to the ``position_ids`` it is handed, so the press hands plain positions).

OPTForCausalLM calls ``self.model.decoder`` directly, never ``self.model``: the press's call
hooks go on the decoder (``decoder_path``), where the tokens, the cache and the positions
arrive."""

import kvpress_lite as kvl


@kvl.hookimpl
def kvpress_lite_register_adapters(register):
    register(
        kvl.Adapter(
            name="opt",
            model_types=("opt",),
            attention_path="decoder.layers.*.self_attn",
            decoder_path="decoder",
            positions=kvl.learned_positions("max_position_embeddings"),
            description="OPT (learned absolute positions, offset 2)",
        )
    )
