"""Is the press exact on *this* model? ``kvl.verify(model)`` / ``kvpress-lite verify MODEL``.

The conformance suite proves each family exact on tiny random models. This runs the same
kind of checks on a user's own model, with its real weights and config, on a copy cut to
its first layers (one per layer type for the one-layer checks), in float32, so it takes
seconds on a CPU. Checks (``n_sink=2``, ``capacity=8``, a random stream of 20 tokens fed
one token a call):

``no-op``      a stream that fits in the cache gives the dense model's logits (first two layers);
``bounded``    after the stream every layer holds at most ``capacity`` entries;
``shifted``    one layer of each layer type, ``position_shift=True`` (the paper): each token's
               logits equal one dense forward, with no cache, over the tokens the press kept
               (sinks, window, the token) at positions within the cache (learned absolute
               positions: the slot each token was written to). Exact because a one-layer
               model's keys depend only on token and position;
``absolute``   the same at absolute positions, ``position_shift=False`` (where the model
               takes ``position_ids``).

Errors are ``max |diff| / max(1, max |logit|)`` against the conformance suite's bound
(2e-5). A model is called exact only when every check ran and passed.

>>> report = kvl.verify(model)          # doctest: +SKIP
>>> print(report); report.exact         # doctest: +SKIP
"""

from __future__ import annotations

import copy
import inspect
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

N_SINK, CAPACITY, STREAM = 2, 8, 20
TOL = 2e-5  # the conformance suite's measured bound (tests/conformance/oracle.py says why)


@dataclass
class Check:
    name: str
    layers: str
    status: str  # "exact", "FAILED", "not applicable", "could not run"
    error: Optional[float] = None
    detail: str = ""


@dataclass
class VerifyReport:
    """What :func:`verify` found: one :class:`Check` per check and layer type."""

    model: str
    checks: list = field(default_factory=list)

    @property
    def exact(self) -> bool:
        ran = [c for c in self.checks if c.status != "not applicable"]
        return bool(ran) and all(c.status == "exact" for c in ran)

    def __str__(self) -> str:
        lines = [f"{self.model}: {'EXACT' if self.exact else 'NOT VERIFIED EXACT'} "
                 f"(n_sink={N_SINK}, capacity={CAPACITY}, {STREAM} tokens, float32, bound {TOL:g})"]
        for c in self.checks:
            err = "" if c.error is None else f"  error {c.error:.2e}"
            lines.append(f"  {c.name:<9} {c.layers:<28} {c.status}{err}{'  ' + c.detail if c.detail else ''}")
        return "\n".join(lines)


def _layer_types(config: Any, n: int) -> list[str]:
    types = getattr(config, "layer_types", None)
    return list(types) if types and len(types) == n else ["full_attention"] * n


def _n_layers(config: Any) -> int:
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise ValueError(f"{type(config).__name__} names no layer count")


def _text_config(config: Any) -> Any:
    """A multimodal wrapper's text config (its layers are the ones pressed), else the config."""
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def _decoder_prefix(model: nn.Module) -> str:
    """Where a wrapper's text decoder sits (``model.language_model.``); "" for a plain causal LM."""
    from .wrappers import text_view

    view = text_view(model)
    if view is None:
        return ""
    return next(name + "." for name, module in model.named_modules() if module is view.base_model)


# config fields listing the indices of the layers of one kind (Bamba's attention layers, Mllama's
# cross-attention layers): a cut copy renumbers them
_LAYER_INDEX_LISTS = ("attn_layer_indices", "cross_attention_layers")


