"""Streaming perplexity, the way the StreamingLLM paper measures it.

One token goes in per model call; the logits of that call score the *next* token.
``nll[i]`` is the negative log-likelihood of ``input_ids[i + 1]`` given what the method
lets the model see of ``input_ids[: i + 1]``; there are ``T - 1`` of them.

Methods (``capacity`` = C, ``n_sink`` = S):

``dense``
    No press: every token sees the whole prefix. Computed by teacher forcing in chunks of
    ``dense_chunk`` tokens over a growing cache, which gives the same numbers as feeding
    one token at a time (``dense_chunk=1``), much faster.
``window``
    The press with ``n_sink=0``: the most recent C tokens only (window attention).
``sinks_noshift``
    The press with S sinks + C - S recent tokens, positions left absolute
    (``position_shift=False``).
``sinks``
    StreamingLLM: S sinks + C - S recent tokens, positions within the cache.
``recompute``
    Sliding window with re-computation (the paper's oracle-like baseline): for every
    scored token, the most recent tokens are re-encoded from scratch, with no cache, at
    positions 0, 1, ... The window holds the token itself plus the C tokens before it
    (C + 1 tokens), exactly the span a query attends to under the press (C stored
    entries + itself), so the two differ only in how those states were computed. No
    sinks: the ceiling for ``window``.
``recompute_sinks``
    Re-computation that keeps the sinks: for every scored token i, one forward from
    scratch (no cache reuse) over the first S tokens of the text followed by the C - S
    tokens before i and token i itself (C + 1 tokens, at positions 0..C), which is
    exactly what token i attends to under the press with S sinks (the sinks, the C - S
    newest stored entries, itself). The true quality ceiling for a sink cache of C
    entries, hence the reference for ``sinks`` and ``sinks_noshift``. Not in the
    default set (:data:`METHODS`); in :data:`ALL_METHODS`.

Re-computation costs one forward of C + 1 tokens per scored token. ``stride=k`` scores
only every k-th token (``i % k == 0``) with it; the streaming methods still have to feed
every token, and score them all since it costs nothing, but :func:`compare_methods`
reports every method on the tokens that *all* methods scored, so the comparison is fair.

Example
-------
>>> from kvpress_lite_harness.perplexity import compare_methods
>>> out = compare_methods(model, ids, ["dense", "sinks", "recompute"],
...                       n_sink=4, capacity=256, stride=4)   # doctest: +SKIP
>>> out["summary"]["sinks"]["ppl"]                             # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import logging
import math
import sys
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from kvpress_lite.cache_access import model_cache_kwarg as cache_kwarg
from kvpress_lite.cache_access import output_cache

from .methods import VOCABULARY

logger = logging.getLogger(__name__)

METHODS = ("dense", "window", "sinks_noshift", "sinks", "recompute")
EXTRA_METHODS = ("recompute_sinks",)
ALL_METHODS = METHODS + EXTRA_METHODS

DESCRIPTIONS = {m: VOCABULARY[m] for m in ALL_METHODS}


# --------------------------------------------------------------------------- helpers


def _layer_lengths(cache: Any) -> list[int]:
    """Entries actually held by each layer of a cache (read off the key tensors)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [int(layer.keys.shape[-2]) if getattr(layer, "keys", None) is not None else 0 for layer in layers]
    return [int(k.shape[-2]) for k, _ in cache]  # legacy tuple cache


