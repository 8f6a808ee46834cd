"""The methods the harness compares: one vocabulary, and the decoders the latency runs time.

Every name means one thing wherever it appears (latency, perplexity, compiled runs, their
tables and plots); :data:`VOCABULARY` says what. "window" is always the press without
sinks: the ``capacity`` most recent tokens at positions within the cache.

For the latency runs each method owns a *shell* of the model: a ``copy.deepcopy`` whose
parameters and buffers are the base model's own tensors (shared, not copied), so hooks and
config changes of one method never reach another and the weights sit in memory once. A
method is driven as::

    method.prepare(length)   # bring its state to a stream of `length` tokens (untimed)
    method.step()            # decode one token (timed by the runner)
    method.release()         # drop whatever prepare() can rebuild cheaply

How each reaches a stream length is written in its ``how`` text, stored in the results:
``dense`` and ``sliding_cache`` are filled with random keys/values (speed does not depend on
their values); ``sinks``, ``sinks_noshift`` and ``window`` stream every token for real;
``recompute*`` re-encode their span from scratch for every token.

>>> sorted(VOCABULARY)[:3]
['compiled_dense', 'compiled_sinks', 'dense']
"""

from __future__ import annotations

import copy
import inspect
import logging
from typing import Optional

import torch
from torch import nn

from kvpress_lite.cache_access import model_cache_kwarg, output_cache
from .measure import kv_bytes, kv_length

logger = logging.getLogger(__name__)

VOCABULARY = {
    "dense": "no press: every token sees the whole prefix; the cache grows with the stream",
    "dense_at_capacity": "dense with the KV length held at the capacity whatever the stream length (the press's "
                         "overhead reference)",
    "sinks": "the StreamingLLM press: n_sink sinks + the capacity - n_sink most recent tokens, positions within the "
             "cache",
    "sinks_noshift": "the StreamingLLM press with absolute positions (position_shift=False)",
    "window": "the press without sinks (n_sink=0): the capacity most recent tokens, positions within the cache",
    "sliding_cache": "transformers' own sliding-window cache: the capacity most recent tokens, absolute positions, "
                     "no sinks",
    "recompute": "sliding window with re-computation: every token re-encodes itself and the capacity tokens before "
                 "it from scratch, at positions 0..capacity (no sinks)",
    "recompute_sinks": "re-computation keeping the sinks: every token re-encodes the n_sink first tokens, the "
                       "capacity - n_sink before it and itself from scratch, at positions 0..capacity",
    "compiled_sinks": "the press as a static-shape kvpress_lite.StreamingCache under torch.compile",
    "compiled_dense": "transformers' StaticCache under the same torch.compile",
    "kvpress": "NVIDIA kvpress's decode-time StreamingLLM (DecodingPress), run in its own interpreter",
}


