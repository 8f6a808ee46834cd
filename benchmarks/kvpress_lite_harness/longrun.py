"""A long stream on real weights (``kvpress-lite longrun``): the paper's claim, measured.

The compiled :class:`kvpress_lite.StreamingCache` (``torch.compile(model.forward)``, one
graph) reads ``tokens`` consecutive tokens of a text one per call; the logits of call
``i`` score token ``i + 1``. Reported per ``block`` tokens (4,096 by default): the
perplexity of the block, the tokens per second, the process's resident memory. Beside
it, the dense model (no press, a growing ``DynamicCache``, teacher-forced in chunks:
the same numbers as one token a call) over the same blocks up to ``dense_tokens``, past
the model's trained context, to show where dense breaks.

Per-token NLLs and memory samples are written to ``<out>/<name>.partial.json`` after
every block, so a run cut short still leaves its blocks on disk (``--resume`` is not
offered: a compiled stream cannot be restored mid-way without re-reading it).

>>> from kvpress_lite_harness.longrun import block_table
>>> import torch
>>> [row["tokens"] for row in block_table(torch.zeros(10, dtype=torch.float64), 4)]
[4, 4, 2]
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .measure import _read_status
from .report import fmt, human_bytes, machine_line, pyplot, save, table, write_json

logger = logging.getLogger(__name__)


def block_table(nll: torch.Tensor, block: int) -> list[dict]:
    """Perplexity of every ``block`` consecutive scored tokens (NaNs, the unscored, are left out)."""
    rows = []
    for start in range(0, nll.numel(), block):
        part = nll[start : start + block]
        part = part[~torch.isnan(part)]
        rows.append({"start": start, "tokens": int(part.numel()),
                     "ppl": math.exp(float(part.mean())) if part.numel() else math.nan})
    return rows


def _rss() -> int:
    return int(_read_status("VmRSS") or 0)


def head_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The causal LM's logits from its decoder's final hidden states ``[n, hidden]``: the output
    embedding, then the final soft-capping of the families that have one (Gemma 2)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def stream_compiled(model: torch.nn.Module, ids: torch.Tensor, *, n_sink: int, capacity: int, block: int,
                    on_block: Optional[Callable[[dict], None]] = None, compile: bool = True,
                    progress: bool = False, head_batch: int = 256) -> dict:
    """Score ``ids`` token by token through a (compiled) StreamingCache.

    ``head_batch > 1``: each call runs the decoder alone (compiled, one token, the same
    StreamingCache), and the output embedding scores the final hidden states ``head_batch`` at a
    time: the same logits as the causal LM's own call, but its vocabulary matrix (Gemma 3's
    262,144 x 640 floats, 0.67 GB, more than half of a step on a CPU) is read once per batch rather
    than once per token. ``head_batch=1``: the causal LM's forward, logits every call.

    Returns ``nll`` (float64 tensor, ``len(ids) - 1``), ``samples`` (one per block:
    tokens streamed, seconds, RSS bytes, cache bytes), ``recompiles`` after the first two
    steps and ``tokens_per_second`` over the whole stream after warm-up.
    """
    import kvpress_lite as kvl
    from torch._dynamo.utils import counters

    from kvpress_lite.cache_access import model_cache_kwarg

    kwarg = model_cache_kwarg(model)
    cache = kvl.StreamingCache(model, n_sink=n_sink, capacity=capacity)
    step = model.forward if head_batch <= 1 else model.get_decoder().forward
    forward = torch.compile(step) if compile else step
    T = ids.numel()
    nll = torch.full((T - 1,), math.nan, dtype=torch.float64)
    pending: list[torch.Tensor] = []  # final hidden states not scored yet (head_batch > 1)

    def score(upto: int) -> None:
        if pending:
            logits = head_logits(model, torch.cat(pending)).float()
            lo = upto - len(pending)
            nll[lo:upto] = F.cross_entropy(logits, ids[lo + 1 : upto + 1], reduction="none").double()
            pending.clear()

    samples: list[dict] = []
    graphs = None
    start = time.perf_counter()
    warm_start = start
    bar = _bar(T - 1, "compiled StreamingCache" if compile else "StreamingCache", progress)
    with torch.no_grad(), bar:
        for i in range(T - 1):
            bar.update(1)
            out = forward(input_ids=ids[None, i : i + 1], use_cache=True, **{kwarg: cache})
            if head_batch <= 1:
                nll[i] = F.cross_entropy(out.logits[0, -1:].float(), ids[i + 1 : i + 2]).double()
            else:
                pending.append(out.last_hidden_state[0, -1:].clone())
                if len(pending) == head_batch:
                    score(i + 1)
            if i == 1:  # compiled: from here on every step must reuse the graph
                graphs, warm_start = counters["stats"]["unique_graphs"], time.perf_counter()
            if (i + 1) % block == 0 or i == T - 2:
                score(i + 1)
                sample = {"tokens": i + 1, "seconds": round(time.perf_counter() - start, 2), "rss_bytes": _rss(),
                          "cache_bytes": sum(t.numel() * t.element_size() for t in _cache_tensors(cache))}
                samples.append(sample)
                part = nll[max(0, i + 1 - block) : i + 1]
                logger.info("streamed %d / %d tokens: block ppl %.2f, %.1f tok/s, RSS %s", i + 1, T - 1,
                            math.exp(float(part.mean())), (i + 1) / max(1e-9, sample["seconds"]),
                            human_bytes(sample["rss_bytes"]))
                if on_block:
                    on_block({"nll": nll, "samples": samples})
    elapsed = time.perf_counter() - warm_start
    return {"nll": nll, "samples": samples,
            "recompiles": (counters["stats"]["unique_graphs"] - graphs) if graphs is not None else 0,
            "tokens_per_second": (T - 3) / elapsed if T > 3 else math.nan}


def _bar(total: int, desc: str, enabled: bool):
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, disable=not enabled, mininterval=5.0)


def _cache_tensors(cache: Any) -> list[torch.Tensor]:
    out = []
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if torch.is_tensor(t):
                out.append(t)
    return out


def stream_dense(model: torch.nn.Module, ids: torch.Tensor, *, chunk: int, block: int, progress: bool = False) -> dict:
    """Dense teacher forcing over ``ids`` in chunks; NLL per token, memory sampled per block."""
    from transformers import DynamicCache

    from kvpress_lite.cache_access import model_cache_kwarg

    kwarg = model_cache_kwarg(model)
    T = ids.numel()
    nll = torch.full((T - 1,), math.nan, dtype=torch.float64)
    cache = DynamicCache(config=model.config)
    samples, start = [], time.perf_counter()
    chunk = math.gcd(chunk, block)  # chunks end on every block boundary, where memory is sampled
    bar = _bar(T - 1, "dense", progress)
    with torch.no_grad(), bar:
        for lo in range(0, T - 1, chunk):
            hi = min(lo + chunk, T - 1)
            bar.update(hi - lo)
            out = model(input_ids=ids[None, lo:hi], use_cache=True, **{kwarg: cache})
            nll[lo:hi] = F.cross_entropy(out.logits[0].float(), ids[lo + 1 : hi + 1], reduction="none").double()
            if hi % block == 0 or hi == T - 1:
                samples.append({"tokens": hi, "seconds": round(time.perf_counter() - start, 2), "rss_bytes": _rss(),
                                "cache_bytes": sum(t.numel() * t.element_size() for t in _cache_tensors(cache))})
                logger.info("dense: %d / %d tokens", hi, T - 1)
    return {"nll": nll, "samples": samples, "tokens_per_second": (T - 1) / (time.perf_counter() - start)}


def fresh_blocks(model: torch.nn.Module, ids: torch.Tensor, *, block: int, chunk: int = 512,
                 progress: bool = False) -> list[float]:
    """The text's own difficulty, block by block: the dense model over each ``block`` of ``ids`` read
    from a fresh cache (inside its trained context), perplexity of the block's next-token predictions.
    Beside the press's blocks it says how much of their spread is the text's."""
    from transformers import DynamicCache

    from kvpress_lite.cache_access import model_cache_kwarg

    kwarg, out = model_cache_kwarg(model), []
    starts = range(0, ids.numel() - 1, block)
    bar = _bar(len(starts), "fresh blocks", progress)
    with torch.no_grad(), bar:
        for start in starts:
            end = min(start + block, ids.numel() - 1)  # predictions of ids[start + 1 .. end]
            cache, total = DynamicCache(config=model.config), 0.0
            for lo in range(start, end, chunk):
                hi = min(lo + chunk, end)
                logits = model(input_ids=ids[None, lo:hi], use_cache=True, **{kwarg: cache}).logits[0].float()
                total += float(F.cross_entropy(logits, ids[lo + 1 : hi + 1], reduction="sum"))
            out.append(math.exp(total / max(1, end - start)))
            bar.update(1)
    return out


def add_fresh(summary: dict, fresh: list[float]) -> dict:
    """Put the fresh-block perplexities beside the press's blocks, with the spread of their ratio."""
    for row, ppl in zip(summary["blocks"], fresh):
        row["fresh_ppl"] = ppl
    ratios = [r["ppl"] / r["fresh_ppl"] for r in summary["blocks"][1:] if r.get("fresh_ppl")]
    if ratios:
        mid = statistics.median(ratios)
        summary.update(median_ratio_to_fresh=mid, worst_ratio_deviation=max(abs(x / mid - 1) for x in ratios),
                       ratios_within_10pct=sum(abs(x / mid - 1) <= 0.10 for x in ratios), ratios=len(ratios))
    return summary


