"""The few facts about transformers' cache objects the press depends on, in one place.

Everything here is read off the live objects (attribute names, class names), never off
version strings, so the press works from transformers 4.56 (the first release with
per-layer caches) through 5.x.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from .errors import UnsupportedGenerationError

# Names under which a cache travels into a model's forward, newest first.
MODEL_CACHE_KWARGS = ("cache", "past_key_values")
# The only layer type the press trims. A StaticLayer has a fixed size and a
# sliding-window layer trims on its own: both would fight the press.
SUPPORTED_LAYER_TYPES = ("DynamicLayer",)


def self_attention_cache(cache: Any) -> Any:
    """The decoder self-attention part of a cache (GPT-2 may wrap it in an EncoderDecoderCache)."""
    return getattr(cache, "self_attention_cache", cache)


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


def check_layer_type(layer: Any) -> None:
    name = type(layer).__name__
    if name not in SUPPORTED_LAYER_TYPES:
        raise UnsupportedGenerationError(
            f"the press cannot serve a cache made of {name} layers: it trims transformers' dynamic cache "
            "(DynamicLayer). Static caches (cache_implementation='static'), sliding-window and quantized caches "
            "are not supported; use the default dynamic cache."
        )


def layer_length(layer: Any) -> int:
    keys = getattr(layer, "keys", None)
    if keys is None or keys.numel() == 0:
        return 0
    return keys.shape[-2]


def cache_length(cache: Any) -> int:
    layers = cache_layers(cache)
    return layer_length(layers[0]) if layers else 0


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
