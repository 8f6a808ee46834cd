"""The few facts about transformers' cache and model objects the press depends on, in one place.

Everything here is read off the live objects (attribute names, class names), never off
version strings, so the press works from transformers 4.56 (the first release with
per-layer caches) through 5.x.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .errors import UnsupportedGenerationError

# Names under which a cache travels into a model's forward, newest first.
MODEL_CACHE_KWARGS = ("cache", "past_key_values")
# How the press treats a cache layer, by what the layer declares (`is_sliding`, a fixed
# size), never by its class name:
FULL = "full"  # grows with every token: the press keeps sinks + window
SLIDING = "sliding"  # keeps its own last `sliding_window - 1` entries: left to transformers
RECURRENT = "recurrent"  # a hybrid's SSM / linear-attention / convolution state: fixed size, left whole
# config.layer_types entries of a hybrid's layers without attention (nothing of theirs is pressed)
RECURRENT_LAYER_TYPES = frozenset({"linear_attention", "conv", "mamba", "mamba2", "recurrent", "moe", "mlp"})


def base_model(model: nn.Module) -> nn.Module:
    """The decoder without its head (``model.model`` of a Llama, ``model.transformer`` of GPT-2).

    Some causal LMs name a ``base_model_prefix`` they do not have (Gemma 3 text on
    transformers 4.5x says ``language_model`` and holds ``model``): then ``model.model``."""
    base = getattr(model, "base_model", model)
    if base is model and isinstance(getattr(model, "model", None), nn.Module):
        return model.model
    return base


def self_attention_cache(cache: Any) -> Any:
    """The decoder self-attention part of a cache (GPT-2 may wrap it in an EncoderDecoderCache)."""
    return getattr(cache, "self_attention_cache", cache)


STREAM_ATTR = "_kvpress_lite_stream"


def stream_of(cache: Any) -> Any:
    """The press's stream state carried by a cache object (None for a cache no press filled).
    It travels with the cache, so a later press with the same settings continues it, and a
    copy of the cache (a branch of the conversation) carries its own copy."""
    return getattr(self_attention_cache(cache), STREAM_ATTR, None)


def attach_stream(cache: Any, stream: Any) -> None:
    setattr(self_attention_cache(cache), STREAM_ATTR, stream)


def cache_layers(cache: Any) -> list:
    """The per-layer objects of a cache, with a clear error for legacy or foreign caches."""
    cache = self_attention_cache(cache)
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise UnsupportedGenerationError(
            f"the press needs a transformers Cache with per-layer storage (`cache.layers`), got "
            f"{type(cache).__name__}. Pass a transformers.DynamicCache (or none, and let the model make one)."
        )
    return layers


def is_recurrent(layer: Any) -> bool:
    """A layer of fixed-size recurrent state (transformers 5.x ``LinearAttentionLayer``: a
    convolution window and an SSM / linear-attention state), read off what it holds."""
    return hasattr(layer, "conv_states") and hasattr(layer, "recurrent_states")


def layer_kind(layer: Any) -> str:
    """:data:`FULL` or :data:`SLIDING` for a cache layer the press can serve, :data:`RECURRENT`
    for a hybrid's state layer (nothing to trim); otherwise raise, naming the layer and what to do.
    A layer holding both (``LinearAttentionAndFullAttentionLayer``) is an attention layer here:
    the press trims its keys and values and leaves its recurrent state alone."""
    name = type(layer).__name__
    if not hasattr(layer, "keys") and is_recurrent(layer):
        return RECURRENT
    if not hasattr(layer, "keys"):
        problem = "holds no attention keys/values (an SSM, convolution or linear-attention state)"
    elif getattr(layer, "is_compileable", False) or hasattr(layer, "max_cache_len"):
        problem = "has a fixed size (a static cache, e.g. cache_implementation='static')"
    elif is_fp8(layer):
        return SLIDING if getattr(layer, "is_sliding", False) else FULL
    elif hasattr(layer, "residual_length") or hasattr(layer, "quantizer"):
        problem = ("stores its keys quantized group-wise (the quanto / HQQ backends of cache_implementation="
                   "'quantized'), as one block re-quantized as a whole at every flush of its residual buffer: "
                   "dropping entries from that block means dequantizing and re-quantizing it over another set of "
                   "tokens, a lossy round trip the press cannot make exact. Use the fp8 backend "
                   "(QuantizedCache(backend='fp8', ...)), whose entries the press trims exactly")
    else:
        return SLIDING if getattr(layer, "is_sliding", False) else FULL
    raise UnsupportedGenerationError(
        f"the press cannot serve a cache layer of type {name}: it {problem}. The press trims transformers' dynamic "
        "cache; use the default (pass no cache, or a transformers.DynamicCache)."
    )


def is_fp8(layer: Any) -> bool:
    """transformers' ``Fp8QuantizedLayer``: keys and values in float8 with one frozen per-tensor scale,
    appended as they come, so entries can be dropped or kept exactly (read off what it holds)."""
    return hasattr(layer, "fp8_dtype") and hasattr(layer, "_quantized_keys")


def stored_kv(layer: Any) -> tuple:
    """The tensors holding a layer's entries along dim -2: its keys and values, or for an fp8
    layer its float8 data viewed as bytes (gathered and copied exactly)."""
    if is_fp8(layer):
        return layer._quantized_keys[0].view(torch.uint8), layer._quantized_values[0].view(torch.uint8)
    return layer.keys, layer.values


def store_kv(layer: Any, keys: Any, values: Any) -> None:
    """Put back what :func:`stored_kv` gave (trimmed)."""
    if is_fp8(layer):
        layer._quantized_keys = (keys.view(layer.fp8_dtype), layer._quantized_keys[1])
        layer._quantized_values = (values.view(layer.fp8_dtype), layer._quantized_values[1])
    else:
        layer.keys, layer.values = keys, values


def fp8_decode(layer: Any, stored: Any, slot: str) -> Any:
    """Float values of the fp8 bytes ``stored`` of ``slot`` ("keys" / "values")."""
    scale = (layer._quantized_keys if slot == "keys" else layer._quantized_values)[1]
    return stored.view(layer.fp8_dtype).float() * scale


def fp8_encode(layer: Any, values: Any, slot: str) -> Any:
    """fp8 bytes of float ``values`` at ``slot``'s frozen scale (as the layer quantizes new entries)."""
    scale = (layer._quantized_keys if slot == "keys" else layer._quantized_values)[1]
    return (values.float() / scale).to(layer.fp8_dtype).view(torch.uint8)