def summarize(press: dict, dense: Optional[dict], *, block: int) -> dict:
    """Blocks side by side, the spread of the press's blocks around their median."""
    rows = block_table(press["nll"], block)
    dense_rows = block_table(dense["nll"], block) if dense else []
    for row, sample in zip(rows, press["samples"]):
        row.update(press_rss_bytes=sample["rss_bytes"], press_cache_bytes=sample["cache_bytes"])
    for row, drow, dsample in zip(rows, dense_rows, dense["samples"] if dense else []):
        if drow["tokens"] == row["tokens"]:  # dense covered the whole block
            row.update(dense_ppl=drow["ppl"], dense_cache_bytes=dsample["cache_bytes"])
    full = [r["ppl"] for r in rows if r["tokens"] == block]
    median = statistics.median(full[1:]) if len(full) > 1 else (full[0] if full else math.nan)
    later = full[1:]
    rss = [s["rss_bytes"] for s in press["samples"]]
    return {
        "blocks": rows,
        "median_block_ppl": median,
        "worst_block_deviation": max((abs(p / median - 1) for p in later), default=math.nan),
        "blocks_within_10pct": sum(abs(p / median - 1) <= 0.10 for p in later),
        "blocks_after_first": len(later),
        "rss_growth_bytes": (max(rss[1:]) - rss[1]) if len(rss) > 2 else 0,
        "tokens_per_second": press["tokens_per_second"],
        "dense_tokens_per_second": dense["tokens_per_second"] if dense else None,
        "recompiles": press["recompiles"],
    }


