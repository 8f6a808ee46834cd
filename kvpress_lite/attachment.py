"""A press attached to one model: its hooks and runtime state (streams, the call in flight).

Three kinds of hooks, none of which replaces a ``forward`` or edits transformers:

* a forward **pre-hook on the base model** sees every call first: it recognises the stream
  (the cache object), supplies ``position_ids`` (and ``cache_position`` where the model
  still takes it), replaces a padding mask with one that matches the compacted cache,
  splits a long prompt into chunks (:class:`~kvpress_lite.chunking.ChunkedPrefill`), and
  plans which entries every layer will keep;
* a forward **post-hook on every pressed attention module** trims that layer's cache
  right after the attention used it, i.e. *after* the cache update: the causal mask was
  sized before any layer ran, so trimming earlier breaks it;
* a forward **post-hook on the base model** commits the stream's counters and stitches
  the hidden states of a chunked prompt back together.

Everything family-specific comes from the adapter (where the attention modules are, the
cache keyword) and its position scheme (what positions to hand the model, what to do to
kept entries): this module never asks which scheme it holds.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from . import cache_access
from .adapter import Adapter
from .chunking import ChunkedPrefill
from .conversation import record_tokens, settings_of, skip_seen_tokens
from .copies import PressHook, copy_as_usual, copy_without_press, strip_press_hooks
from .errors import UnsupportedGenerationError, UnsupportedModelError
from .positions import PositionScheme
from .wrappers import multimodal_inputs, text_view
from .stream import CallPlan, Stream, apply_plan, commit_plan, plan_call, rebase, stream_positions

if TYPE_CHECKING:
    from .press import StreamingLLMPress

logger = logging.getLogger(__name__)


COMPILE_REFUSAL = (
    "torch.compile of a model under the eager press: its hooks plan every call in Python on a cache whose "
    "length changes, so dynamo would recompile at every step. Use the compiled path instead: remove the press "
    "and pass cache=kvpress_lite.StreamingCache(model, n_sink=..., capacity=...) to the compiled forward or to "
    "generate() (one graph, never recompiled; see the README, 'Compiled, fixed-size streaming')."
)


@dataclass(frozen=True)
class LayerPlan:
    """How the press treats each attention layer of a model, decided at ``apply_press``."""

    pressed: tuple[int, ...]  # layer indices the press trims to sinks + window
    sliding_pressed: tuple[int, ...]  # of those, the sliding-window layers wider than the capacity
    sliding: tuple[int, ...]  # sliding-window layers narrower than the press window: left to transformers
    reference: int  # the pressed layer whose length the stream tracks
    max_call: Optional[int] = None  # most new tokens one call may add to a full cache (pressed sliding layers)
    recurrent: tuple[int, ...] = ()  # a hybrid's recurrent layers (an attention-like module, a state layer): left whole
    hybrid: bool = False  # the cache has recurrent layers (at the attention path or elsewhere)


def plan_layers(model: nn.Module, layer_indices: list[int], n_sink: int, capacity: Optional[int]) -> LayerPlan:
    """Read each attention layer's cache kind off the cache the model would build, and refuse
    (naming the config field) what the press cannot honour, before anything runs.

    The press's semantics is a dense forward over the kept tokens at positions 0..L-1. A
    sliding-window layer of ``w`` keeps its last ``w - 1`` entries. When that is more than the
    capacity, the layer would see every kept entry: the press trims it like a full layer (and
    a call may add at most ``w - 1 - capacity`` tokens to a full cache, so the layer never
    drops an entry on its own before the press has trimmed it).
    When it fits inside the press's window (``w - 1 <= capacity - n_sink``) it sees only
    recent tokens, exactly what it keeps on its own: it is left alone. In between, it
    would see some sinks and not others: refused.
    """
    probe = cache_access.new_dynamic_cache(model)
    layers = getattr(cache_access.self_attention_cache(probe), "layers", None) or []
    pressed, sliding, sliding_pressed, recurrent = [], [], [], []
    room: Optional[int] = None  # pressed sliding layers drop entries past `keeps` on their own
    for idx in layer_indices:
        layer = layers[idx] if idx < len(layers) else None
        kind = cache_access.FULL if layer is None else cache_access.layer_kind(layer)
        if kind == cache_access.RECURRENT:
            recurrent.append(idx)
            continue
        if kind == cache_access.SLIDING and capacity is not None:
            keeps = int(getattr(layer, "sliding_window")) - 1
            if keeps <= capacity - n_sink:
                sliding.append(idx)
                continue
            if keeps <= capacity:
                raise UnsupportedModelError(
                    f"{type(model).__name__} has sliding-window attention layers (config.sliding_window="
                    f"{keeps + 1}) that keep {keeps} entries: more than the press's window (capacity - n_sink = "
                    f"{capacity - n_sink}) but not more than its capacity ({capacity}), so they would see some sinks "
                    f"and not others. Use capacity <= {keeps - 1} (the press then trims these layers too) or "
                    f"capacity >= {keeps + n_sink} (they keep their own window)."
                )
            room = keeps - capacity if room is None else min(room, keeps - capacity)
            sliding_pressed.append(idx)
        elif kind == cache_access.SLIDING:
            raise UnsupportedModelError(
                f"{type(model).__name__} has sliding-window attention layers (config.sliding_window); the press "
                "needs a fixed capacity to decide how to treat them: pass capacity=..., not compression_ratio"
            )
        pressed.append(idx)
    if not pressed and recurrent and not sliding:
        raise UnsupportedModelError(
            f"{type(model).__name__}: its layers keep fixed-size recurrent states (SSM / linear attention / "
            "convolution) and it has no attention layer to press: it already runs at constant memory. Run it "
            "without a press."
        )
    if not pressed:
        raise UnsupportedModelError(
            f"{type(model).__name__}: every attention layer keeps its own sliding window, narrower than the press's "
            "window; there is nothing for the press to bound. Run the model without a press."
        )
    hybrid = any(cache_access.is_recurrent(layer) for layer in layers)
    return LayerPlan(tuple(pressed), tuple(sliding_pressed), tuple(sliding), pressed[0], room, tuple(recurrent), hybrid)


class Attachment:
    """The runtime side of a press registered on one model. Created by
    :meth:`StreamingLLMPress.register`; gone with :meth:`StreamingLLMPress.remove`."""

    def __init__(self, press: "StreamingLLMPress", model: nn.Module, adapter: Adapter) -> None:
        self.press, self.model, self.adapter = press, model, adapter
        # a composite causal LM (a multimodal wrapper): the adapter reads its text model, and the
        # call hooks go on the wrapper's own base model, which takes the user's ids and mask
        self.view = text_view(model) if not adapter.matches(model) else None
        if self.view is not None and adapter.matches(self.view):
            self.base = cache_access.base_model(model)
            model = self.view
        else:
            self.view = None
            self.base = adapter.decoder(model)
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        try:
            self.scheme: PositionScheme = adapter.positions(model)
        except (AttributeError, KeyError, TypeError) as exc:
            raise UnsupportedModelError(
                f"adapter {adapter.name!r} (for {', '.join(adapter.model_types)}) does not fit "
                f"{type(model).__name__} (model_type={model_type!r}): reading its positions failed with {exc!r}. "
                "Let the registry choose the adapter (no adapter=...), or pick one made for this family."
            ) from exc
        self.scheme.check(model, capacity=press.capacity, position_shift=press.position_shift)
        if not adapter.matches(model):
            logger.warning("kvpress-lite: adapter %r is forced on %s (model_type=%r), which it was not written for",
                           adapter.name, type(model).__name__, model_type)
        attentions = adapter.attention_modules(model)
        # a decoder that counts positions itself (BART, Marian, Whisper ...) takes them at its embedding
        self.position_target = adapter.positions_module(model)
        self.positions: Optional[torch.Tensor] = None
        takes = inspect.signature(self.base.forward).parameters
        self.base_kwargs = set(takes)
        if self.position_target is None and "position_ids" not in takes and not any(
                p.kind is inspect.Parameter.VAR_KEYWORD for p in takes.values()):
            raise UnsupportedModelError(
                f"adapter {adapter.name!r}: {type(self.base).__name__}.forward takes no position_ids, so the press "
                "cannot hand it positions within the cache. Name the module that takes them in the adapter's "
                "position_module (the decoders of BART and Marian: 'decoder.embed_positions')."
            )
        indices = [_layer_index(attention, i) for i, attention in enumerate(attentions)]
        self.layers = plan_layers(model, indices, press.n_sink, press.capacity)
        self.n_layers = len(attentions)
        self.layer_order = sorted(self.layers.pressed + self.layers.sliding)
        self.settings = settings_of(press, adapter.name, self.scheme.description)
        self.call: Optional[CallPlan] = None
        self.owner: Optional[int] = None  # the thread whose call is in flight
        self.chunked: Optional[ChunkedPrefill] = None
        self.handles: list = []
        strip_press_hooks(self.model, live=False)  # a pickled copy's inert hooks
        try:
            self.handles.append(self.base.register_forward_pre_hook(PressHook(self._pre_hook), with_kwargs=True))
            self.handles.append(self.base.register_forward_hook(PressHook(self._post_hook), with_kwargs=True))
            if self.position_target is not None:
                self.handles.append(self.position_target.register_forward_pre_hook(
                    PressHook(self._position_hook), with_kwargs=True))
            for attention, idx in zip(attentions, indices):
                if idx in self.layers.recurrent:  # a linear-attention module at the attention path: nothing to trim
                    continue
                hook = self._attention_hook(idx, adapter.cache_kwarg(attention))
                self.handles.append(attention.register_forward_hook(PressHook(hook), with_kwargs=True))
        except Exception:
            self.detach()
            raise
        copy_without_press(self.model, self.base)

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        copy_as_usual(self.model, self.base)
        self.call = self.chunked = None

    # -- hooks -----------------------------------------------------------------------
    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        if _under_torch_compile():
            raise UnsupportedGenerationError(COMPILE_REFUSAL)
        if self.call is not None and self.owner != threading.get_ident() and self.chunked is None:
            raise UnsupportedGenerationError(
                "this pressed model is already running a call in another thread. A press follows one call at a time "
                "(it plans each call's trim before the layers run); give each thread its own model copy "
                "(copy.deepcopy(model), then apply a press to the copy) or serialise the calls with a lock."
            )
        if self.call is not None:  # the previous call raised before finishing: its cache is inconsistent
            self.call.stream.broken = True
            self.call = self.chunked = None
        kwargs = dict(kwargs)
        if args:  # transformers passes everything by keyword; a user may pass input_ids positionally
            kwargs.setdefault("input_ids", args[0])
            args = ()
        media = multimodal_inputs(kwargs) if self.view is not None else []
        if media and not _serves_media(self.model):
            raise UnsupportedGenerationError(
                f"this call to the composite model {type(self.model).__name__} carries {', '.join(media)}: image, video "
                "and audio inputs are not served under the press for this wrapper (it treats them specially: Gemma 3 "
                "attends bidirectionally within an image block, and an eviction could cut through one). Stream text "
                "through it, or run media prompts without the press."
            )
        if crossed := [k for k in CROSS_ATTENTION_INPUTS if kwargs.get(k) is not None]:
            raise UnsupportedGenerationError(
                f"this call to {type(self.model).__name__} carries {crossed[0]}: a cross-attention call (to an "
                "encoder's or an image's states), which the press does not stream (its cache would mix those keys into "
                "the decoder's, or keep them beside it unbounded). Stream the decoder alone as a causal LM, or run "
                "such calls without the press."
            )
        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is None:
            return None
        cache_name, cache = _find_cache(kwargs)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(module.config, "use_cache", True)
        if not use_cache:
            raise UnsupportedGenerationError(
                "use_cache=False under a press: without a cache there is nothing to press, and this call would attend "
                "densely to all of its tokens (and run past a learned position table). Pass use_cache=True (the "
                "default) to stream, or press.remove() to run the model densely."
            )
        batch, q = tokens.shape[0], tokens.shape[1]
        if cache is None:
            cache = cache_access.new_dynamic_cache(module)
            # a wrapper may take the cache through **kwargs only (it hands them on to its decoder)
            cache_name = next((n for n in cache_access.MODEL_CACHE_KWARGS if n in self.base_kwargs),
                              cache_access.MODEL_CACHE_KWARGS[0])
            kwargs[cache_name] = cache
        kwargs.pop("past_key_values" if cache_name == "cache" else "cache", None)
        stream = self._stream_for(cache, batch, q, kwargs.get("attention_mask"))
        if self.position_target is not None and stream.padded:
            raise UnsupportedGenerationError(
                f"a padded batch under the press on {type(self.model).__name__}: its decoder numbers positions for "
                "the whole batch at once (one row of position ids), so rows whose padding differs cannot get "
                "positions of their own. Stream one conversation per call, or batch rows without padding."
            )
        skip_seen_tokens(kwargs, stream)  # generate() given the whole conversation: only the new part goes in
        tokens = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        q = tokens.shape[1]
        new_valid = self._new_token_mask(kwargs.get("attention_mask"), stream, q)

        chunk = self.press.prefill_chunk_size or stream.window
        if self.layers.max_call is not None:
            chunk = min(chunk, self.layers.max_call)
        if media and stream.stored + q > stream.capacity and q > chunk and self.chunked is None:
            raise UnsupportedGenerationError(
                f"this call carries {', '.join(media)} and {q} tokens, more than the press takes in one piece "
                f"({chunk}) with {stream.stored} of {stream.capacity} entries already cached: prefill in chunks would "
                "separate the media inputs from the placeholders they fill. Send the media in a shorter call (text "
                "before it in calls of its own), or raise capacity."
            )
        if stream.stored + q > stream.capacity and q > chunk and self.chunked is None:
            chunked = ChunkedPrefill(kwargs, q, chunk)
            last = chunked.run_prefix(module)
            self.chunked = chunked  # set after the prefix: its calls must not stitch
            return (), self._pre_hook(module, (), last)[1]

        press, scheme = self.press, self.scheme
        limit = scheme.max_positions
        if limit is not None and not press.position_shift and stream.longest_row + q > limit:
            raise UnsupportedGenerationError(
                f"position_shift=False keeps absolute positions, and this stream reaches position "
                f"{stream.longest_row + q - 1}, past the {limit} learned positions of the model. Use position_shift=True."
            )
        if press.position_shift:
            layers = cache_access.cache_layers(kwargs[cache_name])
            attention_layers = {i: layers[i] for i in self.layers.pressed + self.layers.sliding if i < len(layers)}
            if step := rebase(stream, attention_layers, scheme):
                logger.debug("kvpress-lite: rebased positions by %d (offset now %d)", step, stream.offset)
        plan = plan_call(stream, q, new_valid)
        positions = scheme.position_ids(
            stream_positions(stream, q, new_valid), capacity=stream.capacity, position_shift=press.position_shift
        )
        if self.position_target is None or "position_ids" in self.base_kwargs:
            kwargs["position_ids"] = positions.to(tokens.device)
        if self.position_target is not None:
            self.positions = positions[0].to(tokens.device)
        if "cache_position" in self.base_kwargs:  # transformers < 5.x: mask and cache read it
            kwargs["cache_position"] = torch.arange(stream.stored, stream.stored + q, device=tokens.device)
        if stream.padded:
            mask = torch.cat([stream.valid, new_valid], dim=1) if stream.stored else new_valid
            kwargs["attention_mask"] = mask.to(device=tokens.device, dtype=torch.long)
        elif kwargs.get("attention_mask") is not None and kwargs["attention_mask"].dim() == 2:
            kwargs["attention_mask"] = None  # all ones, and sized for the uncompressed stream
        record_tokens(stream, kwargs.get("input_ids"))
        self.call, self.owner = plan, threading.get_ident()
        return (), kwargs

    def _position_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        if self.call is None or self.positions is None:
            return None
        return args, {**kwargs, "position_ids": self.positions}

    def _attention_hook(self, layer_idx: int, cache_kwarg: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            plan = self.call
            cache = kwargs.get(cache_kwarg)
            if plan is None or cache is None:
                return None
            layer = cache_access.cache_layers(cache)[layer_idx]
            left_alone = layer_idx in self.layers.sliding
            if (cache_access.layer_kind(layer) == cache_access.SLIDING) != (left_alone or layer_idx in self.layers.sliding_pressed):
                plan.stream.broken = True
                raise UnsupportedGenerationError(
                    f"cache layer {layer_idx} is a {cache_access.layer_kind(layer)} layer, but the model's config "
                    "(config.layer_types / sliding_window) says otherwise: the cache was built without the model's "
                    "config. Pass DynamicCache(config=model.config), or no cache and let the model make one."
                )
            if not left_alone:
                apply_plan(plan, layer, layer_idx, self.scheme, self.press.position_shift)
                cache_access.follow_trim(layer)
            return None

        return hook

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        plan, self.call = self.call, None
        self.positions = None
        if plan is None:
            return None
        stream = plan.stream
        commit_plan(plan)
        stats = self.press.stats
        if plan.kind != "none":
            stats.compressions += 1
            stats.evicted_tokens += plan.evicted
        _, cache = _find_cache(kwargs)
        layers = cache_access.cache_layers(cache) if cache is not None else []
        # entries each attention layer holds: the press's for pressed layers, a sliding layer's own otherwise
        stats.cache_length = [
            cache_access.layer_length(layers[i]) if i < len(layers) else stream.stored for i in self.layer_order
        ]
        stats.seen_tokens = stream.longest_row
        stats.capacity = stream.capacity
        chunked, self.chunked = self.chunked, None
        return None if chunked is None else chunked.stitch(output)

    # -- helpers -----------------------------------------------------------------------
    def _stream_for(self, cache: Any, batch: int, q: int, attention_mask: Optional[torch.Tensor]) -> Stream:
        stream = cache_access.stream_of(cache)
        layers = cache_access.cache_layers(cache)
        if stream is not None:
            if stream.settings != self.settings:
                raise UnsupportedGenerationError(
                    "this cache was compacted under a press with other settings or another model family "
                    f"({_describe(stream.settings)}; this press: {_describe(self.settings)}), so the positions of its "
                    "entries cannot be recovered. Continue it under a press with the same settings (one press for the "
                    "whole conversation is simplest), or start a new cache."
                )
            if stream.broken:
                raise UnsupportedGenerationError(
                    "an earlier call on this cache failed part-way, so its layers disagree; start a new cache"
                )
            for idx, state in stream.layers.items():
                if state.keys_ref is not None and not _same(cache_access.stored_kv(layers[idx])[0], state.keys_ref):
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
        for idx in self.layers.pressed + self.layers.sliding:  # a static or quantized cache: refused before any layer
            if idx < len(layers):                                # runs (later calls: the attention hooks check)
                cache_access.layer_kind(layers[idx])
        existing = cache_access.cache_length(cache, self.layers.reference)
        capacity = self._capacity_for(q)
        if existing > capacity:
            raise UnsupportedGenerationError(
                f"this cache already holds {existing} entries (more than capacity={capacity}) that were not produced "
                "under this press; start from an empty cache after applying the press"
            )
        stream = Stream(self.press.n_sink, capacity, batch, settings=self.settings, ordered=self.scheme.ordered_cache)
        stream.stored = stream.real_seen = existing
        mask = attention_mask
        if mask is not None and mask.dim() == 2 and not bool(mask.all()):
            if existing:
                raise UnsupportedGenerationError("a padded batch must start from an empty cache when the press is applied")
            if self.layers.hybrid:
                raise UnsupportedGenerationError(
                    "padded batches are not supported on hybrid models (recurrent / SSM layers beside attention): "
                    "a left pad passes through their recurrent state, and whether a padded row then equals the row "
                    "streamed alone is not verified; run the rows one by one (or rows of equal length, unpadded)"
                )
            if self.layers.sliding:
                raise UnsupportedGenerationError(
                    "padded batches are not supported on models with sliding-window layers (their masks count "
                    "absolute columns); run the rows one by one"
                )
            stream.start_padding(torch.zeros(batch, 0, dtype=torch.bool))
        else:
            stream.sinks_fixed = True
        cache_access.attach_stream(cache, stream)
        self.press.stats.streams += 1
        logger.debug("kvpress-lite: new stream (batch=%d, capacity=%d, padded=%s)", batch, capacity, stream.padded)
        return stream

    def _capacity_for(self, prompt_length: int) -> int:
        press = self.press
        if press.capacity is not None:
            return press.capacity
        capacity = int(prompt_length * (1 - press.compression_ratio))
        if capacity <= press.n_sink:
            raise ValueError(
                f"compression_ratio={press.compression_ratio} on a prompt of {prompt_length} tokens leaves a capacity "
                f"of {capacity}, not more than n_sink={press.n_sink}; use a smaller ratio or a fixed capacity"
            )
        limit = self.scheme.max_positions
        return min(capacity, limit) if limit is not None else capacity

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
        if bool((new.long().cummax(1).values.bool() & ~new).any()):  # a pad after a real token
            raise UnsupportedGenerationError(
                "the attention_mask pads some rows on the right (padding after real tokens). The press streams "
                "left-padded batches only: set tokenizer.padding_side = 'left'."
            )
        if not stream.padded:
            if not bool(new.all()):
                raise UnsupportedGenerationError(
                    "padding appeared in the middle of an unpadded stream; pad prompts on the left, at the start"
                )
            return None
        return new


# keywords that make a call attend to another model's states (seq2seq decoders, Mllama's image layers)
CROSS_ATTENTION_INPUTS = ("encoder_hidden_states", "cross_attention_states")


def _serves_media(model: nn.Module) -> bool:
    from .registry import get_registry, model_type_of

    return get_registry().serves_media(model_type_of(model))


def _under_torch_compile() -> bool:
    """Whether this call runs inside a ``torch.compile``-d callable: dynamo tracing it, or running
    it eagerly after a graph break (the frame of dynamo's ``compile_wrapper`` is then on the stack;
    ``torch.compiler.disable``'s wrapper, named otherwise, is not a compile)."""
    if torch.compiler.is_compiling():
        return True
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "compile_wrapper" and code.co_filename.endswith(os.path.join("_dynamo", "eval_frame.py")):
            return True
        frame = frame.f_back
    return False


def _describe(settings: tuple) -> str:
    n_sink, capacity, ratio, shift, adapter, scheme = settings
    budget = f"capacity={capacity}" if capacity is not None else f"compression_ratio={ratio}"
    return f"n_sink={n_sink}, {budget}, position_shift={shift}, adapter {adapter!r}"


def _same(stored: torch.Tensor, ref: torch.Tensor) -> bool:
    """The tensor the press left (an fp8 layer's bytes are a fresh view of the same storage)."""
    return stored is ref or (stored.data_ptr() == ref.data_ptr() and stored.shape == ref.shape)


def _layer_index(attention: nn.Module, position: int) -> int:
    layer_idx = getattr(attention, "layer_idx", None)
    return position if layer_idx is None else int(layer_idx)


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
