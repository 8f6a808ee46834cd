"""The conformance checks: is a family EXACT under the press with a given adapter?

Everything here drives the model through transformers' public interface and the press
through kvpress_lite's public API only (``apply_press``, ``press.remove``, ``press.stats``,
``Adapter`` / ``Rope`` / ``LearnedPositions``); the references are dense forwards of the
same model with no press at all.

Setting: ``n_sink=2``, ``capacity=8`` (window 6), a random stream of ``STREAM`` tokens fed as
a ``PROMPT``-token prompt then one token per call (teacher forcing). A token ``t`` streamed
under the press sees the sinks, the ``window`` tokens before it, and itself.

(a) no-op      a stream that fits in the cache gives the same logits with and without the press
               (against one dense forward where the model's own unpressed loop is not that: Bamba)
(b) bounded    after a long stream every layer of the cache holds <= capacity entries
(c) generate   greedy ``generate()`` and a plain loop (teacher-forced on what generate produced)
               agree, both under the press (2-layer model)
(d) absolute   ``position_shift=False``, ONE-layer model: token t's logits equal one dense forward
               over the kept tokens at their absolute positions (keys of a one-layer model depend
               only on token and position, so this is exact)
(f) multi-layer ``position_shift=False`` on the 2-layer model (windowed and full kinds together),
               against one teacher-forced dense forward with per-layer-type 4D masks; where the
               model takes such masks (required for families with windowed layer kinds). A
               hybrid's recurrent layers get no mask there: they run over every token, as they
               do under the press (which trims only attention layers)
(e) shifted    ``position_shift=True``, ONE-layer model: the same dense forward at positions
               0..L-1 (RoPE / ALiBi / no positions: positions within the cache), or, for learned
               absolute positions, at ``min(j, capacity - 1)`` for stream index j (each token keeps
               the slot it was inserted at; single-token steps)

Every dense reference passes an explicit all-ones 2D ``attention_mask``: without one,
transformers 5.x reads non-contiguous ``position_ids`` as packed sequences.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import kvpress_lite as kvl
from kvpress_lite.cache_access import model_cache_kwarg
from kvpress_lite.tiny import NotBuildable

N_SINK = 2
CAPACITY = 8
WINDOW = CAPACITY - N_SINK
NARROW_WINDOW = 4  # sliding windows of tiny configs: kept by the layers themselves (4 - 1 <= WINDOW)
WIDE_WINDOW = 2 * CAPACITY  # ... or wider than the capacity: the press trims those layers too
PROMPT = 4
STREAM = 22
SHORT = CAPACITY  # (a): a stream that fills the cache exactly, no eviction
# max |diff| relative to max(1, max |logit|). A measured bound, not the derived float32 one
# (tests/bounds.py, ~1e-4 for these models), which would let a small but real deviation through:
# a query scale that follows absolute positions shows as ~1e-4. Exact families stay below 7e-6 in
# float32 on an AMD EPYC (AVX2) and an Intel Xeon (AVX-512), and under ATEN_CPU_CAPABILITY=default
# (tests/test_kernels.py): 3x headroom over every kernel choice seen.
TOL = 2e-5


class CheckFailed(AssertionError):
    def __init__(self, check: str, message: str):
        super().__init__(f"({check}) {message}")
        self.check = check
        self.message = message


def stream_ids(length: int = STREAM, vocab: int = 128, seed: int = 1234) -> torch.Tensor:
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def _output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _layers(cache):
    cache = getattr(cache, "self_attention_cache", cache)
    return cache.layers


@torch.no_grad()
def loop(model, ids: torch.Tensor, prompt_len: int = PROMPT):
    """Prompt in one call, then one token per call, passing the cache back; no position_ids.
    Returns (logits [T - prompt_len + 1, vocab]: the logits at positions prompt_len-1..T-1, cache)."""
    name = model_cache_kwarg(model)
    out = model(input_ids=ids[:, :prompt_len], use_cache=True)
    cache = _output_cache(out)
    if cache is None:
        raise CheckFailed("loop", "the model returned no cache (no KV cache)")
    logits = [out.logits[0, -1]]
    for t in range(prompt_len, ids.shape[1]):
        out = model(input_ids=ids[:, t : t + 1], use_cache=True, **{name: cache})
        cache = _output_cache(out)
        logits.append(out.logits[0, -1])
    return torch.stack(logits), cache


def kept_indices(t: int) -> list[int]:
    """Stream indices token t attends to under the press (token-by-token steps)."""
    return [j for j in range(t + 1) if j < N_SINK or j >= t - WINDOW]


def position_table(model):
    """The position table of a decoder that counts positions itself and takes no position_ids (the
    decoders of BART, Marian, Whisper ...): a module named ``embed_positions`` whose forward takes
    ``position_ids``. None for every other model."""
    if "position_ids" in inspect.signature(model.forward).parameters:
        return None
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "embed_positions" and "position_ids" in inspect.signature(module.forward).parameters:
            return module
    return None


@torch.no_grad()
def own_position_offset(model) -> int:
    """The row of the model's position table that its own numbering gives the first token of a
    fresh prompt: 0 for most, ``padding_idx + 1`` for RoBERTa and its kin. Measured on the model's
    embedding module (its output without position_ids against explicit ones), so a reference at
    position p reads the row the model itself would use for the p-th token."""
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    if embeddings is None or "position_ids" not in inspect.signature(embeddings.forward).parameters:
        return 0
    ids = torch.full((1, 3), 5, dtype=torch.long)
    plain = embeddings(input_ids=ids)
    for offset in range(4):
        if torch.equal(embeddings(input_ids=ids, position_ids=torch.arange(3).view(1, -1) + offset), plain):
            return offset
    raise CheckFailed("d", "the model numbers a fresh prompt from none of rows 0-3 of its position table")


def takes_position_ids(model) -> bool:
    return "position_ids" in inspect.signature(model.forward).parameters or position_table(model) is not None


@torch.no_grad()
def dense_logits(model, tokens: torch.Tensor, positions: Optional[list[int]]) -> torch.Tensor:
    """Logits of the last token of one dense forward (no press, no cache). A decoder that takes no
    position_ids gets them at its position table, through a pre-hook of the reference's own."""
    kwargs = dict(input_ids=tokens.view(1, -1), attention_mask=torch.ones(1, tokens.numel(), dtype=torch.long),
                  use_cache=False)
    table = position_table(model)
    if positions is None:
        return model(**kwargs).logits[0, -1]
    if table is None:
        kwargs["position_ids"] = torch.tensor([positions], dtype=torch.long) + own_position_offset(model)
        return model(**kwargs).logits[0, -1]
    given = torch.tensor(positions, dtype=torch.long)
    handle = table.register_forward_pre_hook(lambda m, a, k: (a, {**k, "position_ids": given}), with_kwargs=True)
    try:
        return model(**kwargs).logits[0, -1]
    finally:
        handle.remove()


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1.0))


