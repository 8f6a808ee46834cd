"""An adapter plugin for Qwen2, kept in the kvpress-lite repository as a worked example of
adding a family from outside the library: a module, one hook, one entry point."""

import kvpress_lite as kvl


@kvl.hookimpl
def kvpress_lite_register_adapters(register):
    register(
        kvl.Adapter(
            name="qwen2",
            model_types=("qwen2",),
            attention_path="layers.*.self_attn",
            positions=kvl.rope_positions("rotary_emb"),
            description="Qwen2 (full RoPE, GQA, q/k/v biases)",
        )
    )
