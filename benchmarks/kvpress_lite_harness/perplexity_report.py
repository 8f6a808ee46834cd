"""Markdown and figure of a perplexity run (:func:`~kvpress_lite_harness.perplexity.compare_methods`
results with their ``metadata``), written through :mod:`.report`.

The markdown: rows = methods, columns = overall perplexity, its distance to the
re-computation ceilings and perplexity per token range. The figure: perplexity against
tokens (log scale), one line per method.

>>> text = markdown(results)                     # doctest: +SKIP
>>> plot(results, Path("results/perplexity/ppl.png"))  # doctest: +SKIP
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from .report import fmt, machine_line, pyplot, save, table

def _subset(comparison: dict) -> str:
    """' (every 4th, in 10,000-12,000)' when recompute scored a subset, else ''."""
    parts = []
    if comparison.get("stride", 1) > 1 and any(m.startswith("recompute") for m in comparison["methods"]):
        parts.append(f"every {_ordinal(comparison['stride'])} token")
    if comparison.get("score_range") and any(m.startswith("recompute") for m in comparison["methods"]):
        parts.append("in {:,}-{:,}".format(*comparison["score_range"]))
    return f" ({', '.join(parts)})" if parts else ""


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _relative(ppl: Optional[float], ceiling: float) -> str:
    """'+2.2%': how far a perplexity lies above re-computation's on the same predictions."""
    return "n/a" if ppl is None else f"{100 * (ppl / ceiling - 1):+.1f}%"


def _range_label(r: dict) -> str:
    return f"{r['start']:,}-{r['end']:,}"


def _budget(comparison: dict, method: str) -> str:
    r = comparison["results"][method]
    if method == "dense":
        return "all"
    if r.get("n_sink") is not None:
        return f"{r['n_sink']}+{comparison['capacity'] - r['n_sink']}"
    return str(comparison["capacity"])


# Re-computation methods, the quality ceilings a method is measured against ("vs" columns):
# recompute for a cache of C recent entries (window), recompute_sinks for S sinks + C - S
# recent entries (sinks, sinks_noshift).
CEILINGS = ("recompute", "recompute_sinks")


def markdown(comparison: dict) -> str:
    """Rows = methods; columns = overall perplexity, its distance to each re-computation
    method that ran (``vs recompute``, ``vs recompute_sinks``: the quality ceilings for
    the cache size, without and with sinks), perplexity per range, time.

    The first table compares every method on the predictions that all of them scored
    (ranges where none was scored are left out). When some method scored a subset
    (``recompute`` with a stride or a score range), a second table gives each method
    on everything it scored.
    """
    meta = comparison.get("metadata") or {}
    methods = comparison["methods"]
    summary = comparison["summary"]
    results = comparison["results"]
    lines = []
    if meta:
        bos = " (starting with the BOS token)" if meta.get("bos") else ""
        lines.append(f"Model: {meta.get('model')}; text: {meta.get('text')}{bos}; "
                     f"{comparison['tokens']:,} tokens; cache {comparison['n_sink']}+"
                     f"{comparison['capacity'] - comparison['n_sink']} (n_sink={comparison['n_sink']}, "
                     f"capacity={comparison['capacity']}).")
        wall = f"; wall time {meta['wall_seconds'] / 60:.1f} min" if meta.get("wall_seconds") else ""
        jobs = f"; {meta['jobs']} worker processes" if (meta.get("jobs") or 1) > 1 else ""
        lines.append(f"Machine: {machine_line(meta)}{jobs}{wall}.")
    lines.append(f"Perplexity over the {comparison['scored_by_all']:,} predictions every method scored"
                 + _subset(comparison)
                 + "; column a-b: predictions a to b-1 (prediction i scores token i+1); "
                 "s: seconds for the method; ms/call: per model call (per scored token for recompute).")
    lines.append("")
    shared = [k for k, r in enumerate(summary[methods[0]]["ranges"]) if r["count"] > 0]
    ceilings = {m: summary[m]["ppl"] for m in CEILINGS if m in methods and summary[m]["ppl"]}
    header = (["method", "budget", "ppl"] + [f"vs {m}" for m in ceilings]
              + [_range_label(summary[methods[0]]["ranges"][k]) for k in shared] + ["s", "ms/call"])
    rows = []
    for m in methods:
        s = summary[m]
        rows.append([m, _budget(comparison, m), fmt(s["ppl"])] + [_relative(s["ppl"], c) for c in ceilings.values()]
                    + [fmt(s["ranges"][k]["ppl"]) for k in shared]
                    + [f"{s['seconds']:.0f}", f"{s['ms_per_call']:.1f}"])
    lines += table(header, rows, 2)
    if any(results[m]["scored"] != comparison["scored_by_all"] for m in methods):
        lines += ["", "Each method on every prediction it scored:", ""]
        own = results[methods[0]]["ranges"]
        header = ["method", "scored", "ppl"] + [_range_label(r) for r in own]
        rows = [[m, f"{results[m]['scored']:,}", fmt(results[m]["ppl"])] + [fmt(r["ppl"]) for r in results[m]["ranges"]]
                for m in methods]
        lines += table(header, rows, 1)
    return "\n".join(lines) + "\n"