def _takes(model: torch.nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _as_ids(input_ids: Any) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.ndim == 2:
        if ids.shape[0] != 1:
            raise ValueError(f"one sequence at a time: input_ids has shape {tuple(ids.shape)}")
        ids = ids[0]
    if ids.ndim != 1 or ids.numel() < 2:
        raise ValueError(f"need a 1-D sequence of at least 2 tokens, got shape {tuple(ids.shape)}")
    return ids


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position NLL. logits [n, vocab], targets [n] -> [n] (float64)."""
    return F.cross_entropy(logits.float(), targets, reduction="none").double()


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, disable=not enabled, mininterval=2.0,
                smoothing=0.05, position=_WORKER.get("position"), leave=_WORKER.get("position") is None)


def ppl_of(nll: Sequence[Optional[float]] | torch.Tensor, mask: Optional[torch.Tensor] = None) -> float:
    """exp(mean NLL) over the scored (non-NaN, in ``mask``) positions; NaN when there are none."""
    x = torch.as_tensor([math.nan if v is None else v for v in nll], dtype=torch.float64) if not torch.is_tensor(nll) else nll.double()
    keep = ~torch.isnan(x)
    if mask is not None:
        keep &= mask
    if not keep.any():
        return math.nan
    return math.exp(x[keep].mean().item())


def range_table(nll: torch.Tensor, chunk: int, mask: Optional[torch.Tensor] = None,
                extra_ranges: Iterable[tuple[int, int]] = ()) -> list[dict]:
    """Perplexity per range of prediction index ``[start, end)``: every ``chunk`` positions, then ``extra_ranges``."""
    n = nll.numel()
    bounds = [(s, min(s + chunk, n)) for s in range(0, n, chunk)] if chunk else []
    bounds += [(int(s), min(int(e), n)) for s, e in extra_ranges if int(s) < n]
    rows = []
    for start, end in bounds:
        keep = ~torch.isnan(nll[start:end])
        if mask is not None:
            keep &= mask[start:end]
        rows.append({"start": start, "end": end, "count": int(keep.sum()),
                     "ppl": ppl_of(nll[start:end], keep)})
    return rows


def tokenize_prefix(tokenizer: Any, text: str, n_tokens: int, bos: bool = False) -> torch.Tensor:
    """The first ``n_tokens`` tokens of ``text`` (tokenising only as much of it as needed).

    ``bos=True``: the sequence starts with the tokenizer's BOS token (prepended when the
    tokenizer does not add it itself, never doubled), as models trained with a BOS at the
    start of every text (Gemma) expect. ``bos=False`` leaves the tokenizer's output as it is.
    """
    bos_id = getattr(tokenizer, "bos_token_id", None) if bos else None
    if bos and bos_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has no BOS token to start the text with")
    chars = max(4096, n_tokens * 8)
    while True:
        ids = list(tokenizer(text[:chars]).input_ids)
        if bos and (not ids or ids[0] != bos_id):
            ids.insert(0, bos_id)
        if len(ids) > n_tokens or chars >= len(text):
            break
        chars *= 2
    if len(ids) < n_tokens:
        raise ValueError(f"the text has only {len(ids)} tokens, fewer than the {n_tokens} asked for")
    return torch.tensor(ids[:n_tokens], dtype=torch.long)


# --------------------------------------------------------------------------- methods


def _dense(model, ids, *, chunk: int, progress: bool) -> tuple[torch.Tensor, dict]:
    T = ids.numel()
    nll = torch.full((T - 1,), math.nan, dtype=torch.float64)
    kw = cache_kwarg(model)
    cache = None
    bar = _progress(T - 1, "dense", progress)
    with bar:
        for start in range(0, T - 1, chunk):
            end = min(start + chunk, T - 1)  # feed tokens [start, end), score tokens [start+1, end+1)
            out = model(input_ids=ids[None, start:end], **{kw: cache}, use_cache=True)
            cache = output_cache(out)
            nll[start:end] = _nll(out.logits[0], ids[start + 1 : end + 1])
            bar.update(end - start)
    return nll, {"max_cache_length": max(_layer_lengths(cache))}


def _press_stream(model, ids, *, n_sink: int, capacity: int, position_shift: bool, desc: str,
                  progress: bool) -> tuple[torch.Tensor, dict]:
    from kvpress_lite import apply_press

    T = ids.numel()
    nll = torch.full((T - 1,), math.nan, dtype=torch.float64)
    kw = cache_kwarg(model)
    max_len = 0
    press = apply_press(model, n_sink=n_sink, capacity=capacity, position_shift=position_shift)
    try:
        cache = None
        bar = _progress(T - 1, desc, progress)
        with bar:
            for i in range(T - 1):
                out = model(input_ids=ids[None, i : i + 1], **{kw: cache}, use_cache=True)
                cache = output_cache(out)
                nll[i] = _nll(out.logits[0, -1:], ids[i + 1 : i + 2])[0]
                max_len = max(max_len, max(_layer_lengths(cache)))
                bar.update(1)
        stats = press.stats
        info = {
            "max_cache_length": max_len,
            "layer_lengths": _layer_lengths(cache),
            "press_stats": {
                "compressions": int(stats.compressions),
                "evicted_tokens": int(stats.evicted_tokens),
                "cache_length": [int(x) for x in stats.cache_length],
            },
        }
    finally:
        press.remove()
    return nll, info


def _recompute(model, ids, *, n_sink: int, capacity: int, stride: int, batch_size: int,
               score_range: Optional[tuple[int, int]], progress: bool, desc: str) -> tuple[torch.Tensor, dict]:
    T = ids.numel()
    span = capacity + 1  # tokens re-encoded for each scored token: itself + `capacity` before it
    nll = torch.full((T - 1,), math.nan, dtype=torch.float64)
    lo, hi = score_range if score_range else (0, T - 1)
    scored = [i for i in range(0, T - 1, stride) if lo <= i < hi]
    keep_last = {"logits_to_keep": 1} if _takes(model, "logits_to_keep") else {}
    bar = _progress(len(scored), desc, progress)
    with bar:
        # While the prefix fits the window, the window *is* the prefix (positions 0..i):
        # one causal forward over it gives every such token exactly.
        head = [i for i in scored if i < span]
        if head:
            n = head[-1] + 1
            idx = torch.tensor(head)
            if keep_last:  # logits of the scored rows only (the vocabulary projection is costly: Gemma has 262k)
                logits = model(input_ids=ids[None, :n], use_cache=False, logits_to_keep=idx).logits[0]
            else:
                logits = model(input_ids=ids[None, :n], use_cache=False).logits[0, idx]
            nll[idx] = _nll(logits, ids[idx + 1])
            bar.update(len(head))
        tail = [i for i in scored if i >= span]
        for b in range(0, len(tail), batch_size):
            batch = tail[b : b + batch_size]
            if n_sink:
                windows = [torch.cat([ids[:n_sink], ids[i - span + n_sink + 1 : i + 1]]) for i in batch]
            else:
                windows = [ids[i - span + 1 : i + 1] for i in batch]
            out = model(input_ids=torch.stack(windows), use_cache=False, **keep_last)
            idx = torch.tensor(batch)
            nll[idx] = _nll(out.logits[:, -1], ids[idx + 1])
            bar.update(len(batch))
    return nll, {"max_cache_length": 0, "window_tokens": span}


def streaming_perplexity(
    model: torch.nn.Module,
    input_ids: Any,
    method: str,
    n_sink: int = 4,
    capacity: int = 256,
    chunk_report: int = 1024,
    progress: bool = True,
    *,
    stride: int = 1,
    dense_chunk: int = 512,
    batch_size: int = 4,
    ranges: Iterable[tuple[int, int]] = (),
    score_range: Optional[tuple[int, int]] = None,
) -> dict:
    """Perplexity of ``model`` on ``input_ids`` under one method, token by token.

    Parameters
    ----------
    model
        A causal LM (eval mode). Runs under ``torch.no_grad()``.
    input_ids
        One sequence: ``[T]`` or ``[1, T]``.
    method
        One of :data:`ALL_METHODS` (see the module docstring).
    n_sink, capacity
        The press budget: ``n_sink`` sinks + ``capacity - n_sink`` recent tokens stored.
        ``window`` uses ``n_sink=0`` with the same capacity.
    chunk_report
        Report perplexity per range of this many predictions.
    progress
        A tqdm bar on stderr.
    stride
        Score every ``stride``-th prediction (``i % stride == 0``) with ``recompute*``;
        other methods score every prediction.
    dense_chunk
        Tokens per call for ``dense`` (1 = literally one at a time; same numbers).
    batch_size
        Windows per forward for ``recompute*``.
    ranges
        Extra ``(start, end)`` prediction ranges to report, e.g. ``[(10000, 12000)]``.
    score_range
        ``(start, end)``: ``recompute*`` scores only predictions in this range (with
        ``stride``), e.g. the end of a long stream; other methods are unaffected.

    Returns
    -------
    dict
        ``method``, ``description``, ``tokens`` (T), ``n_sink`` and ``capacity`` as used,
        ``stride``, ``scored`` (count), ``ppl``, ``ranges`` (list of ``{start, end, count,
        ppl}``), ``nll`` (list of T - 1 floats, ``None`` where not scored), ``seconds``,
        ``ms_per_call`` (per scored token for recompute, per fed token otherwise),
        ``max_cache_length`` (most entries any layer held: after any step for the press,
        where it is bounded by ``capacity``; after the run for dense) and, for press
        methods, ``layer_lengths`` (entries each layer holds at the end, read off the
        cache) and ``press_stats``.
    """
    if method not in ALL_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(ALL_METHODS)}")
    if stride < 1:
        raise ValueError("stride must be >= 1")
    if capacity <= n_sink:
        raise ValueError(f"capacity ({capacity}) must exceed n_sink ({n_sink})")
    ids = _as_ids(input_ids)
    T = ids.numel()
    sinks = {"window": 0, "recompute": 0}.get(method, n_sink) if method != "dense" else None
    start = time.perf_counter()
    with torch.no_grad():
        if method == "dense":
            nll, info = _dense(model, ids, chunk=max(1, dense_chunk), progress=progress)
            calls = T - 1
        elif method.startswith("recompute"):
            nll, info = _recompute(model, ids, n_sink=sinks, capacity=capacity, stride=stride,
                                   batch_size=max(1, batch_size), score_range=score_range,
                                   progress=progress, desc=method)
            calls = int((~torch.isnan(nll)).sum())
        else:
            nll, info = _press_stream(model, ids, n_sink=sinks, capacity=capacity,
                                      position_shift=(method != "sinks_noshift"), desc=method,
                                      progress=progress)
            calls = T - 1
    seconds = time.perf_counter() - start
    result = {
        "method": method,
        "description": DESCRIPTIONS[method],
        "tokens": T,
        "n_sink": sinks,
        "capacity": None if method == "dense" else capacity,
        "stride": stride if method.startswith("recompute") else 1,
        "score_range": list(score_range) if score_range and method.startswith("recompute") else None,
        "scored": int((~torch.isnan(nll)).sum()),
        "ppl": ppl_of(nll),
        "ranges": range_table(nll, chunk_report, extra_ranges=ranges),
        "seconds": round(seconds, 2),
        "ms_per_call": round(1000 * seconds / max(1, calls), 2),
        **info,
        "nll": [None if math.isnan(v) else round(v, 6) for v in nll.tolist()],
    }
    logger.info("%s: ppl %.3f over %d tokens in %.1f s", method, result["ppl"], result["scored"], seconds)
    return result


def _check_methods(methods: Sequence[str]) -> list[str]:
    methods = list(dict.fromkeys(methods))
    for m in methods:
        if m not in ALL_METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(ALL_METHODS)}")
    if not methods:
        raise ValueError("no method given")
    return methods


def compare_methods(
    model: torch.nn.Module | str,
    input_ids: Any,
    methods: Sequence[str] = METHODS,
    n_sink: int = 4,
    capacity: int = 256,
    chunk_report: int = 1024,
    progress: bool = True,
    *,
    stride: int = 1,
    dense_chunk: int = 512,
    batch_size: int = 4,
    ranges: Iterable[tuple[int, int]] = (),
    score_range: Optional[tuple[int, int]] = None,
    done: Optional[dict[str, dict]] = None,
    on_result: Optional[Callable[[str, dict], None]] = None,
    jobs: int = 1,
    threads_per_job: int = 1,
    attn_implementation: Optional[str] = None,
) -> dict:
    """Run several methods on the same tokens and summarise them on a common footing.

    Returns ``{"results": {method: streaming_perplexity(...)}, "summary": {method: {...}},
    "scored_by_all": int, ...}`` (see :func:`summarize`).

    ``done``: results of methods already measured with the same settings (e.g. read back
    from a checkpoint); they are not run again. ``on_result(method, result)`` is called
    as each method finishes, e.g. to write a checkpoint, so a long run that gets stopped
    keeps what it finished.

    ``jobs > 1`` spreads the methods over that many worker processes (``threads_per_job``
    torch threads each): one-token decoding of a small model on CPU is bound by memory
    bandwidth, so a second process streaming another method runs almost as fast as the
    first. Each worker loads the model itself with
    :func:`~kvpress_lite_harness.embedded.load_model`, so ``model`` is then a name or a
    path, not a model object. Same results as one process, to float rounding.
    """
    methods = _check_methods(methods)
    ranges = [tuple(r) for r in ranges]
    ids = _as_ids(input_ids)
    kwargs = dict(n_sink=n_sink, capacity=capacity, chunk_report=chunk_report, progress=progress, stride=stride,
                  dense_chunk=dense_chunk, batch_size=batch_size, ranges=ranges, score_range=score_range)
    done = dict(done or {})
    todo = [m for m in methods if m not in done]
    if jobs > 1 and todo:
        if isinstance(model, torch.nn.Module):
            raise ValueError("jobs > 1: pass the model's name or path (each worker process loads it), not the model")
        _in_workers(model, ids.tolist(), todo, kwargs, jobs, threads_per_job, attn_implementation, done, on_result)
    for m in todo if jobs <= 1 else ():
        done[m] = streaming_perplexity(model, ids, m, **kwargs)
        if on_result is not None:
            on_result(m, done[m])
    return summarize({m: done[m] for m in methods}, n_sink=n_sink, capacity=capacity, stride=stride,
                     chunk_report=chunk_report, ranges=ranges, score_range=score_range)


def summarize(results: dict[str, dict], *, n_sink: int, capacity: int, stride: int = 1, chunk_report: int = 1024,
              ranges: Iterable[tuple[int, int]] = (), score_range: Optional[tuple[int, int]] = None) -> dict:
    """Put results of :func:`streaming_perplexity` (same tokens) side by side.

    Every summary entry (``ppl``, ``ranges``) is computed over the predictions that
    **all** methods scored (with a ``recompute*`` method and ``stride`` > 1: every
    ``stride``-th, within ``score_range``); ``ppl_own`` is over the method's own scored
    predictions.
    """
    methods = list(results)
    ranges = list(ranges)
    tokens = {r["tokens"] for r in results.values()}
    if len(tokens) != 1:
        raise ValueError(f"results cover different token counts: {sorted(tokens)}")
    T = tokens.pop()
    nlls = {m: torch.tensor([math.nan if v is None else v for v in r["nll"]], dtype=torch.float64)
            for m, r in results.items()}
    common = torch.ones(T - 1, dtype=torch.bool)
    for x in nlls.values():
        common &= ~torch.isnan(x)
    summary = {
        m: {
            "ppl": ppl_of(nlls[m], common),
            "ppl_own": results[m]["ppl"],
            "ranges": range_table(nlls[m], chunk_report, common, ranges),
            "seconds": results[m]["seconds"],
            "ms_per_call": results[m]["ms_per_call"],
            "max_cache_length": results[m]["max_cache_length"],
        }
        for m in methods
    }
    return {
        "tokens": T,
        "n_sink": n_sink,
        "capacity": capacity,
        "stride": stride,
        "score_range": list(score_range) if score_range else None,
        "chunk_report": chunk_report,
        "extra_ranges": [list(r) for r in ranges],
        "scored_by_all": int(common.sum()),
        "methods": methods,
        "summary": summary,
        "results": results,
    }


# --------------------------------------------------------------------- several processes

# Rough single-thread cost per token, used only to hand out the slowest methods first.
_COST = {"recompute": 4.0, "recompute_sinks": 4.0, "window": 1.0, "sinks_noshift": 1.0, "sinks": 1.0, "dense": 0.2}
_WORKER: dict = {}  # per worker process: the loaded model and the progress-bar row


def _init_worker(slots: Any, threads: int, log_level: int) -> None:
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s [worker]: %(message)s")
    torch.set_num_threads(threads)
    _WORKER["position"] = slots.get()


def _run_in_worker(model_spec: Any, attn: Optional[str], ids: list[int], method: str, kwargs: dict) -> dict:
    from .embedded import load_model

    if _WORKER.get("spec") != (model_spec, attn):
        model, _ = load_model(model_spec, with_tokenizer=False)
        if attn:
            model.set_attn_implementation(attn)
        _WORKER.update(spec=(model_spec, attn), model=model)
    return streaming_perplexity(_WORKER["model"], torch.tensor(ids), method, **kwargs)


def _in_workers(spec: str, ids: list[int], todo: list[str], kwargs: dict, jobs: int, threads: int,
                attn: Optional[str], done: dict, on_result: Optional[Callable[[str, dict], None]]) -> None:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = mp.get_context("spawn")  # fork after torch has started threads can hang
    slots = ctx.Queue()
    jobs = min(jobs, len(todo))
    for k in range(jobs):
        slots.put(k)
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                             initargs=(slots, threads, logging.getLogger().getEffectiveLevel())) as pool:
        futures = {pool.submit(_run_in_worker, spec, attn, ids, m, kwargs): m
                   for m in sorted(todo, key=lambda m: -_COST.get(m, 1.0))}
        for future in as_completed(futures):
            m = futures[future]
            done[m] = future.result()
            if on_result is not None:
                on_result(m, done[m])
