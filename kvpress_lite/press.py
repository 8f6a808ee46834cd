"""The StreamingLLM press: its parameters, its statistics, and attaching it to a model.

:class:`StreamingLLMPress` is configuration only; registering it on a model creates an
:class:`~kvpress_lite.attachment.Attachment` that holds the hooks and the runtime state.
"""

from __future__ import annotations

import logging
import numbers
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import nn

from .adapter import Adapter, base_model
from .attachment import Attachment
from .core import as_int, validate_budget
from .errors import PressAlreadyAppliedError

logger = logging.getLogger(__name__)

DEFAULT_CAPACITY = 256  # entries per layer when neither capacity nor compression_ratio is given


def np_bool_types() -> tuple:
    """numpy's bool type where numpy is installed (a ``np.bool_`` is a fine position_shift)."""
    try:
        import numpy

        return (numpy.bool_,)
    except ImportError:  # pragma: no cover
        return ()

# base model -> the press hooked on it; guards against two presses on one model
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, StreamingLLMPress]" = weakref.WeakKeyDictionary()


@dataclass
class PressStats:
    """What the press has done so far.

    ``compressions``: model calls in which entries were evicted; ``evicted_tokens``: entries
    evicted per layer, summed over batch rows; ``cache_length``: entries per layer after the
    latest call; ``capacity``: the capacity in force for the latest stream; ``streams``:
    caches the press has served; ``seen_tokens``: tokens taken in by the latest stream.
    """

    compressions: int = 0
    evicted_tokens: int = 0
    cache_length: list[int] = field(default_factory=list)
    capacity: Optional[int] = None
    streams: int = 0
    seen_tokens: int = 0


