"""An example third-party kvpress-lite plugin with a position scheme of its own: the RoBERTa
family as causal LMs (``is_decoder=True``): RoBERTa, CamemBERT, XLM-R, Data2Vec-text, ...

These models number positions from ``padding_idx + 1`` (row ``padding_idx + 1`` of the
learned table is the first token), so the positions the press hands must carry that
offset, and the table holds ``max_position_embeddings - padding_idx - 1`` usable rows. The
scheme below is the built-in absolute-embedding scheme plus that offset: 25 lines that make
seven families stream exactly (tested against dense forwards in kvpress-lite's test suite).

kvpress-lite has since taken this family in (its built-in ``roberta_decoder`` adapter, with
``AbsoluteEmbedding(offset=...)``); the plugin stays as the worked example of a scheme of one's
own. Installed beside the built-in, it is chosen with ``apply_press(model, adapter="roberta")``.
"""

import kvpress_lite as kvl


class PaddingOffsetPositions(kvl.AbsoluteEmbedding):
    """Learned absolute positions counted from ``offset`` (RoBERTa: ``padding_idx + 1``)."""

    def __init__(self, offset: int, rows: int):
        super().__init__(max_positions=rows - offset, description=f"learned absolute, from row {offset}")
        self.first_row = offset

    def position_ids(self, stream_positions, *, capacity, position_shift):
        plain = super().position_ids(stream_positions, capacity=capacity, position_shift=position_shift)
        return plain + self.first_row


def roberta_positions(model):
    config = model.config
    return PaddingOffsetPositions(offset=config.pad_token_id + 1, rows=config.max_position_embeddings)


@kvl.hookimpl
def kvpress_lite_register_adapters(register):
    register(kvl.Adapter(
        name="roberta",
        model_types=("roberta", "camembert", "xlm-roberta", "xlm-roberta-xl", "roberta-prelayernorm",
                     "data2vec-text", "xmod"),
        attention_path="encoder.layer.*.attention",
        positions=roberta_positions,
        description="RoBERTa family as causal LMs (learned positions from padding_idx + 1)",
    ))
