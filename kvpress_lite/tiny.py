"""Tiny random configs and models for every causal-LM type of the installed transformers:
what the conformance suite, ``kvpress-lite demo --family`` and the tests build.

>>> model = tiny_model("qwen3", num_layers=2)        # doctest: +SKIP

`tiny_config(model_type, num_layers)` starts from the type's default config, reads which
attribute names it uses (``n_embd`` / ``d_model`` / ``hidden_size`` ...), and shrinks every
size it knows about: hidden 64, 4 heads, 2 kv heads, intermediate 128, vocab 128, at least
512 positions, no special token ids, no sliding window unless the family's layer pattern has
windowed layers (then a window of 4, so that a small cache can hold it). It raises :class:`NotBuildable` with a reason for types that cannot
stand alone as a tiny decoder (composite/multimodal, encoder-decoder, ...).

`tiny_model(model_type, num_layers, attn_implementation)` builds the model and overwrites
every parameter from a fixed seed (std 0.2 for matrices), so
attention is far from uniform; float32, eval mode.

Works on transformers 4.56 and 5.x alike: names are read off the default config's
``to_dict()`` (flat ``rope_theta`` in 4.x, ``rope_parameters`` in 5.x are left alone).
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import Any, Optional

import torch

HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
INTERMEDIATE = 128
VOCAB = 128
MAX_POSITIONS = 512
SLIDING_WINDOW = 4  # for families whose checkpoints have sliding-window layers (window - 1 <= the tests' capacity)

WEIGHT_STD = 0.2  # std of every matrix; 0.02 (HF default) gives near-uniform attention
BIAS_STD = 0.1
NORM_STD = 0.1
SEED = 0

# The largest model we accept as "tiny" (parameters); bigger means a size we failed to shrink.
MAX_PARAMS = 3_000_000


class NotBuildable(Exception):
    """The type cannot be built as a tiny stand-alone decoder; ``category`` says why."""

    def __init__(self, category: str, detail: str = ""):
        super().__init__(f"{category}: {detail}" if detail else category)
        self.category = category
        self.detail = detail


# groups of attribute names that mean the same size, and the value each gets
_SIZES: list[tuple[tuple[str, ...], Any]] = [
    (("hidden_size", "n_embd", "d_model", "emb_dim", "embed_dim", "hidden_dim", "word_embed_proj_dim",
      "lru_width", "input_embedding_size", "output_embedding_size", "attention_hidden_size", "embedding_size",
      "embedding_dim"), HIDDEN),
    (("num_attention_heads", "n_head", "n_heads", "num_heads", "attention_heads", "decoder_attention_heads",
      "encoder_attention_heads", "swa_num_attention_heads"), HEADS),
    (("num_key_value_heads", "num_kv_heads", "n_kv_heads", "num_query_groups", "swa_num_key_value_heads"), KV_HEADS),
    (("head_dim", "kv_channels", "attention_head_dim", "d_head", "dim_head", "attention_head_size", "swa_head_dim"),
     HEAD_DIM),
    (("intermediate_size", "n_inner", "ffn_dim", "d_ff", "ffn_hidden_size", "decoder_ffn_dim", "encoder_ffn_dim",
      "dff", "dim_ff", "feed_forward_size", "dense_intermediate_size", "intermediate_size_mlp",
      "prefix_dense_intermediate_size", "first_dense_intermediate_size"), INTERMEDIATE),
    (("moe_intermediate_size", "shared_expert_intermediate_size", "expert_ffn_hidden_size",
      "moe_shared_expert_intermediate_size", "shared_intermediate_size", "shared_experts_intermediate_size"), 32),
    (("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    (("num_experts_per_tok", "moe_k", "moe_topk", "num_experts_per_token", "top_k_experts"), 2),
    (("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"), 1),
    (("n_group", "num_expert_group", "topk_group"), 1),
    (("vocab_size", "n_words", "vocab_size_per_layer_input", "audio_vocab_size", "unpadded_vocab_size",
      "shape_vocab_size", "pronunciation_vocab_size"), VOCAB),
    (("shape_embed_dim", "pronunciation_embed_dim", "hidden_size_per_layer_input", "laurel_rank"), 16),
    (("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_target_positions", "model_max_length",
      "context_length"), MAX_POSITIONS),
    # multi-head latent attention
    (("kv_lora_rank",), 32),
    (("qk_rope_head_dim",), 8),
    (("qk_nope_head_dim", "v_head_dim"), 16),
    # SSM / linear-attention parts of hybrids: heads * head_dim = 2 * hidden (expand 2)
    (("mamba_n_heads", "mamba_num_heads", "n_mamba_heads"), 8),
    (("linear_num_key_heads", "linear_num_value_heads", "linear_num_heads"), 4),
    (("linear_key_head_dim", "linear_value_head_dim", "linear_head_dim", "mamba_d_head", "mamba_head_dim",
      "mamba_headdim"), 16),
    (("mamba_d_state", "state_size", "ssm_state_size"), 16),
    (("index_n_heads", "indexer_n_heads"), 2),
    (("index_head_dim", "indexer_head_dim"), 16),
]
# sizes that stay as they are when the default says None (None there means "absent")
_KEEP_NONE = {"q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
              "num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "moe_intermediate_size",
              "shared_expert_intermediate_size", "n_shared_experts", "num_shared_experts",
              "hidden_size_per_layer_input", "laurel_rank", "index_n_heads", "index_head_dim", "indexer_n_heads",
              "indexer_head_dim", "embedding_size", "word_embed_proj_dim", "n_inner"}
_LAYER_NAMES = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "num_blocks")
_LAYER_LISTS = ("layer_types", "layers_block_type", "mlp_layer_types", "attention_types", "block_types",
                "no_rope_layers", "moe_layers")
_SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "cls_token_id",
                   "decoder_start_token_id", "mask_token_id", "unk_index", "bos_index", "eos_index", "pad_index",
                   "forced_eos_token_id")

# Per-type fixes on top of the generic shrinking (values that a generic rule gets wrong).
_SPECIAL: dict[str, Any] = {
    "mamba2": dict(num_heads=8, head_dim=16, n_groups=1, time_step_rank=8),
    "reformer": dict(axial_pos_embds_dim=[32, 32], axial_pos_shape=[16, 32], attention_head_size=16),
    "gpt_neo": lambda n, layer: dict(
        attention_types=[[["global", "local"][layer % 2:layer % 2 + 1], n]] if layer is not None
        else [[["global", "local"], n // 2]] if n % 2 == 0 else [[["global"], n]],
    ),
    "gemma4_assistant": dict(hidden_size_per_layer_input=0),
    "zaya": dict(num_experts_per_tok=1),
    "gemma3n_text": dict(num_kv_shared_layers=0, altup_num_inputs=2),
    "lfm2_moe": lambda n, layer: dict(layer_types=["full_attention"] + ["conv"] * (n - 1), num_dense_layers=n),
    "rwkv": dict(attention_hidden_size=HIDDEN, intermediate_size=None),
    "cohere_compass_text": dict(sliding_window=4096,
                                rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    "dots1": dict(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1),
    # Falcon-H1's muP multipliers away from 1, so the checks see them (the key one scales keys before RoPE)
    "falcon_h1": dict(mamba_d_ssm=2 * HIDDEN, key_multiplier=0.39, attention_in_multiplier=0.7,
                      attention_out_multiplier=1.3, embedding_multiplier=5.0, lm_head_multiplier=0.8),
    "xlm": dict(pad_index=2, unk_index=3),
    "dbrx": dict(ffn_config={"ffn_hidden_size": INTERMEDIATE, "moe_num_experts": 4, "moe_top_k": 2},
                 attn_config={"kv_n_heads": KV_HEADS, "rope_theta": 10000.0, "clip_qkv": 8.0}),
    # hybrids whose default config puts attention past the first two layers (or nowhere): the last
    # layer attends, the others keep a recurrent state; a one-layer model is the attention layer
    "jamba": lambda n, layer: dict(attn_layer_period=n, attn_layer_offset=n - 1),
    "bamba": lambda n, layer: dict(attn_layer_indices=[n - 1]),
    "granitemoehybrid": lambda n, layer: dict(layer_types=_granite_hybrid_types(n)),
    "nemotron_h": lambda n, layer: dict(layers_block_type=["linear_attention"] * (n - 1) + ["full_attention"]),
    # temperature tuning of NoPE layers starts at floor_scale positions: bring it within a short stream
    "llama4_text": dict(floor_scale=4),
    # Mllama's cross-attention layers (to image states) sit at fixed depths past a tiny model's: keep one
    "mllama_text_model": lambda n, layer: dict(cross_attention_layers=[n - 1] if n > 1 else []),
}
# BERT/RoBERTa-likes compute positions from the padding id (padding_idx + 1 onwards): keep one
for _t in ("camembert", "data2vec-text", "roberta", "roberta-prelayernorm", "xlm-roberta", "xlm-roberta-xl", "xmod"):
    _SPECIAL[_t] = dict(pad_token_id=1)
# per-layer lists a config derives from another field (set through that field instead)
_DERIVED_LISTS = ("attention_layers",)
# layer kinds that mean a family's checkpoints have windowed layers (built with a small window)
_SLIDING_WORDS = ("sliding", "local", "chunked")


def _granite_hybrid_types(n: int) -> list[str]:
    import transformers  # 4.5x names its layer kinds mamba / attention

    v5 = int(transformers.__version__.split(".")[0]) >= 5
    return ["linear_attention" if v5 else "mamba"] * (n - 1) + ["full_attention" if v5 else "attention"]


def all_model_types() -> list[str]:
    """Every model type transformers can build as a causal LM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


