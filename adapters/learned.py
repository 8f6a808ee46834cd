"""Learned absolute position tables added to the input, beyond GPT-2's own adapter:
GPT-Neo (``transformer.h[i].attn``), BioGPT (``biogpt.layers[i].self_attn``; its table's offset
of 2 is applied inside the model, from the position_ids the press hands it) and the BERT
family run as causal decoders (``config.is_decoder=True``: ``encoder.layer[i].attention``).
With the shift a new token gets the cache slot it lands in, at most ``capacity - 1``.

Elsewhere: RoBERTa and its kin number positions from the padding id (the example plugin in
plugins/ serves them); OPT has its own adapter (adapters/opt.py: the press hooks its decoder)."""

from kvpress_lite import Adapter, hookimpl, learned_positions
from kvpress_lite_adapters._verified import from_transformers_5

BERT_DECODERS = ("bert", "bert-generation", "big_bird", "electra", "ernie", "megatron-bert", "rembert", "roc_bert")


@hookimpl
def kvpress_lite_register_adapters(register):
    register(
        Adapter(
            name="gpt_neo",
            model_types=("gpt_neo",),
            attention_path="h.*.attn",
            positions=learned_positions("max_position_embeddings"),
            description="GPT-Neo (learned absolute positions, global and local layers)",
        )
    )
    register(
        Adapter(
            name="biogpt",
            model_types=("biogpt",),
            attention_path="layers.*.self_attn",
            positions=learned_positions("max_position_embeddings"),
            description="BioGPT (learned absolute positions)",
        )
    )
    register(
        Adapter(
            name="bert_decoder",
            model_types=BERT_DECODERS,
            attention_path="encoder.layer.*.attention",
            positions=from_transformers_5(learned_positions("max_position_embeddings"), ("roc_bert",),
                                          "generate() and a plain loop disagree"),
            description="BERT-like models run as causal decoders (learned absolute positions)",
        )
    )