def _close(check: str, got, ref, what: str) -> float:
    err = rel_err(got, ref)
    if not err <= TOL:
        raise CheckFailed(check, f"{what}: relative error {err:.3g} > {TOL}")
    return err


def _press(model, adapter, position_shift=True):
    kwargs = {} if adapter is None else {"adapter": adapter}
    return kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY, position_shift=position_shift, **kwargs)


# -- the checks --------------------------------------------------------------------------


@torch.no_grad()
def check_noop(model, adapter=None) -> float:
    """(a): the press's plain loop over a stream that fits equals the same loop without the press.
    Where that unpressed loop disagrees with one dense forward over the stream (a model that numbers
    each call's tokens from 0 when handed no position_ids: Bamba on transformers 5.25, whose
    generate() hands them), the dense forward is the reference: the press hands every call its
    positions, so it must match what the model computes for the stream as a whole."""
    ids = stream_ids(SHORT)
    ref, _ = loop(model, ids)
    press = _press(model, adapter)
    try:
        got, _ = loop(model, ids)
    finally:
        press.remove()
    if rel_err(got, ref) <= TOL:
        return rel_err(got, ref)
    dense = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0, PROMPT - 1:]
    if rel_err(ref, dense) > TOL:  # the model's own plain loop is not its dense forward
        return _close("a", got, dense, f"no-op stream under the press, against one dense forward (the model's own "
                                       f"plain loop is {rel_err(ref, dense):.2g} off it)")
    return _close("a", got, ref, "no-op stream under the press")