# Layer patterns of real checkpoints where the default config does not show them (LFM2's default
# config has attention in every layer; its checkpoints interleave short-convolution layers).
REAL_PATTERNS = {
    "lfm2": dict(layer_types=["conv", "conv", "full_attention"] * 2),
}


def _default_config(model_type: str):
    from transformers import AutoConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = AutoConfig.for_model(model_type)
    for name, value in REAL_PATTERNS.get(model_type, {}).items():
        setattr(config, name, list(value))
    for name in _LAYER_NAMES:
        if name in REAL_PATTERNS.get(model_type, {}) or not REAL_PATTERNS.get(model_type):
            continue
        if isinstance(getattr(config, name, None), int):
            setattr(config, name, len(next(iter(REAL_PATTERNS[model_type].values()))))
            break
    return config


def needs_sliding_window(defaults: dict) -> bool:
    """True when the family's default layer pattern has sliding/local/chunked attention layers."""
    types = list(defaults.get("layer_types") or []) + list(defaults.get("attention_layers") or [])
    return isinstance(types, (list, tuple)) and any(
        isinstance(t, str) and any(w in t for w in _SLIDING_WORDS) for t in types
    )


def _per_layer(value, num_layers):
    return [value] * num_layers


def _default_layers(defaults: dict) -> Optional[int]:
    for name in _LAYER_NAMES:
        if isinstance(defaults.get(name), int) and not isinstance(defaults[name], bool):
            return defaults[name]
    return None


