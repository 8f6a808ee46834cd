"""Sinusoidal absolute positions added to the input: XGLM (``model.layers[i].self_attn``) and
CTRL (``transformer.h[i].multi_head_attention``). Treated like a learned table: with the shift
a new token gets the cache slot it lands in."""

import kvpress_lite as kvl
from kvpress_lite import Adapter, hookimpl
from kvpress_lite_adapters._verified import from_transformers_5


@hookimpl
def kvpress_lite_register_adapters(register):
    register(
        Adapter(
            name="xglm",
            model_types=("xglm",),
            attention_path="layers.*.self_attn",
            positions=kvl.sinusoidal_positions(),
            description="XGLM (sinusoidal absolute positions)",
        )
    )
    register(
        Adapter(
            name="ctrl",
            model_types=("ctrl",),
            attention_path="h.*.multi_head_attention",
            positions=from_transformers_5(kvl.sinusoidal_positions(), ("ctrl",), "generate() and a plain loop disagree"),
            description="CTRL (sinusoidal absolute positions)",
        )
    )