def truncated(model: nn.Module, keep: list[int]) -> nn.Module:
    """A float32 copy of ``model`` with only its (text) layers ``keep`` (in that order), real weights."""
    outer = copy.deepcopy(model.config)
    config = _text_config(outer)
    prefix = _decoder_prefix(model)
    n = _n_layers(config)
    for name, value in list(vars(config).items()):  # per-layer lists follow the layers kept
        if name in _LAYER_INDEX_LISTS and isinstance(value, list):  # indices of layers of one kind: renumbered
            setattr(config, name, [keep.index(i) for i in value if i in keep])
            continue
        # a pair or a list per role is no per-layer list (Falcon-H1's time_step_limit, mlp_multipliers)
        per_layer = (isinstance(value, list) and not name.endswith("multipliers")) or (
            isinstance(value, tuple) and all(isinstance(v, str) for v in value))
        if per_layer and len(value) == n and name != "architectures":
            setattr(config, name, type(value)(value[i] for i in keep))
    for name in ("num_hidden_layers", "n_layer", "num_layers", "decoder_layers"):  # BART-likes: decoder_layers
        if isinstance(getattr(config, name, None), int):
            setattr(config, name, len(keep))
    small = type(model)(outer).float().eval()
    mapping = {old: new for new, old in enumerate(keep)}
    state = {}
    pattern = re.compile(r"(^|\.)(layers|h|blocks|layer)\.(\d+)\.")
    for key, tensor in model.state_dict().items():
        match = pattern.search(key) if key.startswith(prefix) else None  # a vision tower's layers stay
        if match is None:
            state[key] = tensor
        elif int(match.group(3)) in mapping:
            state[key[: match.start(3)] + str(mapping[int(match.group(3))]) + key[match.end(3):]] = tensor
    missing, unexpected = small.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("inv_freq", "masked_bias", ".bias_mask")) and "rotary" not in k]
    if missing or unexpected:
        raise ValueError(f"could not cut {type(model).__name__} to layers {keep}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    small.generation_config = copy.deepcopy(getattr(model, "generation_config", None))
    return small


def _stream(model: nn.Module, ids: torch.Tensor, position_shift: bool,
            adapter: Any = None) -> tuple[list[torch.Tensor], list[int]]:
    import kvpress_lite as kvl
    from .cache_access import cache_layers, layer_length, model_cache_kwarg, new_dynamic_cache

    kw, logits = model_cache_kwarg(model), []
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY, position_shift=position_shift,
                         adapter=adapter), torch.no_grad():
        cache = new_dynamic_cache(model)
        for i in range(ids.shape[1]):
            logits.append(model(input_ids=ids[:, i : i + 1], use_cache=True, **{kw: cache}).logits[0, -1])
        lengths = [layer_length(layer) for layer in cache_layers(cache)]
    return logits, lengths


@torch.no_grad()
def _own_offset(model: nn.Module) -> int:
    """The row of its position table a model gives a fresh prompt's first token (RoBERTa's
    ``padding_idx + 1``, else 0), measured on its embedding module, so the reference reads the row
    the model itself would use rather than the one the adapter under check says."""
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    if embeddings is None or "position_ids" not in inspect.signature(embeddings.forward).parameters:
        return 0
    ids = torch.full((1, 3), 5, dtype=torch.long)
    plain = embeddings(input_ids=ids)
    return next((k for k in range(4) if torch.equal(
        embeddings(input_ids=ids, position_ids=torch.arange(3).view(1, -1) + k), plain)), 0)


def _mask_kinds(model: nn.Module) -> set:
    """The per-layer-type masks a model reads: ``config.layer_types`` and the keys of its own
    ``create_masks_for_generate`` (Falcon-H1 names its attention and Mamba-2 masks itself)."""
    config = _text_config(model.config)
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    own = getattr(type(model), "create_masks_for_generate", None)
    try:
        built = own(config=model.config, inputs_embeds=torch.empty(1, 2, 0, dtype=model.dtype),
                    attention_mask=torch.ones(1, 2, dtype=torch.long), cache=None,
                    position_ids=torch.arange(2).view(1, -1)) if own is not None else None
    except Exception:  # an override needing inputs of its own: keep layer_types
        built = None
    return kinds | set(built) if isinstance(built, dict) else kinds


def _parallel_recurrent(model: nn.Module, kinds: set) -> bool:
    """True when a layer runs a recurrent mixer beside its attention (Falcon-H1): the model reads a
    recurrent kind's mask (``kinds``: :func:`_mask_kinds`). Under the press that mixer sees every token."""
    from .cache_access import RECURRENT_LAYER_TYPES

    return bool(kinds & set(RECURRENT_LAYER_TYPES)) and not set(
        getattr(_text_config(model.config), "layer_types", None) or []) & set(RECURRENT_LAYER_TYPES)