def _per_layer_lists(defaults: dict) -> dict[str, list]:
    """Per-layer pattern lists of the default config (layer kinds, NoPE flags)."""
    n = _default_layers(defaults)
    found = {}
    for name, value in defaults.items():
        if not isinstance(value, (list, tuple)) or len(value) != n or not value or name in _DERIVED_LISTS:
            continue
        if all(isinstance(v, str) for v in value) or name in ("no_rope_layers",):
            found[name] = list(value)
    return found


def layer_variants(model_type: str) -> list[int]:
    """Indices of the first layer of each distinct kind in the family's default pattern
    (``layer_types``, ``no_rope_layers`` ...): a one-layer model is built per kind."""
    model_type = text_type_of(model_type)  # a wrapper's layers are its text model's
    try:
        defaults = _default_config(model_type).to_dict()
    except Exception:
        return [0]
    lists = _per_layer_lists(defaults)
    if not lists:
        return [0]
    seen, reps = set(), []
    for k in range(len(next(iter(lists.values())))):
        sig = tuple(str(v[k]) for v in lists.values())
        if sig not in seen:
            seen.add(sig)
            reps.append(k)
    return reps


def two_layer_pattern(model_type: str):
    """Layer kinds for a 2-layer model: a windowed and a full kind where the family mixes them
    (so the press has a layer to bound), else the first and last distinct kinds, else the default
    pattern's first two layers (None)."""
    model_type = text_type_of(model_type)  # a wrapper's layers are its text model's
    variants = layer_variants(model_type)
    windowed = [v for v in variants if windowed_variant(model_type, v)]
    # a hybrid's recurrent kinds last: the press needs a full attention layer beside the windowed one
    full = sorted((v for v in variants if v not in windowed), key=lambda v: _recurrent_variant(model_type, v))
    if windowed and full:
        return [windowed[0], full[0]]
    if len(variants) > 1:  # e.g. LFM2 conv + attention, SmolLM3 RoPE + NoPE
        return [variants[0], variants[-1]]
    return None