def run_longrun(model: torch.nn.Module, ids: torch.Tensor, *, n_sink: int = 4, capacity: int = 1024,
                block: int = 4096, dense_tokens: int = 16384, dense_chunk: int = 512, compile: bool = True,
                partial: Optional[Path] = None, metadata: Optional[dict] = None, progress: bool = False,
                head_batch: int = 256, fresh: bool = False) -> dict:
    """The press over all of ``ids``, dense over its first ``dense_tokens``; JSON-ready results."""
    torch.manual_seed(0)
    dense = None
    if dense_tokens:
        dense = stream_dense(model, ids[: dense_tokens + 1], chunk=dense_chunk, block=block, progress=progress)
    meta = dict(metadata or {}, n_sink=n_sink, capacity=capacity, block=block, tokens=ids.numel() - 1,
                dense_tokens=dense_tokens, compiled=compile, head_batch=head_batch)

    def checkpoint(state: dict) -> None:
        if partial is not None:
            write_json({"metadata": meta, "press_nll": state["nll"].tolist(), "samples": state["samples"]}, partial)

    press = stream_compiled(model, ids, n_sink=n_sink, capacity=capacity, block=block, on_block=checkpoint,
                            compile=compile, progress=progress, head_batch=head_batch)
    summary = summarize(press, dense, block=block)
    if fresh:
        add_fresh(summary, fresh_blocks(model, ids, block=block, chunk=dense_chunk, progress=progress))
    result = {"metadata": meta, "summary": summary,
              "press_samples": press["samples"], "dense_samples": dense["samples"] if dense else []}
    if partial is not None:
        Path(partial).unlink(missing_ok=True)
    return result