class ModelContext:
    """What every method needs to know about one model: weights, names of kwargs, KV shape."""

    def __init__(self, model: nn.Module, device: str, seed: int = 0, stream_tokens: int = 0) -> None:
        self.model = model
        self.device = str(device)
        params = set(inspect.signature(model.forward).parameters)
        self.cache_kwarg = model_cache_kwarg(model)
        self.accepts_logits_to_keep = "logits_to_keep" in params
        self.max_positions = learned_position_limit(model)
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.vocab = int(getattr(cfg, "vocab_size"))
        gen = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, self.vocab, (1, max(stream_tokens, 1)), generator=gen).to(self.device)
        # one decode step tells the KV layout: [batch, kv_heads, seq, head_dim] per layer
        with torch.no_grad():
            out = model(input_ids=self.tokens[:, :1], use_cache=True)
        cache = output_cache(out)
        layers = getattr(getattr(cache, "self_attention_cache", cache), "layers")
        self.n_layers = len(layers)
        k, v = layers[0].keys, layers[0].values
        self.kv_heads, self.head_dim, self.v_head_dim = k.shape[1], k.shape[-1], v.shape[-1]
        self.kv_dtype = k.dtype

    def shell(self) -> nn.Module:
        """A copy of the model's modules and config that shares every parameter and buffer."""
        memo = {id(t): t for t in list(self.model.parameters()) + list(self.model.buffers())}
        return copy.deepcopy(self.model, memo)

    def token(self, index: int) -> torch.Tensor:
        return self.tokens[:, index % self.tokens.shape[1]].reshape(1, 1)

    def random_kv(self, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Random keys and values ``[1, kv_heads, length, head_dim]`` (shared by all layers)."""
        gen = torch.Generator().manual_seed(seed)
        k = torch.randn(1, self.kv_heads, length, self.head_dim, generator=gen)
        v = k if self.v_head_dim == self.head_dim else torch.randn(1, self.kv_heads, length, self.v_head_dim, generator=gen)
        return k.to(self.device, self.kv_dtype), v.to(self.device, self.kv_dtype)


def learned_position_limit(model: nn.Module) -> Optional[int]:
    """Rows of a learned absolute position table (GPT-2's ``wpe``), or None for RoPE models."""
    for name, module in model.named_modules():
        if name.split(".")[-1] in ("wpe", "embed_positions") and isinstance(module, nn.Embedding):
            return module.num_embeddings
    return None


def filled_dynamic_cache(ctx: ModelContext, length: int, config=None):
    """A DynamicCache holding ``length`` random entries per layer (built through ``update``)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    if length > 0:
        k, v = ctx.random_kv(length)
        for layer in range(ctx.n_layers):
            cache.update(k, v, layer)
    return cache


class Method:
    """Base class: one way of decoding, holding its own state."""

    name = "method"
    label = "method"
    how = ""
    warmup = True  # take an untimed step before timing when no memory step does it

    def __init__(self, ctx: ModelContext) -> None:
        self.ctx = ctx
        self.note: Optional[str] = None  # per-length remark (set by prepare), goes into the results

    def prepare(self, length: int) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def after_step(self) -> None:
        """Untimed bookkeeping after a timed step."""

    def kv_bytes(self) -> int:
        """Bytes of keys and values the method's cache holds now (``self.cache``; 0 without one)."""
        return kv_bytes(self.cache) if getattr(self, "cache", None) is not None else 0

    def kv_length(self) -> int:
        return kv_length(self.cache) if getattr(self, "cache", None) is not None else 0

    def stream_position(self) -> Optional[int]:
        """Tokens the stream has taken in so far (None when the method keeps no stream)."""
        return None

    def release(self) -> None:
        """Free state that prepare() rebuilds cheaply."""

    def close(self) -> None:
        self.release()


class Dense(Method):
    """No press: a DynamicCache of ``length`` entries (or ``fixed_length``) before every step."""

    name = "dense"
    label = "dense (no press)"
    how = (
        "DynamicCache filled with random K/V of the stream length (speed does not depend on values), one token "
        "decoded, cache cropped back after each step: every timed step attends to length+1 entries."
    )

    def __init__(self, ctx: ModelContext, fixed_length: Optional[int] = None) -> None:
        super().__init__(ctx)
        self.fixed_length = fixed_length
        self.cache = None
        self.length = 0
        self.position = 0
        self.steps = 0
        if fixed_length is not None:
            self.name = "dense_at_capacity"
            self.label = f"dense at KV length {fixed_length} (overhead reference)"
            self.how = (
                f"as dense, with the KV length held at {fixed_length} (the press's capacity) whatever the stream length: "
                "the press's step at capacity C against a dense step at KV length C"
            )

    def prepare(self, length: int) -> None:
        target = self.fixed_length if self.fixed_length is not None else length
        self.position = length
        if self.cache is None or self.length != target:
            self.cache = None
            self.cache = filled_dynamic_cache(self.ctx, target)
            self.length = target
        if self.fixed_length is not None:  # positions follow the cache length, like any plain loop
            self.position = target
        limit = self.ctx.max_positions
        self.note = None
        if limit is not None and self.position >= limit:
            self.note = (
                f"positions clamped to {limit - 1}: the model has {limit} learned positions, so this is the cost of "
                "attending to this many entries, not a usable model"
            )

    def _kwargs(self) -> dict:
        kwargs = {self.ctx.cache_kwarg: self.cache, "use_cache": True}
        limit = self.ctx.max_positions
        if limit is not None and self.position >= limit:
            kwargs["position_ids"] = torch.full((1, 1), limit - 1, dtype=torch.long, device=self.ctx.device)
        return kwargs

    def step(self) -> None:
        self.ctx.model(input_ids=self.ctx.token(self.steps), **self._kwargs())
        self.steps += 1

    def after_step(self) -> None:
        # back to `length` entries (a slice: the next step's concatenation copies anyway)
        for layer in self.cache.layers:
            if layer.keys is not None and layer.keys.shape[-2] > self.length:
                layer.keys = layer.keys[..., : self.length, :]
                layer.values = layer.values[..., : self.length, :]

    def release(self) -> None:
        self.cache = None
        self.length = 0


class SlidingCache(Method):
    """transformers' sliding-window cache: the last ``capacity`` entries, no sinks, absolute positions."""

    name = "sliding_cache"
    label = "transformers' sliding-window cache"

    def __init__(self, ctx: ModelContext, capacity: int) -> None:
        super().__init__(ctx)
        self.capacity = capacity
        self.model = ctx.shell()
        # a query attends to `sliding_window` entries and the layer stores `sliding_window - 1`:
        # capacity + 1 stores exactly `capacity`, like the press
        self.model.config.sliding_window = capacity + 1
        self.layer_types = self._layer_types()
        self.how = (
            f"config.sliding_window={capacity + 1} on the model, so DynamicCache(config=...) builds "
            f"{self.layer_types} layers that store {capacity} entries; filled with random K/V and its token counter "
            "set to the stream length (positions stay absolute, as in a real stream)."
        )
        self.cache = None
        self.steps = 0

    def _layer_types(self) -> str:
        from transformers import DynamicCache

        names = sorted({type(layer).__name__ for layer in DynamicCache(config=self.model.config).layers})
        return "/".join(names) or "lazily created DynamicLayer"

    @property
    def ignored(self) -> bool:
        """True when the family's cache ignores ``sliding_window`` (then this is just dense)."""
        return "Sliding" not in self.layer_types

    def prepare(self, length: int) -> None:
        self.cache = None
        self.cache = filled_dynamic_cache(self.ctx, min(length, self.capacity), config=self.model.config)
        for layer in self.cache.layers:
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = length
        self.note = None

    def step(self) -> None:
        try:
            self.model(input_ids=self.ctx.token(self.steps), **{self.ctx.cache_kwarg: self.cache, "use_cache": True})
        except IndexError as exc:
            limit, position = self.ctx.max_positions, self.stream_position()
            if limit is not None and position is not None and position >= limit:
                raise IndexError(
                    f"{exc}: the sliding-window cache keeps absolute positions, and position {position} is past the "
                    f"{limit} learned positions of the model"
                ) from exc
            raise
        self.steps += 1

    def stream_position(self) -> Optional[int]:
        layers = getattr(self.cache, "layers", None) or []
        return getattr(layers[0], "cumulative_length", None) if layers else None

    def release(self) -> None:
        self.cache = None


class Press(Method):
    """kvpress-lite's StreamingLLM press, streamed for real."""

    def __init__(self, ctx: ModelContext, n_sink: int, capacity: int, position_shift: bool = True,
                 prefill_chunk_size: Optional[int] = None) -> None:
        import kvpress_lite

        super().__init__(ctx)
        self.name = ("sinks" if n_sink else "window") if position_shift else "sinks_noshift"
        self.label = f"kvpress-lite {n_sink}+{capacity - n_sink}, " + (
            "positions within the cache" if position_shift else "absolute positions"
        )
        self.capacity = capacity
        self.model = ctx.shell()
        self.press = kvpress_lite.apply_press(
            self.model, n_sink=n_sink, capacity=capacity, position_shift=position_shift,
            prefill_chunk_size=prefill_chunk_size,
        )
        chunk = prefill_chunk_size or capacity - n_sink
        self.how = (
            f"real stream: random tokens pushed to each length in one call per length, which the press splits into "
            f"chunks of {chunk} (cache never above {capacity}+{chunk}); then decoded token by token. "
            f"Nothing is faked: every length is reached by running every token through the model."
        )
        self.cache = None
        self.seen = 0
        self.prefill_seconds = 0.0
        self.prefill_tokens = 0

    def _call(self, tokens: torch.Tensor, **extra) -> None:
        kwargs = {self.ctx.cache_kwarg: self.cache, "use_cache": True, **extra}
        out = self.model(input_ids=tokens, **kwargs)
        self.cache = output_cache(out)

    def prepare(self, length: int) -> None:
        import time

        self.note = None
        if self.seen >= length:
            return
        extra = {"logits_to_keep": 1} if self.ctx.accepts_logits_to_keep else {}
        start = time.perf_counter()
        self._call(self.ctx.tokens[:, self.seen : length], **extra)
        self.prefill_seconds += time.perf_counter() - start
        self.prefill_tokens += length - self.seen
        self.seen = length

    def step(self) -> None:
        self._call(self.ctx.token(self.seen))
        self.seen += 1

    def stream_position(self) -> Optional[int]:
        return self.seen

    def close(self) -> None:
        self.press.remove()
        self.cache = None


class Recompute(Method):
    """Sliding window with re-computation: re-encode (sinks +) window from scratch for every token."""

    warmup = False  # one forward of `capacity + 1` tokens: no first-call effect worth its cost

    def __init__(self, ctx: ModelContext, n_sink: int, capacity: int) -> None:
        super().__init__(ctx)
        self.n_sink, self.capacity = n_sink, capacity
        # what the press attends to: the sinks, the capacity - n_sink before it and itself; a learned
        # position table shorter than that (GPT-2 at capacity 1024) caps the span at its length
        self.span = min(capacity + 1, ctx.max_positions or capacity + 1)
        self.name = "recompute_sinks" if n_sink else "recompute"
        self.label = f"sliding window with re-computation ({n_sink}+{capacity - n_sink})"
        self.how = (
            f"no cache: every token runs one forward over the {n_sink} first tokens, the {self.span - n_sink - 1} "
            f"before it and itself (positions 0..{self.span - 1}"
            + (", what the press attends to" if self.span == capacity + 1 else
               f", one fewer than the press attends to: the model has {ctx.max_positions} learned positions")
            + "), keeping the logits of the last; its cost does not depend on the stream length."
        )
        self.window = None

    def prepare(self, length: int) -> None:
        tokens = self.ctx.tokens
        if length <= self.span:
            self.window = tokens[:, :length]
        else:
            keep = self.span - self.n_sink
            self.window = torch.cat([tokens[:, : self.n_sink], tokens[:, length - keep : length]], dim=1)
        self.note = None

    def step(self) -> None:
        n = self.window.shape[1]
        kwargs = {"use_cache": False, "position_ids": torch.arange(n, device=self.ctx.device).unsqueeze(0)}
        if self.ctx.accepts_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        self.ctx.model(input_ids=self.window, **kwargs)

    def release(self) -> None:
        self.window = None


class Pinned(Method):
    """Another method held at its own stream length, to time two lengths side by side."""

    def __init__(self, inner: Method, length: int, name: str) -> None:
        super().__init__(inner.ctx)
        self.inner, self.length, self.name = inner, length, name
        self.label = f"{inner.label}, at stream length {length}"
        self.how = inner.how
        self.warmup = inner.warmup

    def prepare(self, length: int) -> None:
        self.inner.prepare(self.length)
        self.note = self.inner.note

    def step(self) -> None:
        self.inner.step()

    def after_step(self) -> None:
        self.inner.after_step()

    def kv_bytes(self) -> int:
        return self.inner.kv_bytes()

    def kv_length(self) -> int:
        return self.inner.kv_length()

    def stream_position(self) -> Optional[int]:
        return self.inner.stream_position()

    def release(self) -> None:
        self.inner.release()

    def close(self) -> None:
        self.inner.close()


def kvpress_streaming(ctx: ModelContext, n_sink: int, capacity: int) -> Method:
    """NVIDIA kvpress's decode-time StreamingLLM (only under an interpreter where kvpress imports)."""
    from kvpress import DecodingPress, StreamingLLMPress

    class KvpressStreaming(Method):
        name = "kvpress"
        label = f"NVIDIA kvpress DecodingPress(StreamingLLMPress(n_sink={n_sink}), interval 1, target {capacity})"
        how = (
            f"kvpress {_version('kvpress')}: DecodingPress(StreamingLLMPress(n_sink={n_sink}), compression_interval=1, "
            f"target_size={capacity}) hooked with `with press(model)`; DynamicCache filled with random K/V to "
            f"{capacity} entries, then each decoded token grows it to {capacity + 1} and the press compresses it back. "
            "Its cost does not depend on how many tokens came before (positions come from the cache length)."
        )

        def __init__(self) -> None:
            super().__init__(ctx)
            self.model = ctx.shell()
            self.press = DecodingPress(StreamingLLMPress(n_sink=n_sink), compression_interval=1, target_size=capacity)
            self._context = self.press(self.model)
            self._context.__enter__()
            self.cache = None
            self.steps = 0

        def prepare(self, length: int) -> None:
            self.cache = None
            self.cache = filled_dynamic_cache(ctx, capacity)
            self.note = None

        def step(self) -> None:
            self.model(input_ids=ctx.token(self.steps), **{ctx.cache_kwarg: self.cache, "use_cache": True})
            self.steps += 1

        def release(self) -> None:
            self.cache = None

        def close(self) -> None:
            self.release()
            self._context.__exit__(None, None, None)

    return KvpressStreaming()


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return "unknown"