def state_bytes(layer) -> int:
    """Bytes a cache layer holds outside its keys/values: the conv and recurrent states of an
    SSM / linear-attention layer (transformers 5.x ``LinearAttentionLayer``), 0 for others."""
    total = 0
    for name in ("conv_states", "recurrent_states"):
        states = getattr(layer, name, None) or {}
        for tensor in (states.values() if isinstance(states, dict) else states):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def check_bounded(model, adapter=None) -> list[int]:
    """Every attention layer holds <= capacity entries after the stream, and every other layer's
    state (a hybrid's recurrent / convolution layers) has the size it had when the cache was full."""
    press = _press(model, adapter)
    try:
        ids = stream_ids()
        _, half = loop(model, ids[:, : CAPACITY + 2])
        half_states = [state_bytes(layer) for layer in _layers(half)]
        _, cache = loop(model, ids)
        layers = _layers(cache)
        lengths = [layer.keys.shape[-2] for layer in layers if getattr(layer, "keys", None) is not None]
        states = [state_bytes(layer) for layer in layers]
        stats = list(press.stats.cache_length)
    finally:
        press.remove()
    if not lengths or max(lengths) > CAPACITY:
        raise CheckFailed("b", f"cache lengths {lengths} exceed capacity {CAPACITY}")
    if stats and max(stats) > CAPACITY:
        raise CheckFailed("b", f"press.stats.cache_length {stats} exceed capacity {CAPACITY}")
    if states != half_states:
        raise CheckFailed("b", f"recurrent states grew with the stream: {half_states} bytes -> {states} bytes")
    return lengths


@torch.no_grad()
def check_generate(model, adapter=None) -> float:
    prompt = stream_ids()[:, :PROMPT]
    new = STREAM - PROMPT
    press = _press(model, adapter)
    try:
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    finally:
        press.remove()
    seq, gen_logits = out.sequences, torch.stack(out.logits)[:, 0]
    if seq.shape[1] != STREAM:
        raise CheckFailed("c", f"generate() produced {seq.shape[1] - PROMPT} tokens, expected {new}")
    press = _press(model, adapter)
    try:
        loop_logits, _ = loop(model, seq)
    finally:
        press.remove()
    err = _close("c", gen_logits, loop_logits[:-1], "generate() vs plain loop")
    if not torch.equal(loop_logits[:-1].argmax(-1), seq[0, PROMPT:]):
        raise CheckFailed("c", "the loop's greedy tokens differ from generate()'s")
    return err


def learned_slot_positions(kept: list[int]) -> list[int]:
    """Learned absolute positions under the shift: the slot a token was inserted at (single-token steps
    after a prompt shorter than the capacity), never above capacity - 1."""
    return [min(j, CAPACITY - 1) for j in kept]


def check_positions(model, adapter, position_shift: bool, scheme: str):
    """(d) / (e) on a ONE-layer model. ``scheme``: "rope" (also ALiBi / none: relative), or "learned"
    (absolute tables: learned or sinusoidal). Returns the worst error, or for (d) the message of a
    clean refusal at ``apply_press`` (UnsupportedModelError)."""
    check = "e" if position_shift else "d"
    ids = stream_ids()
    try:
        press = _press(model, adapter, position_shift=position_shift)
    except kvl.UnsupportedModelError as exc:
        if position_shift:
            raise
        # a clean refusal of absolute positions at apply_press (ALiBi: distances follow the cache)
        # is no inexact result: recorded, not failed
        return f"refused: {exc}"[:200]
    try:
        got, _ = loop(model, ids)
    finally:
        press.remove()
    worst = 0.0
    with_positions = takes_position_ids(model)
    parallel = scheme == "rope" and recurrent_beside_attention(model)
    for row, t in enumerate(range(PROMPT - 1, STREAM)):
        kept = kept_indices(t)
        if not position_shift:
            positions = kept
        elif scheme == "learned":
            positions = learned_slot_positions(kept)
        else:
            positions = list(range(len(kept)))
        if not with_positions and positions != list(range(len(kept))):
            raise CheckFailed(check, "the model takes no position_ids: a reference at these positions cannot be built")
        if parallel:
            ref = prefix_logits(model, ids[0, : t + 1], kept, positions)
        else:
            ref = dense_logits(model, ids[0, kept], positions if with_positions else None)
        worst = max(worst, _close(check, got[row], ref, f"token {t} (kept {len(kept)}, positions {positions})"))
    return worst


