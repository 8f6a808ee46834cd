"""Static-shape streaming: a fixed-size cache that ``torch.compile`` compiles once.

:class:`StreamingCache` is a transformers ``Cache`` whose layers own the eviction: each
holds ``capacity + 1`` slots whose shape and address never change, written in place. The
press's hooks do not run; every per-step quantity (the tokens seen, the slot written, the sinks'
shift, the position offset) is a tensor, so a compiled ``model.forward`` never branches on
the stream and never recompiles, however long the stream runs.

Semantics are the eager press's, token by token: a new token attends to the sinks, the
``capacity - n_sink`` tokens before it and itself (``capacity + 1`` entries), at positions
within the cache. The slots: ``[0, n_sink)`` the sinks, ``[n_sink, capacity + 1)`` a ring
of ``capacity - n_sink + 1`` window slots; a new token overwrites the entry the eager press
evicted after the previous step. Once full, the causal mask's query offset stays at
``capacity`` so every slot is visible. RoPE sinks are rotated forward by the tokens evicted
so far from a float64 copy of their first encoding, as in the eager press.

Positions: transformers computes RoPE angles in float32 from the positions it is handed, so
positions that grow with the stream lose the angles' precision (0.1 in the logits of a tiny
Llama a million tokens in, noise past 2**24). One forward pre-hook on the decoder (inert for
any other cache) hands the model stream positions minus an offset that the cache moves on by
``capacity + 1`` whenever the newest token would pass ``2 * capacity``, rotating the window's
keys back by as much (:func:`_rebase`). The model never sees a position past
``2 * capacity``: the logits a billion tokens in are those of the stream's first tokens. The
rebase is an operator of its own, which a compiled step calls as one opaque node: the graph
stays one, and the steps between rebases cost one comparison.

Sliding-window layers are served as the eager press serves them (the same
:func:`~kvpress_lite.attachment.plan_layers` decides): one no wider than the press's window
(``sliding_window - 1 <= capacity - n_sink``) keeps its own last ``sliding_window`` tokens in
a ring of as many slots, at the positions the model was handed, as transformers does; one
wider than the capacity sees every kept entry and is pressed like a full layer; one in
between is refused, naming the config field.

Scope: transformers >= 5 (the cache gives the mask its query offset), families whose
position scheme supports it (RoPE; not learned tables or ALiBi, which need the press's
position hook or stream order), unpadded batches. A prompt of at most ``capacity + 1``
tokens may go in one call; longer prompts go in with :func:`prefill`.

>>> cache = StreamingCache(model, n_sink=4, capacity=256)                      # doctest: +SKIP
>>> forward = torch.compile(model.forward)                                       # doctest: +SKIP
>>> out = model(input_ids=prompt, cache=cache, use_cache=True)   # eager prefill  # doctest: +SKIP
>>> out = forward(input_ids=token, cache=cache, use_cache=True)  # compiled steps # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from . import cache_access
from .adapter import Adapter
from .core import rope_rotate, validate_budget
from .errors import UnsupportedGenerationError, UnsupportedModelError


def _transformers_cache_classes():
    from transformers.cache_utils import Cache, StaticLayer

    if not hasattr(Cache, "get_query_offset"):
        raise UnsupportedModelError(
            "static-shape streaming needs transformers >= 5 (the cache hands the causal mask its query offset); "
            "use the eager press (apply_press) on this release"
        )
    return Cache, StaticLayer


def _layer_class():
    Cache, StaticLayer = _transformers_cache_classes()

    class StreamingLayer(StaticLayer):
        """``capacity + 1`` fixed slots; the layer writes, evicts and re-rotates in place."""

        is_croppable = False

        def __init__(self, layer_idx: int, n_sink: int, capacity: int, scheme: Any, offset: torch.Tensor) -> None:
            super().__init__(max_cache_len=capacity + 1)
            self.layer_idx, self.n_sink, self.capacity, self.scheme = layer_idx, n_sink, capacity, scheme
            self.rotary = scheme.static_rotary(layer_idx)  # None, or (start, dims, interleaved, inv_freq)
            self.offset = offset  # the cache's: the model is handed stream positions minus this

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            super().lazy_initialization(key_states, value_states)
            if self.rotary is not None:
                start, dims, interleaved, inv_freq = self.rotary
                self.inv_freq = inv_freq.to(device=self.device, dtype=torch.float64)
            if self.rotary is not None and self.n_sink:
                batch, heads = key_states.shape[:2]
                # [batch, heads, n_sink, dims/2] x2, float64: the sinks' rotary pairs as first encoded
                self.sink_real = torch.zeros(batch, heads, self.n_sink, dims // 2, dtype=torch.float64,
                                             device=self.device)
                self.sink_imag = torch.zeros_like(self.sink_real)
                if not torch.compiler.is_compiling():
                    for buffer in (self.sink_real, self.sink_imag):
                        torch._dynamo.mark_static_address(buffer)

        def _pairs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            start, dims, interleaved, _ = self.rotary
            rot = x[..., start : start + dims].to(torch.float64)
            if interleaved:
                return rot[..., 0::2], rot[..., 1::2]
            return rot[..., : dims // 2], rot[..., dims // 2 :]

        def _write_sinks(self, shift: torch.Tensor) -> None:
            """Sinks at rotation `shift` positions past their first encoding (float64, one rounding)."""
            start, dims, interleaved, _ = self.rotary
            angle = torch.remainder(shift.to(torch.float64) * self.inv_freq, 2 * math.pi)  # [dims/2]
            cos, sin = angle.cos(), angle.sin()
            real = self.sink_real * cos - self.sink_imag * sin
            imag = self.sink_imag * cos + self.sink_real * sin
            rotated = torch.stack([real, imag], -1).flatten(-2) if interleaved else torch.cat([real, imag], -1)
            self.keys[..., : self.n_sink, start : start + dims] = rotated.to(self.keys.dtype)

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            q, n_sink, capacity = key_states.shape[-2], self.n_sink, self.capacity
            seen = self.cumulative_length  # tokens taken in before this call, a 0-dim tensor
            if q == 1:  # the compiled path: no Python branch on the stream
                window = capacity - n_sink + 1
                slots = torch.where(seen <= capacity, seen, n_sink + torch.remainder(seen - n_sink, window)).view(1)
            else:  # a prompt (eager): it must fit the slots that are still free
                if int(seen) + q > capacity + 1:
                    raise UnsupportedGenerationError(
                        f"a call of {q} tokens does not fit the static cache ({int(seen)} of {capacity + 1} slots "
                        "taken): feed long prompts with kvpress_lite.static.prefill(model, input_ids, cache), which "
                        "fills the cache and then goes token by token"
                    )
                slots = torch.arange(q, device=self.device) + seen
            self.keys.index_copy_(2, slots, key_states)
            self.values.index_copy_(2, slots, value_states)
            if self.rotary is not None and n_sink:
                # keep the first encoding of new sinks (slots < n_sink), then write all sinks at the current shift
                real, imag = self._pairs(key_states)
                if q == 1:
                    slot = slots.clamp(max=n_sink - 1)
                    is_sink = (slots < n_sink).view(1, 1, 1, 1)
                    self.sink_real.index_copy_(2, slot, torch.where(is_sink, real, self.sink_real.index_select(2, slot)))
                    self.sink_imag.index_copy_(2, slot, torch.where(is_sink, imag, self.sink_imag.index_select(2, slot)))
                else:
                    first, count = int(seen), max(0, min(n_sink - int(seen), q))
                    self.sink_real[:, :, first : first + count] = real[:, :, :count]
                    self.sink_imag[:, :, first : first + count] = imag[:, :, :count]
                # the newest token sits at seen + q - 1 - offset: the sinks go `capacity` positions before it
                self._write_sinks((seen + q - 1 - self.offset - capacity).clamp(min=0))
            self.cumulative_length.add_(q)
            return self.keys, self.values

        def crop(self, tokens_to_remove: int) -> None:
            raise UnsupportedGenerationError(
                "a streaming cache cannot be cropped (assisted/speculative decoding rejects tokens it has evicted); "
                "use greedy or sampling decoding"
            )

    class SlidingLayer(StreamingLayer):
        """A sliding-window layer no wider than the press's window, as transformers keeps it: its
        last ``window`` tokens (itself and ``window - 1`` before it) in a ring of as many slots,
        at the positions the model was handed; no sinks. A ``StreamingLayer`` with
        ``n_sink=0, capacity=window - 1``, but for a prompt that overflows the ring (eager): the
        attention then sees the ring's tokens in stream order followed by the prompt's."""

        is_sliding = True

        def __init__(self, layer_idx: int, window: int, scheme: Any, offset: torch.Tensor) -> None:
            super().__init__(layer_idx, 0, window - 1, scheme, offset)

        def _overflows(self, q: int) -> bool:
            return q > 1 and int(self.cumulative_length) + q > self.capacity + 1

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            if self._overflows(query_length):  # the tokens the query offset counts, then the call's
                return min(int(self.cumulative_length), self.capacity) + query_length, 0
            return super().get_mask_sizes(query_length)

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            q = key_states.shape[-2]
            if not self._overflows(q):
                return super().update(key_states, value_states, *args, **kwargs)
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            seen, slots = int(self.cumulative_length), self.capacity + 1
            # the tokens a new one can still see (as many as the query offset says), in stream order
            past = torch.arange(seen - min(seen, self.capacity), seen, device=self.device) % slots
            keys = torch.cat([self.keys.index_select(2, past), key_states], dim=2)
            values = torch.cat([self.values.index_select(2, past), value_states], dim=2)
            kept = torch.arange(seen + q - slots, seen + q, device=self.device) % slots  # stream index t in slot t % slots
            self.keys.index_copy_(2, kept, keys[:, :, -slots:])
            self.values.index_copy_(2, kept, values[:, :, -slots:])
            self.cumulative_length.add_(q)
            return keys, values

    return Cache, StreamingLayer, SlidingLayer


def streaming_cache_class():
    """The :class:`StreamingCache` class (built lazily: it subclasses transformers' Cache)."""
    global _STREAMING_CACHE
    if _STREAMING_CACHE is None:
        Cache, StreamingLayer, SlidingLayer = _layer_class()

        class StreamingCache(Cache):
            """A fixed-size StreamingLLM cache for ``torch.compile``; see the module docstring."""

            def __init__(self, model: nn.Module, n_sink: int = 4, capacity: int = 256,
                         adapter: Optional[Adapter | str] = None) -> None:
                from .attachment import plan_layers
                from .registry import find_adapter
                from .wrappers import text_view

                validate_budget(n_sink, capacity)
                chosen = adapter if isinstance(adapter, Adapter) else find_adapter(model, adapter)
                if not chosen.matches(model) and text_view(model) is not None:
                    raise UnsupportedModelError(
                        f"static-shape streaming does not serve the multimodal wrapper {type(model).__name__} yet "
                        "(its masks and positions are built by the wrapper, which the static cache does not drive). "
                        "Use the eager press (kvpress_lite.apply_press), which serves it exactly."
                    )
                scheme = chosen.positions(model)
                scheme.check(model, capacity=capacity, position_shift=True)
                reason = scheme.static_unsupported()
                if reason:
                    raise UnsupportedModelError(f"static-shape streaming does not serve {type(model).__name__}: {reason}")
                attentions = chosen.attention_modules(model)
                indices = [getattr(a, "layer_idx", i) for i, a in enumerate(attentions)]
                # sliding-window layers wider than the capacity are pressed like full ones; narrower
                # than the window, they keep their own (in between: refused, naming the config field)
                plan = plan_layers(model, indices, n_sink, capacity)
                if plan.hybrid:
                    raise UnsupportedModelError(
                        f"static-shape streaming does not serve {type(model).__name__} yet: it is a hybrid, and its "
                        "recurrent layers need transformers' LinearAttentionLayer states beside the fixed-size "
                        "attention layers of this cache, which StreamingCache does not build. Use the eager press "
                        "(kvpress_lite.apply_press), which serves hybrids exactly."
                    )
                windows = _sliding_windows(model, plan.sliding)
                self.n_sink, self.capacity = n_sink, capacity
                # the model is handed stream positions minus `offset`: a 0-dim tensor, moved in place
                self.offset = torch.zeros((), dtype=torch.long, device=next(iter(model.parameters())).device)
                torch._dynamo.mark_static_address(self.offset)
                super().__init__(layers=[
                    SlidingLayer(i, windows[i], scheme, self.offset) if i in windows
                    else StreamingLayer(i, n_sink, capacity, scheme, self.offset)
                    for i in range(max(indices) + 1)])
                _hand_positions_in(chosen.decoder(model))

            def get_query_offset(self, layer_idx: int = 0):
                # once full the query sits past every slot: all of a layer's capacity + 1 entries are visible
                layer = self.layers[layer_idx]
                return layer.cumulative_length.clamp(max=layer.capacity)

            def position_ids(self, q: int, given: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
                """What the model is handed for a call of ``q`` tokens: their stream positions
                (``given``, e.g. generate()'s, or the next ``q`` of the stream) minus :attr:`offset`.

                Re-basing first (see :func:`_rebase`): the positions stay below ``2 * capacity + 1``
                however long the stream runs, so the model's float32 RoPE angles stay as exact as in
                a stream's first tokens."""
                seen = self.layers[0].cumulative_length
                rotary = [layer for layer in self.layers if layer.rotary is not None and layer.is_initialized]
                torch.ops.kvpress_lite.rebase_streaming_cache(
                    [layer.keys for layer in rotary], [layer.inv_freq for layer in rotary],
                    [layer.rotary[0] for layer in rotary], [layer.n_sink for layer in rotary], self.offset, seen, q,
                    self.capacity, bool(rotary and rotary[0].rotary[2]))
                if given is None:
                    return (torch.arange(q, device=device) + (seen - self.offset).to(device)).unsqueeze(0)
                return given - self.offset.to(given.device)

            def reset(self) -> None:
                super().reset()
                self.offset.zero_()

        _STREAMING_CACHE = StreamingCache
    return _STREAMING_CACHE


_STREAMING_CACHE = None


@torch.library.custom_op("kvpress_lite::rebase_streaming_cache", mutates_args=("keys", "offset"),
                         tags=(torch.Tag.cudagraph_unsafe,))
def _rebase(keys: list[torch.Tensor], inv_freqs: list[torch.Tensor], starts: list[int], n_sinks: list[int],
            offset: torch.Tensor, seen: torch.Tensor, q: int, capacity: int, interleaved: bool) -> None:
    """Before a call of ``q`` tokens: when its newest token would sit past ``2 * capacity``,
    move ``offset`` on so that it sits at ``capacity``, and every layer's window keys back by
    as many positions (float64, one rounding; the layers rewrite the sinks from their first
    encoding). A key lives ``capacity - n_sink + 1`` steps, no more than the ``capacity + 1``
    between two rebases: it is moved at most once.

    An operator of its own: a compiled step calls it as one opaque node (no graph break) and
    it runs eagerly, so the steps in between cost a comparison (on a GPU: one number read
    back), not a pass over the cache. Tagged ``cudagraph_unsafe``: under CUDA graphs inductor
    runs it between the graph's partitions."""
    newest = int(seen - offset) + q - 1  # the newest token's position as things stand (one device read)
    if newest <= 2 * capacity:
        return
    step = newest - capacity
    for key, inv_freq, start, n_sink in zip(keys, inv_freqs, starts, n_sinks):
        window = key[..., n_sink:, start : start + 2 * inv_freq.numel()]
        window.copy_(rope_rotate(window, -step, inv_freq, interleaved=interleaved))
    offset.add_(step)


def _sliding_windows(model: nn.Module, indices: tuple[int, ...]) -> dict[int, int]:
    """``{layer: sliding_window}`` for the layers ``indices``, read off the cache the model builds
    (as :func:`~kvpress_lite.attachment.plan_layers` reads them)."""
    if not indices:
        return {}
    layers = cache_access.self_attention_cache(cache_access.new_dynamic_cache(model)).layers
    return {i: int(layers[i].sliding_window) for i in indices}


_HOOK_ATTR = "_kvpress_lite_static_positions"


def _hand_positions_in(decoder: nn.Module) -> None:
    """Register (once per decoder module) the pre-hook that hands a :class:`StreamingCache`'s
    positions to the model; it does nothing for any other cache. A compiled forward traces it
    into its graph."""
    if getattr(decoder, _HOOK_ATTR, None) is None:
        setattr(decoder, _HOOK_ATTR, decoder.register_forward_pre_hook(_positions_hook, with_kwargs=True))


def _positions_hook(module: nn.Module, args: tuple, kwargs: dict):
    cache = next((kwargs[n] for n in cache_access.MODEL_CACHE_KWARGS if kwargs.get(n) is not None), None)
    if not isinstance(cache, streaming_cache_class()):
        return None
    tokens = kwargs.get("input_ids")
    tokens = kwargs.get("inputs_embeds") if tokens is None else tokens
    tokens = args[0] if tokens is None and args else tokens
    if tokens is None:
        return None
    if not torch.compiler.is_compiling():  # eager calls (every prompt): checks a compiled step cannot afford
        _check_unpadded(kwargs, cache, tokens.shape[1])
    return args, dict(kwargs, position_ids=cache.position_ids(tokens.shape[1], kwargs.get("position_ids"), tokens.device))


def _check_unpadded(kwargs: dict, cache: Any, q: int) -> None:
    """Refuse a padded batch (a 2D mask with zeros, or generate()'s positions counted from one)
    and positions that are not the stream's: the slots serve unpadded rows only, a padded row
    would see the wrong slots once the ring wraps."""
    mask, given = kwargs.get("attention_mask"), kwargs.get("position_ids")
    padded = isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all())
    if given is not None and not padded:
        seen = int(cache.get_seq_length())
        padded = not bool((given == torch.arange(seen, seen + q, device=given.device)).all())
    if padded:
        raise UnsupportedGenerationError(
            "this call pads some rows (or passes position_ids other than the stream's): the static cache serves "
            "unpadded rows only. Run the rows one by one, or use the eager press (apply_press), which streams "
            "left-padded batches"
        )


def StreamingCache(model: nn.Module, n_sink: int = 4, capacity: int = 256, adapter: Optional[Adapter | str] = None):
    """A fixed-size StreamingLLM cache for ``model`` that ``torch.compile`` compiles once.

    >>> cache = StreamingCache(model, n_sink=4, capacity=256)    # doctest: +SKIP
    >>> model.generate(input_ids, cache=cache, max_new_tokens=2000)   # doctest: +SKIP

    ``generate()`` compiles its decoding step itself when handed this cache (it is a
    compileable cache): on a GPU by default (``CompileConfig()``: CUDA graphs), on other
    devices only when told, which transformers does through a flag of ``CompileConfig``:

    >>> from transformers import CompileConfig                              # doctest: +SKIP
    >>> config = CompileConfig(fullgraph=True, mode="default")              # doctest: +SKIP
    >>> config._compile_all_devices = True   # CPU: compile anyway          # doctest: +SKIP
    >>> model.generate(input_ids, cache=cache, compile_config=config, max_new_tokens=2000)  # doctest: +SKIP

    One graph for every decoding step, no recompile however long the stream; the prompt runs
    eagerly (at most ``capacity + 1`` tokens a call: feed a longer one with :func:`prefill`
    first, then generate() takes its last token). Without the flag a CPU run warns
    "unable to meet the criteria for compilation" and decodes eagerly.
    """
    return streaming_cache_class()(model, n_sink=n_sink, capacity=capacity, adapter=adapter)


@torch.no_grad()
def prefill(model: nn.Module, input_ids: torch.Tensor, cache: Any) -> Any:
    """Feed a prompt of any length into a :class:`StreamingCache`: as many tokens as the free
    slots hold in one call, the rest one by one (the eager press's token-by-token semantics).
    Returns the output of the last call.

    >>> out = prefill(model, prompt, cache)   # doctest: +SKIP
    """
    name = cache_access.model_cache_kwarg(model)
    free = cache.capacity + 1 - int(cache.get_seq_length())
    first = max(1, min(free, input_ids.shape[1]))
    out = model(input_ids=input_ids[:, :first], use_cache=True, **{name: cache})
    for t in range(first, input_ids.shape[1]):
        out = model(input_ids=input_ids[:, t : t + 1], use_cache=True, **{name: cache})
    return out