def follow_trim(layer: Any) -> None:
    """Tell a layer that counts the tokens it has seen (a sliding-window layer sizes its mask
    from ``cumulative_length``) how many entries it holds after the press trimmed it."""
    if hasattr(layer, "cumulative_length"):
        layer.cumulative_length = layer_length(layer)


def layer_length(layer: Any) -> int:
    keys = stored_kv(layer)[0] if is_fp8(layer) and layer._quantized_keys is not None else getattr(layer, "keys", None)
    if keys is None or keys.numel() == 0:
        return 0
    return keys.shape[-2]


def cache_length(cache: Any, layer_idx: int = 0) -> int:
    layers = cache_layers(cache)
    return layer_length(layers[layer_idx]) if len(layers) > layer_idx else 0


def new_dynamic_cache(model: nn.Module) -> Any:
    """A fresh DynamicCache for ``model`` (the constructor's arguments moved between releases)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


def model_cache_kwarg(model: nn.Module) -> str:
    """Keyword through which ``model.forward`` takes the cache: ``cache`` (late 5.x) or ``past_key_values``.

    >>> out = model(input_ids=ids, use_cache=True, **{model_cache_kwarg(model): cache})  # doctest: +SKIP
    """
    params = inspect.signature(model.forward).parameters
    for name in MODEL_CACHE_KWARGS:
        if name in params:
            return name
    raise TypeError(f"{type(model).__name__}.forward takes none of {MODEL_CACHE_KWARGS}")


def output_cache(output: Any) -> Any:
    """The cache a model call returned, under either of its names."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)
