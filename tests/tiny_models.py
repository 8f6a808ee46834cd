"""Tiny random-weight causal LMs for tests.

`tiny_model(family)` builds a 2-layer model straight from a config (no download),
re-initialises every weight from a fixed seed with a large enough spread that
attention is far from uniform (so tests about which tokens are visible can fail),
and returns it in eval mode.

Works with transformers 4.56 and 5.x: the RoPE settings moved from flat config
attributes (`rope_theta`, `rotary_pct`) into `config.rope_parameters` in 5.x; see
`_rope_kwargs`.
"""

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedModel,
    Qwen2Config,
)

# The families with a plain float64 reference in reference.py (qwen2: llama + q/k/v biases).
FAMILIES = ("gpt_neox", "llama", "gpt2")

WEIGHT_STD = 0.2  # std of every matrix; 0.02 (HF default) gives near-uniform attention
BIAS_STD = 0.1    # std of biases
NORM_STD = 0.1    # norm gains are 1 + N(0, NORM_STD)

SEED = 0

_CONFIG_CLASSES = {
    "gpt_neox": GPTNeoXConfig,
    "llama": LlamaConfig,
    "gpt2": GPT2Config,
    "qwen2": Qwen2Config,
}

# No special tokens: with a random model, greedy generate() could otherwise hit
# an in-vocabulary eos id and stop early (and gpt2's default 50256 is out of vocab).
_NO_SPECIAL_TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)

_DEFAULTS = {
    "gpt_neox": dict(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=4096,
        use_parallel_residual=True,
        rope_theta=10000.0,
        partial_rotary_factor=0.25,  # head_size 16 -> rotary_ndims 4
    ),
    "llama": dict(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: 2 query heads per kv head
        intermediate_size=128,
        max_position_embeddings=4096,
        rope_theta=10000.0,
    ),
    "gpt2": dict(
        vocab_size=128,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=1024,
    ),
    "qwen2": dict(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        use_sliding_window=False,
        sliding_window=None,
    ),
}


def _has_rope_parameters(config_cls) -> bool:
    """True on transformers 5.x, where RoPE settings live in config.rope_parameters."""
    return "rope_parameters" in config_cls().to_dict()


def _rope_kwargs(family: str, config_cls, kwargs: dict) -> dict:
    """Turn the flat `rope_theta` / `partial_rotary_factor` (alias `rotary_pct`)
    entries of `kwargs` into what this transformers version's config expects."""
    kwargs = dict(kwargs)
    theta = kwargs.pop("rope_theta", None)
    partial = kwargs.pop("partial_rotary_factor", None)
    partial = kwargs.pop("rotary_pct", partial)
    if theta is None and partial is None:
        return kwargs
    if _has_rope_parameters(config_cls):  # transformers 5.x
        rope = dict(kwargs.pop("rope_parameters", None) or {})
        rope.setdefault("rope_type", "default")
        if theta is not None:
            rope["rope_theta"] = float(theta)
        if partial is not None:
            rope["partial_rotary_factor"] = float(partial)
        kwargs["rope_parameters"] = rope
    else:  # transformers 4.x
        if theta is not None:
            if family == "gpt_neox":
                kwargs["rotary_emb_base"] = theta
            else:
                kwargs["rope_theta"] = theta
        if partial is not None:
            if family == "gpt_neox":
                kwargs["rotary_pct"] = partial  # sets partial_rotary_factor too
            else:
                kwargs["partial_rotary_factor"] = partial
    return kwargs


def tiny_config(family: str, **config_overrides):
    if family not in _CONFIG_CLASSES:
        raise ValueError(f"unknown family {family!r}; known: {sorted(_CONFIG_CLASSES)}")
    config_cls = _CONFIG_CLASSES[family]
    kwargs = {**_NO_SPECIAL_TOKENS, **_DEFAULTS[family], **config_overrides}
    kwargs = _rope_kwargs(family, config_cls, kwargs)
    return config_cls(**kwargs)


@torch.no_grad()
def _reinit_(model: torch.nn.Module, seed: int = SEED) -> None:
    """Overwrite every parameter from a seeded generator, in sorted-name order
    (so the weights do not depend on module registration order)."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())  # tied weights appear once
    for name in sorted(params):
        p = params[name]
        if p.ndim >= 2:  # Linear / Conv1D / Embedding matrices
            noise = torch.randn(p.shape, generator=gen) * WEIGHT_STD
        elif name.endswith("bias"):
            noise = torch.randn(p.shape, generator=gen) * BIAS_STD
        else:  # LayerNorm / RMSNorm gains
            noise = 1.0 + torch.randn(p.shape, generator=gen) * NORM_STD
        p.copy_(noise.to(p.dtype))


def tiny_model(
    family: str,
    attn_implementation: str = "eager",
    dtype: torch.dtype = torch.float32,
    **config_overrides,
) -> PreTrainedModel:
    """A tiny deterministic random-weight causal LM of `family`
    ("gpt_neox", "llama", "gpt2", "qwen2"), in eval mode.

    Weights are drawn in float32 from seed 0 and then cast to `dtype`, so models of
    different dtypes / attention implementations share the same weights.
    `config_overrides` go to the config (e.g. n_positions=128 for gpt2,
    num_hidden_layers=1, rope_theta=..., partial_rotary_factor=... / rotary_pct=...).
    """
    torch.manual_seed(SEED)
    config = tiny_config(family, **config_overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    model = model.to(torch.float32)
    _reinit_(model)
    model = model.to(dtype)
    model.eval()
    return model
