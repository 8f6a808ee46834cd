"""The decoders of encoder-decoder families run alone as causal LMs (``BartForCausalLM`` and
its kin, the decoder half of an ``EncoderDecoderModel``; no encoder states, so their
cross-attention never runs): BART, mBART, MVP, PLBart, BigBird-Pegasus, Blenderbot(-Small),
Marian, Pegasus and Whisper.

Their causal LM calls ``model.decoder`` directly (``decoder_path``), and the decoder takes no
``position_ids`` (Whisper's does on 5.x, not its causal LM on 4.5x): it counts positions from the cache length and hands them to its position
table, whose ``forward`` takes a ``position_ids`` keyword. The press hands its positions
there (``position_module``). The tables are learned (BART's with its offset of 2, applied
inside the table) or fixed sinusoids (Marian, Pegasus), both absolute and bounded: with the
shift a new token gets the slot it lands in, as for GPT-2.

Only the self-attention is pressed; ``encoder_attn`` (cross-attention) takes the cache too, but
without ``encoder_hidden_states`` it is skipped, and a call that passes them is a seq2seq call,
which kvpress-lite does not stream (the cache would be an ``EncoderDecoderCache``)."""

import kvpress_lite as kvl
from kvpress_lite import AbsoluteEmbedding, Adapter, hookimpl

LEARNED = ("bart", "mbart", "mvp", "plbart", "bigbird_pegasus", "blenderbot", "blenderbot-small")
SINUSOIDAL = ("marian", "pegasus")


def table_positions(rows_attr: str, kind: str):
    """Absolute positions read from a table of ``config.<rows_attr>`` rows."""

    def positions(model) -> AbsoluteEmbedding:
        rows = int(getattr(model.config, rows_attr))
        return AbsoluteEmbedding(max_positions=rows, description=f"{kind} absolute ({rows} positions, at the decoder's table)")

    return positions


def _decoder(name, model_types, rows_attr, kind, description, position_module="decoder.embed_positions"):
    return Adapter(
        name=name,
        model_types=model_types,
        attention_path="decoder.layers.*.self_attn",
        decoder_path="decoder",
        position_module=position_module,
        positions=table_positions(rows_attr, kind),
        description=description,
    )


@hookimpl
def kvpress_lite_register_adapters(register):
    register(_decoder("seq2seq_decoder", LEARNED, "max_position_embeddings", "learned",
                      "decoders of BART-like encoder-decoders as causal LMs (learned absolute positions)"))
    register(_decoder("seq2seq_decoder_sinusoidal", SINUSOIDAL, "max_position_embeddings", "sinusoidal",
                      "decoders of Marian and Pegasus as causal LMs (sinusoidal absolute positions)"))
    register(_decoder("whisper_decoder", ("whisper",), "max_target_positions", "learned",
                      "Whisper's decoder as a causal LM (learned absolute positions)"))
