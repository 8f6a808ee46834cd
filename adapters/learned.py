"""Learned absolute position tables added to the input, beyond GPT-2's own adapter:
GPT-Neo (``transformer.h[i].attn``), BioGPT (``biogpt.layers[i].self_attn``; its table's offset
of 2 is applied inside the model, from the position_ids the press hands it) and the BERT
family run as causal decoders (``config.is_decoder=True``: ``encoder.layer[i].attention``).
With the shift a new token gets the cache slot it lands in, at most ``capacity - 1``.

RoBERTa and its kin (CamemBERT, XLM-R, Data2Vec-text, X-MOD ...) run as causal decoders too, but
number positions from the padding id: row ``padding_idx + 1`` of their table is position 0, and
they index the table with the position_ids they are handed as they are, so the press hands its
positions plus that offset (``AbsoluteEmbedding.offset``).

Elsewhere: OPT has its own adapter (adapters/opt.py: the press hooks its decoder)."""

from kvpress_lite import AbsoluteEmbedding, Adapter, hookimpl, learned_positions
from kvpress_lite_adapters._verified import from_transformers_5

ROBERTA_DECODERS = ("roberta", "camembert", "xlm-roberta", "xlm-roberta-xl", "roberta-prelayernorm",
                    "data2vec-text", "xmod")


def padding_offset_positions(model) -> AbsoluteEmbedding:
    """RoBERTa's table: position 0 at row ``pad_token_id + 1``, so fewer usable rows."""
    offset = int(model.config.pad_token_id) + 1
    rows = int(model.config.max_position_embeddings) - offset
    return AbsoluteEmbedding(max_positions=rows, offset=offset,
                             description=f"learned absolute ({rows} positions, from row {offset})")


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
    register(
        Adapter(
            name="roberta_decoder",
            model_types=ROBERTA_DECODERS,
            attention_path="encoder.layer.*.attention",
            positions=from_transformers_5(padding_offset_positions, ("xlm-roberta-xl",),
                                          "its generate() slices the prompt by the cache's length, which the press "
                                          "bounds"),
            description="RoBERTa-like models run as causal decoders (learned positions from padding_idx + 1)",
        )
    )
