"""ALiBi families: BLOOM, MPT, and Falcon checkpoints with ``config.alibi=True`` (RoPE ones
use the rotary scheme). Keys carry no position; the model biases each key by its index in
the cache, read off the attention mask. The press keeps the cache in stream order for
these (``Alibi.ordered_cache``), so the indices are positions within the cache, as the
paper prescribes; ``position_shift=False`` is refused (there are no absolute distances to
keep). MPT's config defaults to ``use_cache=False``: pass ``use_cache=True``."""

import kvpress_lite as kvl


def falcon_positions(model):
    """Falcon is ALiBi or RoPE by its config."""
    if getattr(model.config, "alibi", False):
        return kvl.Alibi()
    return kvl.rope_positions("rotary_emb")(model)


@kvl.hookimpl
def kvpress_lite_register_adapters(register):
    register(kvl.Adapter(name="bloom", model_types=("bloom",), attention_path="h.*.self_attention",
                         positions=kvl.alibi_positions(), description="BLOOM (ALiBi)"))
    register(kvl.Adapter(name="mpt", model_types=("mpt",), attention_path="blocks.*.attn",
                         positions=kvl.alibi_positions(), description="MPT (ALiBi)"))
    register(kvl.Adapter(name="falcon", model_types=("falcon",), attention_path="h.*.self_attention",
                         positions=falcon_positions, description="Falcon (ALiBi or RoPE, by config.alibi)"))