def _dense(model: nn.Module, ids: torch.Tensor, positions: Optional[list[int]], table: Optional[nn.Module] = None,
           kept: Optional[list[int]] = None, kinds: frozenset = frozenset()) -> torch.Tensor:
    """The last token's logits of one dense forward over ``ids`` at ``positions``. ``table``: the
    position module of a decoder that takes no position_ids (they are handed there); ``kept``: for
    a layer with a recurrent mixer beside its attention, ``ids`` is the whole prefix, the mixer runs
    over all of it and the last token's attention sees only ``kept`` (at ``positions``), through one
    mask per kind of ``kinds`` (:func:`_mask_kinds`)."""
    from .cache_access import RECURRENT_LAYER_TYPES

    kwargs: dict = {"attention_mask": torch.ones_like(ids), "use_cache": False}
    if kept is not None:
        n = ids.shape[1]
        full = torch.zeros(n, dtype=torch.long)
        full[kept] = torch.tensor(positions)
        allowed = torch.ones(n, n, dtype=torch.bool).tril()
        allowed[-1] = False
        allowed[-1, kept] = True
        mask = torch.zeros(n, n, dtype=model.dtype).masked_fill(~allowed, torch.finfo(model.dtype).min)[None, None]
        kwargs["attention_mask"] = {k: None if k in RECURRENT_LAYER_TYPES else mask for k in kinds}
        positions = full.tolist()
    handle = None
    if positions is not None and table is not None:
        given = torch.tensor(positions)
        handle = table.register_forward_pre_hook(lambda m, a, k: (a, {**k, "position_ids": given}), with_kwargs=True)
    elif positions is not None:
        kwargs["position_ids"] = torch.tensor([positions]) + _own_offset(model)
    try:
        with torch.no_grad():
            return model(input_ids=ids, **kwargs).logits[0, -1]
    finally:
        if handle is not None:
            handle.remove()


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp(min=1.0))


def _kept(t: int) -> list[int]:
    """Stream indices token t attends to under the press: the sinks, the window before it, itself."""
    if t < CAPACITY:
        return list(range(t + 1))
    return list(range(N_SINK)) + list(range(t - (CAPACITY - N_SINK), t + 1))


def _compare(small: nn.Module, ids: torch.Tensor, shift: bool, learned: bool, adapter: Any) -> float:
    from .wrappers import text_view

    got, _ = _stream(small, ids, position_shift=shift, adapter=adapter)
    takes = "position_ids" in inspect.signature(small.forward).parameters
    table = None if takes else adapter.positions_module(text_view(small) or small)
    kinds = _mask_kinds(small)
    parallel = _parallel_recurrent(small, kinds)
    worst = 0.0
    for t in range(CAPACITY, ids.shape[1]):
        kept = _kept(t)
        if not shift:
            positions = kept
        elif learned:  # each token keeps the slot it was written to
            positions = [min(j, CAPACITY - 1) for j in kept]
        else:
            positions = list(range(len(kept)))
        if parallel:
            want = _dense(small, ids[:, : t + 1], positions, table, kept=kept, kinds=kinds)
        else:
            want = _dense(small, ids[:, kept], positions, table)
        worst = max(worst, _error(got[t], want))
    return worst


