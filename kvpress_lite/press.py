"""The StreamingLLM press: hook lifecycle, stream bookkeeping and statistics.

Three kinds of hooks, none of which replaces a ``forward`` or edits transformers:

* a forward **pre-hook on the base model** (``model.base_model``) sees every call first:
  it recognises the stream (the cache object), supplies ``position_ids`` (and
  ``cache_position`` where the model still takes it), replaces a padding mask with one
  that matches the compacted cache, splits a long prompt into chunks, and plans which
  entries every layer will keep;
* a forward **post-hook on every attention module** trims that layer's cache right after
  the attention used it, i.e. *after* the cache update: the causal mask was sized before
  any layer ran, so trimming earlier breaks it (field notes, section 3);
* a forward **post-hook on the base model** commits the stream's counters and stitches
  the hidden states of a chunked prompt back together.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from . import cache_access
from .adapter import Adapter, LearnedPositions, PositionScheme, Rope, base_model
from .core import validate_budget
from .errors import PressAlreadyAppliedError, UnsupportedGenerationError
from .stream import CallPlan, LayerState, Stream, apply_plan, commit_plan, plan_call, positions_for, rebase

logger = logging.getLogger(__name__)

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
        Entries kept per layer. Exactly one of ``capacity`` and ``compression_ratio``.
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
        if (self.capacity is None) == (self.compression_ratio is None):
            raise ValueError(
                "give exactly one of capacity (entries kept per layer, e.g. capacity=256) or compression_ratio "
                f"(fraction of the prompt to drop, e.g. 0.7); got capacity={self.capacity}, "
                f"compression_ratio={self.compression_ratio}"
            )
        if self.capacity is not None:
            validate_budget(self.n_sink, self.capacity)
        else:
            validate_budget(self.n_sink, self.n_sink + 1)
            ratio = self.compression_ratio
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
                raise ValueError(f"compression_ratio must be a number strictly between 0 and 1, got {ratio!r}")
        if self.prefill_chunk_size is not None and (
            not isinstance(self.prefill_chunk_size, int) or self.prefill_chunk_size < 1
        ):
            raise ValueError(f"prefill_chunk_size must be a positive int, got {self.prefill_chunk_size!r}")
        self.stats = PressStats(capacity=self.capacity)
        self._model: Optional[nn.Module] = None
        self._handles: list = []
        self._streams: "weakref.WeakKeyDictionary[Any, Stream]" = weakref.WeakKeyDictionary()
        self._call: Optional[CallPlan] = None
        self._chunk_outputs: Optional[list] = None
        # RoPE positions handed to the model stay below this (see stream.rebase); 2**15 keeps
        # float32 angles within ~2e-3 rad at the highest frequency.
        self._rebase_period = max(2**15, 4 * (self.capacity or 0))

    # -- lifecycle ---------------------------------------------------------------------
    def register(self, model: nn.Module, adapter: Adapter | str | None = None) -> "StreamingLLMPress":
        """Attach the press's hooks to ``model`` (a transformers causal LM or its base model).

        ``adapter`` forces an adapter (an :class:`Adapter` or a registered name); by default
        the registry picks the one recognising the model. Returns the press.

        >>> press = StreamingLLMPress(n_sink=4, capacity=256).register(model)  # doctest: +SKIP
        """
        from .registry import find_adapter

        if self._model is not None:
            raise PressAlreadyAppliedError("this press is already registered on a model; call press.remove() first")
        base = base_model(model)
        if base in _ACTIVE:
            raise PressAlreadyAppliedError(
                f"{type(model).__name__} already carries a kvpress-lite press; call .remove() on it before applying "
                "another (two presses would trim the same cache twice)"
            )
        self.adapter = adapter if isinstance(adapter, Adapter) else find_adapter(model, adapter)
        self.positions: PositionScheme = self.adapter.positions(model) if self.position_shift else _absolute(model, self.adapter)
        if isinstance(self.positions, LearnedPositions) and self.position_shift and self.capacity is not None:
            if self.capacity > self.positions.max_positions:
                raise ValueError(
                    f"capacity={self.capacity} exceeds the {self.positions.max_positions} learned positions of "
                    f"{type(model).__name__}: cache slots past {self.positions.max_positions - 1} have no position "
                    f"embedding. Use capacity <= {self.positions.max_positions}."
                )
        attentions = self.adapter.attention_modules(model)
        self._base_kwargs = set(inspect.signature(base.forward).parameters)
        self._model, self._base, self._n_layers = model, base, len(attentions)
        try:
            self._handles.append(base.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            self._handles.append(base.register_forward_hook(self._post_hook, with_kwargs=True))
            for index, attention in enumerate(attentions):
                name = self.adapter.cache_kwarg(attention)
                layer_idx = getattr(attention, "layer_idx", None)
                layer_idx = index if layer_idx is None else layer_idx
                self._handles.append(
                    attention.register_forward_hook(self._attention_hook(layer_idx, name), with_kwargs=True)
                )
        except Exception:
            self.remove()
            raise
        _ACTIVE[base] = self
        logger.info(
            "kvpress-lite: %s press (n_sink=%d, capacity=%s) on %s via adapter %r, %d attention layers",
            "shifted" if self.position_shift else "absolute-position", self.n_sink,
            self.capacity if self.capacity is not None else f"{1 - self.compression_ratio:.0%} of prompt",
            type(model).__name__, self.adapter.name, len(attentions),
        )
        return self

    def remove(self) -> None:
        """Remove every hook; the model then behaves exactly as before. Safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._model is not None and _ACTIVE.get(self._base) is self:
            del _ACTIVE[self._base]
        self._model = None
        self._call = None
        self._streams = weakref.WeakKeyDictionary()

    def __call__(self, model: nn.Module, adapter: Adapter | str | None = None) -> "StreamingLLMPress":
        """``with press(model): ...`` registers on entry and removes on exit."""
        return self.register(model, adapter)

    def __enter__(self) -> "StreamingLLMPress":
        if self._model is None:
            raise RuntimeError("register the press on a model first: `with press(model):` or `with apply_press(model):`")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    # -- hooks -----------------------------------------------------------------------
    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        if self._call is not None:  # the previous call raised before finishing: its cache is inconsistent
            self._call.stream.broken = True
            self._call = None
        kwargs = dict(kwargs)
        if args:  # transformers passes everything by keyword; a user may pass input_ids positionally
            kwargs.setdefault("input_ids", args[0])
            args = ()
        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is None:
            return None
        cache_name, cache = _find_cache(kwargs)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(module.config, "use_cache", True)
        if cache is None and not use_cache:
            return None  # no cache, nothing to press
        batch, q = tokens.shape[0], tokens.shape[1]
        if cache is None:
            cache = cache_access.new_dynamic_cache(module)
            cache_name = next(n for n in cache_access.MODEL_CACHE_KWARGS if n in self._base_kwargs)
            kwargs[cache_name] = cache
        kwargs.pop("past_key_values" if cache_name == "cache" else "cache", None)
        stream = self._stream_for(cache, batch, q, kwargs.get("attention_mask"))
        new_valid = self._new_token_mask(kwargs.get("attention_mask"), stream, q)

        chunk = self.prefill_chunk_size or stream.window
        if stream.stored + q > stream.capacity and q > chunk and self._chunk_outputs is None:
            return (), self._run_prefix_chunks(module, kwargs, q, chunk)

        if isinstance(self.positions, LearnedPositions) and not self.position_shift:
            last = stream.longest_row + q
            if last > self.positions.max_positions:
                raise UnsupportedGenerationError(
                    f"position_shift=False keeps absolute positions, and this stream reaches position {last - 1}, past "
                    f"the {self.positions.max_positions} learned positions of the model. Use position_shift=True."
                )
        _check_not_rewound(kwargs, stream)
        if self.position_shift and isinstance(self.positions, Rope) and self.positions.rotary_dims:
            if rebase(stream, cache_access.cache_layers(kwargs[cache_name]), self.positions, self._rebase_period):
                logger.debug("kvpress-lite: rebased positions by %d", stream.offset)
        plan = plan_call(stream, q, new_valid)
        kwargs["position_ids"] = positions_for(stream, plan, new_valid, self.positions, self.position_shift).to(tokens.device)
        if "cache_position" in self._base_kwargs:  # transformers < 5.x: mask and cache read it
            kwargs["cache_position"] = torch.arange(stream.stored, stream.stored + q, device=tokens.device)
        if stream.padded:
            mask = torch.cat([stream.valid, new_valid], dim=1) if stream.stored else new_valid
            kwargs["attention_mask"] = mask.to(device=tokens.device, dtype=torch.long)
        elif kwargs.get("attention_mask") is not None and kwargs["attention_mask"].dim() == 2:
            kwargs["attention_mask"] = None  # all ones, and sized for the uncompressed stream
        self._call = plan
        return (), kwargs

    def _attention_hook(self, layer_idx: int, cache_kwarg: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            plan = self._call
            cache = kwargs.get(cache_kwarg)
            if plan is None or cache is None:
                return None
            layers = cache_access.cache_layers(cache)
            stream = plan.stream
            while len(stream.layers) <= layer_idx:
                stream.layers.append(LayerState())
            layer = layers[layer_idx]
            cache_access.check_layer_type(layer)
            apply_plan(plan, layer, stream.layers[layer_idx], self.positions, self.position_shift)
            return None

        return hook

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        plan, self._call = self._call, None
        if plan is None:
            return None
        stream = plan.stream
        commit_plan(plan)
        stats = self.stats
        if plan.kind != "none":
            stats.compressions += 1
            stats.evicted_tokens += plan.evicted
        stats.cache_length = [stream.stored] * self._n_layers
        stats.seen_tokens = stream.longest_row
        stats.capacity = stream.capacity
        return None if self._chunk_outputs is None or self._chunk_outputs == [] else self._stitch(output)

    # -- helpers -----------------------------------------------------------------------
    def _stream_for(self, cache: Any, batch: int, q: int, attention_mask: Optional[torch.Tensor]) -> Stream:
        key = cache_access.self_attention_cache(cache)
        stream = self._streams.get(key)
        layers = cache_access.cache_layers(cache)
        for layer in layers:
            cache_access.check_layer_type(layer)
        if stream is not None:
            if stream.broken:
                raise UnsupportedGenerationError(
                    "an earlier call on this cache failed part-way, so its layers disagree; start a new cache"
                )
            for state, layer in zip(stream.layers, layers):
                if state.keys_ref is not None and layer.keys is not state.keys_ref:
                    stream.broken = True
                    raise UnsupportedGenerationError(
                        "the cache was changed outside the press (beam search, assisted/speculative decoding, or a "
                        "manual crop or reorder). The press serves greedy and sampling decoding with one cache per "
                        "stream; use num_beams=1 and no assistant model."
                    )
            if stream.batch != batch:
                raise UnsupportedGenerationError(
                    f"this cache holds a batch of {stream.batch} rows but the call has {batch}; the press cannot "
                    "follow a batch that changes size mid-stream (beam search or batch reordering)"
                )
            return stream
        existing = cache_access.cache_length(cache) if layers else 0
        capacity = self._capacity_for(q)
        if existing > capacity:
            raise UnsupportedGenerationError(
                f"this cache already holds {existing} entries (more than capacity={capacity}) that were not produced "
                "under this press; start from an empty cache after applying the press"
            )
        stream = Stream(self.n_sink, capacity, batch)
        stream.stored = stream.real_seen = existing
        mask = attention_mask
        if mask is not None and mask.dim() == 2 and not bool(mask.all()):
            if existing:
                raise UnsupportedGenerationError(
                    "a padded batch must start from an empty cache when the press is applied"
                )
            stream.start_padding(torch.zeros(batch, 0, dtype=torch.bool))
        else:
            stream.sinks_fixed = True
        self._streams[key] = stream
        self.stats.streams += 1
        logger.debug("kvpress-lite: new stream (batch=%d, capacity=%d, padded=%s)", batch, capacity, stream.padded)
        return stream

    def _capacity_for(self, prompt_length: int) -> int:
        if self.capacity is not None:
            return self.capacity
        capacity = int(prompt_length * (1 - self.compression_ratio))
        if capacity <= self.n_sink:
            raise ValueError(
                f"compression_ratio={self.compression_ratio} on a prompt of {prompt_length} tokens leaves a capacity "
                f"of {capacity}, not more than n_sink={self.n_sink}; use a smaller ratio or a fixed capacity"
            )
        if isinstance(self.positions, LearnedPositions) and capacity > self.positions.max_positions:
            capacity = self.positions.max_positions
        return capacity

    def _new_token_mask(self, mask: Optional[torch.Tensor], stream: Stream, q: int) -> Optional[torch.Tensor]:
        if mask is None:
            if stream.padded:
                return torch.ones(stream.batch, q, dtype=torch.bool)
            return None
        if mask.dim() != 2:
            raise UnsupportedGenerationError(
                f"the press builds its own attention mask and cannot honour a {mask.dim()}D attention_mask; "
                "pass a 2D padding mask (batch, tokens) or none"
            )
        new = mask[:, -q:].bool().cpu()
        if not stream.padded:
            if not bool(new.all()):
                raise UnsupportedGenerationError(
                    "padding appeared in the middle of an unpadded stream; pad prompts on the left, at the start"
                )
            return None
        return new

    def _run_prefix_chunks(self, module: nn.Module, kwargs: dict, q: int, chunk: int) -> dict:
        """Run all but the last chunk of a long call now; return the kwargs of the last chunk."""
        key = "input_ids" if kwargs.get("input_ids") is not None else "inputs_embeds"
        tokens, mask = kwargs[key], kwargs.get("attention_mask")
        for banned in ("labels", "output_attentions"):
            if kwargs.get(banned):
                raise UnsupportedGenerationError(
                    f"{banned} is not supported when the press splits a long input into chunks; "
                    "compute it from the logits"
                )
        starts = list(range(0, q, chunk))
        logger.info("kvpress-lite: %d tokens overflow capacity; prefilling in %d chunks of <= %d", q, len(starts), chunk)
        outputs = []
        self._chunk_outputs = []
        try:
            for start in starts[:-1]:
                part = dict(kwargs, **{key: tokens[:, start : start + chunk]})
                part.pop("position_ids", None)
                part.pop("cache_position", None)
                if mask is not None and mask.dim() == 2:
                    part["attention_mask"] = mask[:, : start + chunk]
                outputs.append(module(**part))
        finally:
            self._chunk_outputs = None
        last = dict(kwargs, **{key: tokens[:, starts[-1] :]})
        last.pop("position_ids", None)
        last.pop("cache_position", None)
        self._chunk_outputs = outputs
        # plan the last chunk through the normal path
        result = self._pre_hook(module, (), last)
        return result[1]

    def _stitch(self, output: Any):
        """Prepend the hidden states of the earlier chunks to the last chunk's output."""
        earlier, self._chunk_outputs = self._chunk_outputs, None
        if isinstance(output, tuple):
            first = torch.cat([o[0] for o in earlier] + [output[0]], dim=1)
            return (first,) + output[1:]
        output["last_hidden_state"] = torch.cat([o["last_hidden_state"] for o in earlier] + [output["last_hidden_state"]], dim=1)
        hidden = output.get("hidden_states") if hasattr(output, "get") else None
        if hidden is not None:
            output["hidden_states"] = tuple(
                torch.cat([o["hidden_states"][i] for o in earlier] + [h], dim=1) for i, h in enumerate(hidden)
            )
        return output


def _find_cache(kwargs: dict) -> tuple[Optional[str], Any]:
    for name in cache_access.MODEL_CACHE_KWARGS:
        if kwargs.get(name) is not None:
            cache = kwargs[name]
            if isinstance(cache, (tuple, list)):
                raise UnsupportedGenerationError(
                    "legacy tuple caches are not supported; pass a transformers.DynamicCache (or no cache)"
                )
            return name, cache
    return None, None


def _check_not_rewound(kwargs: dict, stream: Stream) -> None:
    """generate() hands absolute positions; if they start before the tokens the stream already
    took in, generation went back (assisted/speculative decoding rejected tokens and cropped
    the cache) and the compacted cache cannot follow."""
    given = kwargs.get("position_ids")
    if given is None:
        given = kwargs.get("cache_position")  # transformers 4.x, absolute in generate()
        expected = stream.real_seen if not stream.padded else None
    else:
        expected = stream.real_seen
    if given is None or expected is None or given.numel() == 0:
        return
    first = given.reshape(-1, given.shape[-1])[:, 0].cpu()
    if bool((first < torch.as_tensor(expected)).any()):
        stream.broken = True
        raise UnsupportedGenerationError(
            "the stream went back: this call starts at a position the press has already taken in. That is what "
            "assisted/speculative decoding (or a manual cache crop) does when it rejects tokens; the press serves "
            "greedy and sampling decoding only."
        )


def _absolute(model: nn.Module, adapter: Adapter) -> PositionScheme:
    """Position scheme for ``position_shift=False``: nothing moves; learned tables still bound the stream."""
    try:
        scheme = adapter.positions(model)
    except Exception:  # e.g. dynamic RoPE: fine when positions stay absolute
        return Rope(inv_freq=torch.zeros(0, dtype=torch.float64))
    return scheme