def takes_mask_mapping(model) -> bool:
    """True when the base model accepts ``attention_mask`` as a dict of per-layer-type 4D masks."""
    base = getattr(model, "base_model", model)
    for module in [base, *base.children()]:
        try:
            source = inspect.getsource(type(module).forward)
        except (OSError, TypeError):
            continue
        if "causal_mask_mapping := attention_mask" in source:
            return True
    return False


def _visible_mask(visible, length: int, dtype) -> torch.Tensor:
    allowed = torch.zeros(length, length, dtype=torch.bool)
    for i in range(length):
        allowed[i, list(visible(i))] = True
    mask = torch.zeros(length, length, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask.view(1, 1, length, length)


def layer_visibility(config, layer_type: str):
    """Which keys query i sees in a layer of ``layer_type`` under the press: its own window for
    windowed kinds (left to transformers), the sinks and the press's window for the others."""
    window = getattr(config, "sliding_window", None)
    chunk = getattr(config, "attention_chunk_size", None)
    if "chunked" in layer_type and chunk:
        return lambda i: range(i - i % chunk, i + 1)
    if ("sliding" in layer_type or "local" in layer_type) and window and window - 1 <= WINDOW:
        # narrower than the press's window: the layer keeps its own window and sees no sinks
        return lambda i: range(max(0, i - window + 1), i + 1)
    return kept_indices  # full layers, and windowed layers wider than the capacity: pressed


# layer kinds (config.layer_types) with no attention: a hybrid's SSM / linear-attention / convolution
# layers, and layers of MLP alone. Under the press they see the whole stream, so the reference runs
# them over every token with no mask (None: the model's own "no padding" for them).
RECURRENT_KINDS = frozenset({"linear_attention", "conv", "mamba", "mamba2", "recurrent", "moe", "mlp"})


def mask_kinds(model, config) -> set:
    """The keys of the per-layer-type mask dict the model reads: its ``config.layer_types``, and the
    keys of its own ``create_masks_for_generate`` (the function generate() builds that dict with) where
    it names its masks otherwise. Falcon-H1's layers are all ``"hybrid"`` (Mamba-2 and attention in
    parallel on one cache layer), and each reads the ``"full_attention"`` mask for its attention and
    the ``"linear_attention"`` one for its Mamba-2 mixer."""
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    own = getattr(type(model), "create_masks_for_generate", None)
    if own is None:
        return kinds
    try:
        built = own(config=model.config, inputs_embeds=torch.empty(1, 2, 0, dtype=model.dtype),
                    attention_mask=torch.ones(1, 2, dtype=torch.long), cache=None,
                    position_ids=torch.arange(2).view(1, -1))
    except Exception:  # an override needing inputs of its own (token types, images): keep layer_types
        return kinds
    return kinds | set(built) if isinstance(built, dict) else kinds


def recurrent_beside_attention(model) -> bool:
    """True when a layer runs a recurrent mixer beside its attention (Falcon-H1: Mamba-2 and attention
    in parallel in every layer): the model reads a recurrent kind's mask from its per-layer-type dict.
    Under the press that mixer sees every token, so a one-layer reference over the kept tokens alone
    would not be the press's semantics."""
    return takes_mask_mapping(model) and bool(mask_kinds(model, model.config.get_text_config()) & RECURRENT_KINDS)


@torch.no_grad()
def prefix_logits(model, prefix: torch.Tensor, kept: list[int], positions: list[int]) -> torch.Tensor:
    """(d)/(e) reference for :func:`recurrent_beside_attention` models: logits of the last token of one
    dense forward over the whole prefix (the recurrent mixer runs over every token, with no mask, as under
    the press), whose attention mask lets that token see only ``kept``, at ``positions`` (the evicted
    tokens are masked out of its attention, their positions unused). Exact for a ONE-layer model: keys
    depend only on token and position, and the last row depends on no other row's attention output."""
    n = prefix.numel()
    pos = torch.zeros(n, dtype=torch.long)
    pos[kept] = torch.tensor(positions, dtype=torch.long)
    mask = _visible_mask(lambda i: kept if i == n - 1 else range(i + 1), n, model.dtype)
    masks = {kind: None if kind in RECURRENT_KINDS else mask for kind in mask_kinds(model, model.config.get_text_config())}
    out = model(input_ids=prefix.view(1, -1), attention_mask=masks, position_ids=pos.view(1, -1), use_cache=False)
    return out.logits[0, -1]


@torch.no_grad()
def check_multilayer_absolute(model, adapter=None) -> float:
    """(f) ``position_shift=False`` on the 2-layer model (all its layer kinds): the streamed logits
    equal ONE teacher-forced dense forward over the whole stream, with absolute positions and a
    per-layer-type 4D mask saying which keys each query saw (its own window in windowed layers,
    sinks + window in pressed ones). Exact for any depth: every token's hidden states are
    computed once, with the visibility it had in the stream."""
    ids = stream_ids()
    try:
        press = _press(model, adapter, position_shift=False)
    except kvl.UnsupportedModelError as exc:
        return f"refused: {exc}"[:200]
    try:
        got, _ = loop(model, ids)
    finally:
        press.remove()
    config = model.config.get_text_config()  # a multimodal wrapper's layers are its text model's
    masks = {kind: None if kind in RECURRENT_KINDS else _visible_mask(layer_visibility(config, kind), STREAM, model.dtype)
             for kind in mask_kinds(model, config)}
    out = model(input_ids=ids, attention_mask=masks, position_ids=torch.arange(STREAM).view(1, -1), use_cache=False)
    ref = out.logits[0, PROMPT - 1 :]
    worst = 0.0
    for row in range(ref.shape[0]):
        worst = max(worst, _close("f", got[row], ref[row], f"token {PROMPT - 1 + row}"))
    return worst


@dataclass
class Candidate:
    """A candidate adapter and the reference semantics its position scheme implies."""

    adapter: kvl.Adapter
    scheme: str  # "rope" | "learned" | "relative"

    @property
    def name(self) -> str:
        return self.adapter.name


def run_checks(build: Callable[[int, str], torch.nn.Module], adapter, scheme: str, attn: str = "eager",
               one_layer_variants: tuple = (None,), windowed: tuple = ()) -> dict:
    """All of (a)-(e). ``build(num_layers, attn, variant)`` makes a fresh tiny model.

    ``one_layer_variants``: layer kinds (indices into the family's default layer pattern) to
    build one-layer models of for (d) and (e). ``windowed``: those of them that are
    sliding-window kinds: the press leaves their cache to transformers, and a one-layer model
    of only such layers has nothing to press, so (d)/(e) for them is skipped, when the family
    has another kind (the 2-layer checks still run them next to a full layer).

    ``adapter`` is an Adapter, a name, or None (registry lookup). Raises CheckFailed (or the
    press's own error) at the first failure; returns the worst errors.
    """
    two = build(2, attn, None)
    errors = {"a": check_noop(two, adapter)}
    errors["b"] = check_bounded(two, adapter)
    errors["c"] = check_generate(two, adapter)
    if takes_mask_mapping(two):
        errors["f"] = check_multilayer_absolute(two, adapter)
    elif windowed:
        raise CheckFailed("f", "windowed layer kinds, and the model takes no per-layer-type masks for an exact check")
    others = [v for v in one_layer_variants if v not in windowed]
    for variant in one_layer_variants:
        if variant in windowed and others:
            errors[f"d{variant}"] = errors[f"e{variant}"] = "skipped: sliding-window layer kind"
            continue
        tag = "" if variant is None else variant
        try:
            one = build(1, attn, variant)
            errors[f"d{tag}"] = check_positions(one, adapter, False, scheme)
            errors[f"e{tag}"] = check_positions(one, adapter, True, scheme)
        except (kvl.UnsupportedModelError, NotBuildable) as exc:
            if not any(why in str(exc) for why in NO_ATTENTION) or len(one_layer_variants) < 2:
                raise
            # a layer kind without attention (a hybrid's convolution / linear-attention layers):
            # nothing of the press's to check in it; the 2-layer checks above run it beside an
            # attention layer, and at least one kind must have been checked (below)
            errors[f"d{tag}"] = errors[f"e{tag}"] = "skipped: no attention in this layer kind"
    if one_layer_variants and all(str(errors.get(f"e{'' if v is None else v}", "")).startswith("skipped")
                                  for v in one_layer_variants):
        raise CheckFailed("e", "no layer kind had an attention layer to check (d)/(e) on")
    return errors


# what a one-layer model of a layer kind without attention says: the adapter finds no attention
# module there, the press finds only recurrent layers, or the config refuses a model without attention
NO_ATTENTION = ("found no attention modules", "no attention layer to press", "expects at least one attention layer")