def markdown(results: dict) -> str:
    meta, s = results["metadata"], results["summary"]
    lines = [f"# {meta.get('model', 'model')}: {meta['tokens']:,} tokens of {meta.get('text', 'text')}, "
             f"compiled StreamingCache ({meta['n_sink']} sinks + {meta['capacity'] - meta['n_sink']} recent)", ""]
    if meta.get("command"):
        lines.append(f"- command: `{meta['command']}`")
    if meta.get("machine"):
        lines.append(f"- machine: {machine_line(meta)}")
    lines += [f"- {s['tokens_per_second']:.1f} tokens/s over the whole stream (one token per compiled call), "
              f"{s['recompiles']} recompiles after warm-up",
              f"- median block perplexity (blocks after the first): {fmt(s['median_block_ppl'])}; "
              f"{s['blocks_within_10pct']} of {s['blocks_after_first']} within 10% of it, worst "
              f"{100 * s['worst_block_deviation']:.1f}% away",
              f"- process memory growth from block 2 to the end: {human_bytes(s['rss_growth_bytes'])}"]
    if s.get("ratios"):
        lines.append(f"- the text's own difficulty (dense over each block from a fresh cache): the press's block "
                     f"perplexity is a median {s['median_ratio_to_fresh']:.3f}x of it; {s['ratios_within_10pct']} of "
                     f"{s['ratios']} blocks within 10% of that ratio, worst {100 * s['worst_ratio_deviation']:.1f}% away")
    lines.append("")
    fresh = any("fresh_ppl" in r for r in s["blocks"])
    rows = [[f"{r['start']:,}-{r['start'] + r['tokens']:,}", fmt(r["ppl"]), fmt(r.get("dense_ppl"))]
            + ([fmt(r.get("fresh_ppl"))] if fresh else [])
            + [human_bytes(r.get("press_rss_bytes")), human_bytes(r.get("press_cache_bytes")),
               human_bytes(r.get("dense_cache_bytes"))] for r in s["blocks"]]
    lines += table(["tokens", "press ppl", "dense ppl"] + (["fresh-block ppl"] if fresh else [])
                   + ["press RSS", "press KV", "dense KV"], rows)
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Perplexity per block (press and dense) and memory against tokens streamed."""
    meta, s = results["metadata"], results["summary"]
    fig, (ax, ax_mem) = pyplot().subplots(1, 2, figsize=(12, 4))
    mid = [(r["start"] + r["tokens"] / 2) / 1000 for r in s["blocks"]]
    ax.plot(mid, [r["ppl"] for r in s["blocks"]], "o-", label="compiled StreamingCache")
    dense = [(m, r["dense_ppl"]) for m, r in zip(mid, s["blocks"]) if r.get("dense_ppl") is not None]
    if dense:
        ax.plot(*zip(*dense), "s--", color="tab:red", label="dense")
    fresh = [(m, r["fresh_ppl"]) for m, r in zip(mid, s["blocks"]) if r.get("fresh_ppl") is not None]
    if fresh:
        ax.plot(*zip(*fresh), "^:", color="tab:green", label="dense, each block from a fresh cache")
    ax.axhline(s["median_block_ppl"], color="grey", lw=0.8)
    ax.axhspan(0.9 * s["median_block_ppl"], 1.1 * s["median_block_ppl"], color="grey", alpha=0.12,
               label="median block ±10%")
    top = 3 * s["median_block_ppl"]
    ax.set(xlabel="thousand tokens streamed", ylabel=f"perplexity per {meta['block']:,}-token block",
           ylim=(0, top), title=f"{meta.get('model', '')}: {meta.get('text', '')}")
    ax.legend(fontsize=8)
    ps = results["press_samples"]
    ax_mem.plot([x["tokens"] / 1000 for x in ps], [x["rss_bytes"] / 2**20 for x in ps], "o-",
                label="process RSS, press")
    ds = results["dense_samples"]
    if ds:
        base = ps[0]["rss_bytes"] / 2**20 if ps else 0
        ax_mem.plot([x["tokens"] / 1000 for x in ds], [base + x["cache_bytes"] / 2**20 for x in ds], "s--",
                    color="tab:red", label="dense: press RSS at block 1 + dense KV")
    ax_mem.set(xlabel="thousand tokens streamed", ylabel="MiB", title="memory", ylim=(0, None))
    ax_mem.legend(fontsize=8)
    for a in (ax, ax_mem):
        a.grid(True, alpha=0.3)
    save(fig, path)