@dataclass
class StreamingLLMPress:
    """Keep the first ``n_sink`` tokens and the most recent ``capacity - n_sink`` in every layer's cache.

    StreamingLLM (Xiao et al., 2023, https://arxiv.org/abs/2309.17453). After every forward
    call each layer holds at most ``capacity`` entries. During a call of ``q`` new tokens,
    each new token attends to every stored entry (at most ``capacity``) plus the new
    tokens before it, then the oldest window entries are dropped.

    Parameters
    ----------
    n_sink:
        Number of first tokens kept for the whole stream (the attention sinks).
    capacity:
        Entries kept per layer (default 256 when ``compression_ratio`` is not given either).
        At most one of ``capacity`` and ``compression_ratio``.
    compression_ratio:
        In (0, 1): the capacity is set per stream from its first input (the prompt) to keep
        ``1 - compression_ratio`` of it.
    position_shift:
        True (default, the paper): positions are assigned within the cache. For RoPE
        families the query and every kept key relate as if the cache held positions
        0..L-1 contiguously; for learned absolute positions (GPT-2) new tokens get the
        cache slot they land in, at most ``capacity - 1``. False: positions stay absolute.
    prefill_chunk_size:
        A call whose tokens would overflow the cache is processed in chunks of at most this
        many tokens, so peak KV memory stays at ``capacity + prefill_chunk_size``. Default:
        ``capacity - n_sink``. A prompt token then sees the sinks, the window as it stood
        when its chunk began, and the tokens of its chunk before it.

    Example
    -------
    >>> press = StreamingLLMPress(n_sink=4, capacity=256)      # doctest: +SKIP
    >>> with press(model):                                      # doctest: +SKIP
    ...     out = model.generate(input_ids, max_new_tokens=2000)
    """

    n_sink: int = 4
    capacity: Optional[int] = None
    compression_ratio: Optional[float] = None
    position_shift: bool = True
    prefill_chunk_size: Optional[int] = None

    def __post_init__(self) -> None:
        if self.capacity is not None and self.compression_ratio is not None:
            raise ValueError(
                "give one of capacity (entries kept per layer, e.g. capacity=256) or compression_ratio (fraction of "
                f"the prompt to drop, e.g. 0.7), not both; got capacity={self.capacity}, "
                f"compression_ratio={self.compression_ratio}"
            )
        if self.capacity is None and self.compression_ratio is None:
            self.capacity = DEFAULT_CAPACITY
        self.n_sink = as_int("n_sink", self.n_sink)
        if self.capacity is not None:
            self.capacity = as_int("capacity", self.capacity)
            validate_budget(self.n_sink, self.capacity)
        else:
            validate_budget(self.n_sink, self.n_sink + 1)
            ratio = self.compression_ratio
            if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 < ratio < 1:
                raise ValueError(f"compression_ratio must be a number strictly between 0 and 1, got {ratio!r}")
            self.compression_ratio = float(ratio)
        if not isinstance(self.position_shift, (bool, np_bool_types())):
            raise ValueError(
                f"position_shift must be True or False, got {type(self.position_shift).__name__} "
                f"({self.position_shift!r})"
            )
        self.position_shift = bool(self.position_shift)
        if self.prefill_chunk_size is not None:
            self.prefill_chunk_size = as_int("prefill_chunk_size", self.prefill_chunk_size)
            if self.prefill_chunk_size < 1:
                raise ValueError(f"prefill_chunk_size must be a positive int, got {self.prefill_chunk_size!r}")
        self.stats = PressStats(capacity=self.capacity)
        self._attachment: Optional[Attachment] = None

    # -- lifecycle ---------------------------------------------------------------------
    def register(self, model: nn.Module, adapter: Adapter | str | None = None) -> "StreamingLLMPress":
        """Attach the press's hooks to ``model`` (a transformers causal LM or its base model).

        ``adapter`` forces an adapter (an :class:`Adapter` or a registered name); by default
        the registry picks the one recognising the model. Returns the press.

        >>> press = StreamingLLMPress(n_sink=4, capacity=256).register(model)  # doctest: +SKIP
        """
        from .registry import find_adapter

        if self._attachment is not None:
            raise PressAlreadyAppliedError("this press is already registered on a model; call press.remove() first")
        base = base_model(model)  # a second press is refused whichever adapter it would use
        if base in _ACTIVE:
            raise PressAlreadyAppliedError(
                f"{type(model).__name__} already carries a kvpress-lite press; call .remove() on it before applying "
                "another (two presses would trim the same cache twice)"
            )
        chosen = adapter if isinstance(adapter, Adapter) else find_adapter(model, adapter)
        self._attachment = Attachment(self, model, chosen)
        _ACTIVE[base] = self
        layers = self._attachment.layers
        logger.info(
            "kvpress-lite: %s press (n_sink=%d, capacity=%s) on %s via adapter %r (%s): %d pressed layers, %d sliding",
            "shifted" if self.position_shift else "absolute-position", self.n_sink,
            self.capacity if self.capacity is not None else f"{1 - self.compression_ratio:.0%} of prompt",
            type(model).__name__, chosen.name, self._attachment.scheme.description,
            len(layers.pressed), len(layers.sliding),
        )
        return self

    @property
    def adapter(self) -> Optional[Adapter]:
        """The adapter serving the model the press is registered on (None when not registered)."""
        return self._attachment.adapter if self._attachment else None

    @property
    def positions(self):
        """The position scheme in force (None when not registered)."""
        return self._attachment.scheme if self._attachment else None

    def remove(self) -> None:
        """Remove every hook; the model then behaves exactly as before. Safe to call twice."""
        attachment, self._attachment = self._attachment, None
        if attachment is None:
            return
        attachment.detach()
        key = base_model(attachment.model)
        if _ACTIVE.get(key) is self:
            del _ACTIVE[key]

    def __call__(self, model: nn.Module, adapter: Adapter | str | None = None) -> "StreamingLLMPress":
        """``with press(model): ...`` registers on entry and removes on exit."""
        return self.register(model, adapter)

    def __enter__(self) -> "StreamingLLMPress":
        if self._attachment is None:
            raise RuntimeError("register the press on a model first: `with press(model):` or `with apply_press(model):`")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()