def _recurrent_variant(model_type: str, layer: int) -> bool:
    model_type = text_type_of(model_type)  # a wrapper's layers are its text model's
    from .cache_access import RECURRENT_LAYER_TYPES

    try:
        types = _default_config(model_type).to_dict().get("layer_types") or []
    except Exception:
        return False
    return layer < len(types) and types[layer] in RECURRENT_LAYER_TYPES


def windowed_variant(model_type: str, layer: int) -> bool:
    """True when layer ``layer`` of the family's default pattern is a sliding/local/chunked layer."""
    model_type = text_type_of(model_type)  # a wrapper's layers are its text model's
    try:
        defaults = _default_config(model_type).to_dict()
    except Exception:
        return False
    for name in ("layer_types", "attention_layers"):
        types = defaults.get(name) or []
        if layer < len(types) and isinstance(types[layer], str) and any(w in types[layer] for w in _SLIDING_WORDS):
            return True
    return False


def optional_window(model_type: str) -> bool:
    """True when the family's default config sets a sliding window without windowed layer kinds
    (Mistral: every layer slides when ``sliding_window`` is set; tiny configs leave it off)."""
    model_type = text_type_of(model_type)  # a wrapper's layers are its text model's
    try:
        defaults = _default_config(model_type).to_dict()
    except Exception:
        return False
    return isinstance(defaults.get("sliding_window"), int) and not needs_sliding_window(defaults)


def _overrides(model_type: str, defaults: dict, num_layers: int, layer=None, window: int = SLIDING_WINDOW,
               sliding: bool = False) -> dict:
    kwargs: dict = {}
    for names, value in _SIZES:
        for name in names:
            if name not in defaults:
                continue
            default = defaults[name]
            if default is None and name in _KEEP_NONE:
                continue
            if isinstance(default, bool):
                continue
            if isinstance(default, (int, float)) or default is None:
                kwargs[name] = value
            elif isinstance(default, (list, tuple)) and default and all(isinstance(v, int) for v in default):
                kwargs[name] = _per_layer(value, num_layers)  # per-layer sizes (gemma3n)
    if "kv_lora_rank" in kwargs:  # multi-head latent attention: one kv head per query head
        for name in ("num_key_value_heads",):
            if name in defaults:
                kwargs[name] = HEADS
        if "head_dim" in defaults:
            kwargs["head_dim"] = kwargs.get("qk_rope_head_dim", 8)
    if defaults.get("q_lora_rank") is not None:
        kwargs["q_lora_rank"] = 32
    if isinstance(defaults.get("rotary_dim"), int):
        kwargs["rotary_dim"] = HEAD_DIM // 2  # GPT-J / CodeGen: partial rotary (a quarter of the head in GPT-J-6B)
    for name in _LAYER_NAMES:
        if name in defaults and isinstance(defaults[name], int) and not isinstance(defaults[name], bool):
            kwargs[name] = num_layers
    for name in _SPECIAL_TOKENS:
        if name in defaults:
            kwargs[name] = None
    if defaults.get("use_cache") is False:
        kwargs["use_cache"] = True  # MPT's default: a streaming press needs the cache
    if "position_embedding_type" in defaults and isinstance(defaults.get("pad_token_id"), int):
        kwargs["pad_token_id"] = defaults["pad_token_id"]  # BERT-likes: positions count from padding_idx
    # per-layer lists sized by the default layer count: keep the family's pattern, cut to size
    for name in _LAYER_LISTS:
        value = defaults.get(name)
        if isinstance(value, (list, tuple)) and len(value) != num_layers and value and not isinstance(value[0], list):
            kwargs[name] = list(value)[:num_layers]
    if isinstance(layer, (list, tuple)):  # layer i of the kind the default pattern has at index layer[i]
        for name, value in _per_layer_lists(defaults).items():
            kwargs[name] = [value[k] for k in layer]
    elif layer is not None:  # every layer of the kind the default pattern has at index `layer`
        for name, value in _per_layer_lists(defaults).items():
            kwargs[name] = [value[layer]] * num_layers
    if isinstance(defaults.get("per_layer_config"), dict):
        kwargs["per_layer_config"] = {}
    if needs_sliding_window(defaults) or sliding:  # small, so that capacity >= window - 1 and the press can serve it
        for name in ("sliding_window", "sliding_window_size", "window_size", "attention_chunk_size"):
            if isinstance(defaults.get(name), int):
                kwargs[name] = window
        if sliding and "use_sliding_window" in defaults:
            kwargs["use_sliding_window"] = True
        if sliding and "max_window_layers" in defaults:
            kwargs["max_window_layers"] = 0
    else:
        if "sliding_window" in defaults:
            kwargs["sliding_window"] = None
        if "use_sliding_window" in defaults:
            kwargs["use_sliding_window"] = False
    special = _SPECIAL.get(model_type, {})
    kwargs.update(special(num_layers, layer) if callable(special) else special)
    return kwargs


