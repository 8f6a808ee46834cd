"""kvpress-lite: StreamingLLM KV-cache compression for Hugging Face transformers, through hooks.

>>> import kvpress_lite as kvl                                   # doctest: +SKIP
>>> press = kvl.apply_press(model, n_sink=4, capacity=256)       # doctest: +SKIP
>>> out = model.generate(input_ids, max_new_tokens=2000)         # doctest: +SKIP
>>> press.stats.cache_length[0]                                  # doctest: +SKIP
256
>>> press.remove()                                               # doctest: +SKIP
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from .adapter import Adapter, Refusal, Wrapper
from .chat import Chat, ChatError
from .positions import (
    AbsoluteEmbedding,
    Alibi,
    PositionScheme,
    Rotary,
    Trim,
    alibi_positions,
    learned_positions,
    no_positions,
    rope_positions,
    sinusoidal_positions,
)
from .errors import (
    KVPressLiteError,
    PressAlreadyAppliedError,
    UnsupportedGenerationError,
    UnsupportedModelError,
)
from .hookspecs import hookimpl
from .persist import load_cache, save_cache
from .press import PressStats, StreamingLLMPress
from .registry import AdapterInfo, available_adapters, find_adapter
from .static import StreamingCache
from .verify import VerifyReport, verify

__version__ = "0.1.0"


def apply_press(
    model: nn.Module,
    n_sink: int = 4,
    capacity: Optional[int] = None,
    *,
    compression_ratio: Optional[float] = None,
    position_shift: bool = True,
    prefill_chunk_size: Optional[int] = None,
    adapter: Adapter | str | None = None,
) -> StreamingLLMPress:
    """Attach a StreamingLLM press to ``model`` and return it (usable as a context manager).

    ``capacity`` defaults to 256 when neither it nor ``compression_ratio`` is given. The
    adapter is found through the registry unless ``adapter`` names one. See
    :class:`StreamingLLMPress` for the parameters.

    >>> press = apply_press(model, n_sink=4, capacity=256)      # doctest: +SKIP
    >>> with apply_press(model, n_sink=4, capacity=256):         # doctest: +SKIP
    ...     model.generate(input_ids, max_new_tokens=1000)
    """
    press = StreamingLLMPress(
        n_sink=n_sink,
        capacity=capacity,
        compression_ratio=compression_ratio,
        position_shift=position_shift,
        prefill_chunk_size=prefill_chunk_size,
    )
    return press.register(model, adapter=adapter)


__all__ = [
    "AbsoluteEmbedding",
    "Adapter",
    "AdapterInfo",
    "Alibi",
    "Chat",
    "ChatError",
    "load_cache",
    "save_cache",
    "verify",
    "VerifyReport",
    "KVPressLiteError",
    "PositionScheme",
    "PressAlreadyAppliedError",
    "PressStats",
    "Refusal",
    "Wrapper",
    "Rotary",
    "StreamingCache",
    "StreamingLLMPress",
    "Trim",
    "UnsupportedGenerationError",
    "UnsupportedModelError",
    "apply_press",
    "available_adapters",
    "find_adapter",
    "alibi_positions",
    "hookimpl",
    "learned_positions",
    "no_positions",
    "rope_positions",
    "sinusoidal_positions",
]
