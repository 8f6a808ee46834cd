"""GPT-2 and its kin (GPT-SW3, GPTBigCode / StarCoder 1 with multi-query attention):
attention at ``transformer.h[i].attn``; learned absolute positions (``wpe``, ``n_positions``
rows) added to the input embeddings. The press bounds the positions it hands to ``wpe`` so a
stream can run past ``n_positions``."""

from kvpress_lite import Adapter, hookimpl, learned_positions


@hookimpl
def kvpress_lite_register_adapters(register):
    register(
        Adapter(
            name="gpt2",
            model_types=("gpt2", "gpt-sw3", "gpt_bigcode"),
            attention_path="h.*.attn",
            positions=learned_positions("n_positions"),
            description="GPT-2 (learned absolute positions)",
        )
    )