# config validation errors that a retry with another value fixes
_FIELD_INT = re.compile(r"Field '(\w+)' expected int, got NoneType")


def tiny_config(model_type: str, num_layers: int = 2, layer=None, window: int = SLIDING_WINDOW,
                sliding: bool = False):
    """A tiny config for ``model_type``; raises :class:`NotBuildable` with a reason.

    ``layer=k`` makes every layer of the kind layer k has in the family's default pattern
    (see :func:`layer_variants`), ``layer=[k0, k1, ...]`` one kind per layer; by default the
    pattern's first ``num_layers`` entries. ``window``: the sliding window (or attention chunk) of
    families with windowed layers; ``sliding=True`` sets it on families where it is optional
    (see :func:`optional_window`)."""
    from transformers import AutoConfig

    try:
        default = _default_config(model_type)
    except Exception as exc:
        special = _SPECIAL.get(model_type)
        if not isinstance(special, dict):
            raise NotBuildable("config error", repr(exc)[:300]) from exc
        try:  # a default config that fails its own validation (gemma4_assistant)
            default = AutoConfig.for_model(model_type, **special)
        except Exception:
            raise NotBuildable("config error", repr(exc)[:300]) from exc
    defaults = default.to_dict()
    # sub-configs of other models (vision, audio, encoder ...); MPT's / DBRX's attn_config and
    # ffn_config are settings of the decoder itself
    subs = [k for k, v in defaults.items() if isinstance(v, dict) and k.endswith("_config")
            and k not in ("per_layer_config", "attn_config", "ffn_config")]
    if subs and isinstance(defaults.get("text_config"), dict) and defaults["text_config"].get("model_type"):
        return _composite_config(model_type, defaults, num_layers, layer, window, sliding)
    if subs:
        raise NotBuildable("composite/multimodal", f"sub-configs {subs}")
    kwargs = _overrides(model_type, defaults, num_layers, layer, window, sliding)
    error = ""
    for _ in range(8):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = AutoConfig.for_model(model_type, **kwargs)
        except Exception as exc:
            error = repr(exc)
            field = _FIELD_INT.search(error)
            if field:  # the family insists on an id: use the default, folded into the vocabulary
                name = field.group(1)
                kwargs[name] = int(defaults.get(name) or 0) % VOCAB
                continue
            if "num_key_value_heads must match num_attention_heads" in error:
                kwargs["num_key_value_heads"] = HEADS
                continue
            raise NotBuildable("config error", error[:300]) from exc
        if "is_decoder" in defaults and not defaults.get("is_decoder"):
            config.is_decoder = True  # BERT-likes run as causal LMs only as decoders
        return config
    raise NotBuildable("config error", error[:300])


# token ids of a wrapper's media placeholders (image, audio ...) go here, above the ids the tests
# draw for text, so a text-only stream never holds one
MEDIA_TOKEN_BASE = 100
# SAM's (GOT-OCR2's) MLP and neck widths have names of their own
_MEDIA_SIZES = {"image_size": 32, "patch_size": 8, "mlp_dim": 128, "output_channels": 64}