def _common_mask(comparison: dict) -> list[bool]:
    n = comparison["tokens"] - 1
    keep = [True] * n
    for r in comparison["results"].values():
        for i, v in enumerate(r["nll"]):
            if v is None:
                keep[i] = False
    return keep


_MIN_POINTS = 32  # a perplexity over fewer scored predictions is noise: not drawn


def _moving_ppl(nll: list, window: int) -> tuple[list[int], list[float]]:
    """Perplexity over the scored predictions among the last ``window`` positions, at each
    scored position where that window holds at least ``_MIN_POINTS`` of them."""
    xs, ys = [], []
    total, count, left = 0.0, 0, 0
    for i, v in enumerate(nll):
        if v is None:
            continue
        total += v
        count += 1
        while left <= i - window:
            if nll[left] is not None:
                total -= nll[left]
                count -= 1
            left += 1
        if count >= min(_MIN_POINTS, window):
            xs.append(i + 1)
            ys.append(math.exp(total / count))
    return xs, ys


def plot(comparison: dict, path: Path) -> None:
    """Log-scale perplexity against tokens, one line per method, in two panels.

    Left: perplexity over the last ``chunk_report`` tokens (a moving window over each
    method's scored tokens; over the tokens every method scored when ``recompute`` used
    a stride, since a sparse sample and a full one can differ a lot locally). Right:
    running (cumulative) perplexity over the tokens every method scored.
    """
    plt = pyplot()
    keep = _common_mask(comparison)
    window = comparison.get("chunk_report") or 1024
    fig, (ax_mov, ax_run) = plt.subplots(1, 2, figsize=(13, 4.8))
    strided = comparison.get("stride", 1) > 1 and any(m.startswith("recompute") for m in comparison["methods"])
    for m in comparison["methods"]:
        nll = comparison["results"][m]["nll"]
        local = [v if keep[i] else None for i, v in enumerate(nll)] if strided else nll
        xs, ys = _moving_ppl(local, window)
        ax_mov.plot(xs, ys, label=m, linewidth=1.1)
        xs, ys, total, count = [], [], 0.0, 0
        for i, v in enumerate(nll):
            if keep[i]:
                total += v
                count += 1
                if count >= _MIN_POINTS:
                    xs.append(i + 1)
                    ys.append(math.exp(total / count))
        ax_run.plot(xs, ys, label=m, linewidth=1.1)
    meta = comparison.get("metadata") or {}
    budget = f"cache {comparison['n_sink']}+{comparison['capacity'] - comparison['n_sink']}"
    fig.suptitle(f"{meta.get('model', '')} on {meta.get('text', '')}: {budget}, {comparison['tokens']:,} tokens")
    ax_mov.set(yscale="log", xlabel="tokens", ylabel=f"perplexity over the last {window} tokens",
               title="local perplexity" + (_subset(comparison) if strided else ""))
    ax_run.set(yscale="log", xlabel="tokens", ylabel="running perplexity",
               title="running perplexity on shared tokens" + _subset(comparison))
    for ax in (ax_mov, ax_run):
        ax.axvline(comparison["capacity"], color="grey", linestyle=":", linewidth=1)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    if comparison.get("score_range"):
        ax_run.set_xlim(*comparison["score_range"])
    save(fig, path)