def verify(model: nn.Module, adapter: Any = None, seed: int = 0) -> VerifyReport:
    """Run the checks on ``model`` (not changed: they run on cut copies); see the module docstring.
    ``adapter``: the one to check (an :class:`~kvpress_lite.Adapter` or a name), else the
    registry's choice for ``model``.

    >>> report = verify(model)      # doctest: +SKIP
    >>> report.exact                 # doctest: +SKIP
    True
    """
    from .adapter import Adapter
    from .cache_access import RECURRENT_LAYER_TYPES
    from .errors import UnsupportedModelError
    from .wrappers import text_view
    from .positions import AbsoluteEmbedding
    from .registry import find_adapter

    name = f"{type(model).__name__} ({getattr(model.config, 'model_type', '?')})"
    report = VerifyReport(model=name)
    if not isinstance(adapter, Adapter):
        adapter = find_adapter(model, adapter)  # an unsupported model is refused here, naming why
    n = _n_layers(_text_config(model.config))
    types = _layer_types(_text_config(model.config), n)
    vocab = int(model.get_output_embeddings().weight.shape[0]) if model.get_output_embeddings() is not None else 100
    ids = torch.randint(0, vocab, (1, STREAM), generator=torch.Generator().manual_seed(seed))

    def run(check: str, layers: str, fn) -> None:
        try:
            error = fn()
        except UnsupportedModelError as exc:
            if check == "absolute":  # a family served with position_shift=True only (Llama 4)
                report.checks.append(Check(check, layers, "not applicable", detail="refused: " + str(exc)[:140]))
                return
            if "nothing for the press" not in str(exc):
                raise
            report.checks.append(Check(check, layers, "not applicable", detail="the layer keeps its own sliding "
                                       "window, inside the press's: the press leaves it alone"))
            return
        except Exception as exc:  # a check that cannot run is reported, and the model is not called exact
            report.checks.append(Check(check, layers, "could not run", detail=f"{type(exc).__name__}: {exc}"[:160]))
            return
        if isinstance(error, Check):
            report.checks.append(error)
        else:
            report.checks.append(Check(check, layers, "exact" if error <= TOL else "FAILED", error))

    # the first layer of each kind, attention kinds before a hybrid's recurrent ones, two of them
    kinds = sorted(dict.fromkeys(types), key=lambda k: k in RECURRENT_LAYER_TYPES)
    first = sorted(dict.fromkeys([types.index(k) for k in kinds]))[:2] if n > 1 else [0]
    if len(set(kinds)) > 2:
        first = sorted(types.index(k) for k in kinds[:2])
    if len(first) < 2 and n > 1:
        first = [0, 1]
    try:
        two = truncated(model, first)
    except (ValueError, RuntimeError) as exc:  # a layer pattern derived from other fields (Jamba's
        # attn_layer_period), or weights sized by the layer count (Gemma 4's per-layer embeddings)
        report.checks.append(Check("no-op", f"layers {first}", "could not run", detail=str(exc)[:160]))
        return report

    def no_op() -> float:
        got, _ = _stream(two, ids[:, :CAPACITY], position_shift=True, adapter=adapter)
        with torch.no_grad():
            want = two(input_ids=ids[:, :CAPACITY], attention_mask=torch.ones_like(ids[:, :CAPACITY])).logits[0]
        return max(_error(g, w) for g, w in zip(got, want))

    def bounded():
        _, lengths = _stream(two, ids, position_shift=True, adapter=adapter)
        ok = max(lengths) <= CAPACITY
        return Check("bounded", f"layers {first}", "exact" if ok else "FAILED", detail=f"entries per layer {lengths}")

    run("no-op", f"layers {first}", no_op)
    run("bounded", f"layers {first}", bounded)
    takes_positions = bool(adapter.position_module) or (
        "position_ids" in inspect.signature(adapter.decoder(model).forward).parameters)
    for kind in dict.fromkeys(types):
        index = types.index(kind)
        label = f"{kind} (layer {index})"
        if kind in RECURRENT_LAYER_TYPES:  # a hybrid's SSM / linear-attention / convolution layer
            report.checks.append(Check("shifted", label, "not applicable", detail="a recurrent layer: the press "
                                       "leaves its fixed-size state whole (no-op and bounded ran it)"))
            continue
        try:
            one = truncated(model, [index])
        except (ValueError, RuntimeError) as exc:
            report.checks.append(Check("shifted", label, "could not run", detail=str(exc)[:160]))
            continue
        scheme = adapter.positions(text_view(one) or one)  # a wrapper's positions are its text model's
        learned = isinstance(scheme, AbsoluteEmbedding)
        run("shifted", label, lambda: _compare(one, ids, shift=True, learned=learned, adapter=adapter))
        if takes_positions:
            run("absolute", label, lambda: _compare(one, ids, shift=False, learned=learned, adapter=adapter))
        else:
            report.checks.append(Check("absolute", label, "not applicable", detail="the model takes no position_ids"))
    logger.info("%s", report)
    return report