def _shrink_sub(config: dict) -> dict:
    """A vision / audio sub-config, shrunk with the generic rules (its own towers are never run
    by a text-only stream, but they are built)."""
    out = dict(config)
    out.update(_overrides(config.get("model_type", ""), config, 2))
    for name, value in _MEDIA_SIZES.items():
        if isinstance(config.get(name), int):
            out[name] = value
    for name, value in config.items():
        if isinstance(value, dict) and name.endswith("_config"):
            out[name] = _shrink_sub(value)
    return out


def _composite_config(model_type: str, defaults: dict, num_layers: int, layer, window: int, sliding: bool):
    """A multimodal wrapper: its text sub-config exactly as :func:`tiny_config` makes the text
    family (so the wrapper is checked against the same references), its other towers shrunk, and
    its media token ids above the text ids."""
    from transformers import AutoConfig

    text_type = defaults["text_config"]["model_type"]
    text = tiny_config(text_type, num_layers, layer, window, sliding).to_dict()
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):  # some wrappers read them (Gemma 4's pad)
        if isinstance(defaults["text_config"].get(name), int):
            text[name] = defaults["text_config"][name] % 3
    kwargs: dict = {"text_config": text}
    for name, value in defaults.items():
        if isinstance(value, dict) and name.endswith("_config") and name != "text_config":
            kwargs[name] = _shrink_sub(value)
    media = 0
    for name, value in defaults.items():
        if isinstance(value, int) and not isinstance(value, bool) and name.endswith(("token_id", "token_index")):
            if name in ("pad_token_id", "bos_token_id", "eos_token_id"):
                kwargs[name] = value % 3
            else:
                kwargs[name] = MEDIA_TOKEN_BASE + media
                media += 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoConfig.for_model(model_type, **kwargs)
    except Exception as exc:
        raise NotBuildable("config error", f"composite {model_type}: {exc!r}"[:300]) from exc


def text_type_of(model_type: str) -> str:
    """The text family inside a multimodal wrapper (``gemma3`` -> ``gemma3_text``), else itself."""
    try:
        text = _default_config(model_type).to_dict().get("text_config")
    except Exception:
        return model_type
    return text["model_type"] if isinstance(text, dict) and text.get("model_type") else model_type


@torch.no_grad()
def reinit_(model: torch.nn.Module, seed: int = SEED) -> None:
    """Overwrite every parameter from a seeded generator, in sorted-name order."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    for name in sorted(params):
        p = params[name]
        if p.ndim >= 2:
            noise = torch.randn(p.shape, generator=gen) * WEIGHT_STD
        elif name.endswith("bias"):
            noise = torch.randn(p.shape, generator=gen) * BIAS_STD
        else:
            noise = 1.0 + torch.randn(p.shape, generator=gen) * NORM_STD
        p.copy_(noise.to(p.dtype))


def tiny_model(model_type: str, num_layers: int = 2, attn_implementation: str = "eager", config=None,
               layer=None, window: int = SLIDING_WINDOW, sliding: bool = False):
    """A tiny deterministic random-weight model of ``model_type`` (float32, eval mode).

    Each call copies the config, since ``from_config(..., attn_implementation=...)`` writes
    onto the config object it is given.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config if config is not None else tiny_config(model_type, num_layers, layer, window, sliding))
    torch.manual_seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    n = sum(p.numel() for p in model.parameters())
    if n > MAX_PARAMS:
        raise NotBuildable("too large", f"{n} parameters after shrinking")
    if hasattr(model, "set_default_language") and getattr(config, "languages", None):
        model.set_default_language(list(config.languages)[0])  # X-MOD: adapters per language
    model = model.to(torch.float32)
    reinit_(model)
    model.eval()
    return model


def tiny_model_for_demo(model_type: str, num_layers: int = 4, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """:func:`tiny_model`, falling back to eager attention for families without sdpa (BLOOM, MPT, ...).

    >>> model = tiny_model_for_demo("bloom")   # doctest: +SKIP
    """
    try:
        return tiny_model(model_type, num_layers, attn_implementation)
    except ValueError as exc:
        if attn_implementation == "eager" or "attention implementation" not in str(exc):
            raise
        return tiny_model(model_type, num_layers, "eager")
