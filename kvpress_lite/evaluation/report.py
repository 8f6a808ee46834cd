"""Write the results of :func:`~kvpress_lite.evaluation.perplexity.compare_methods`.

Three files: a JSON with everything (settings, versions, machine, per-token NLLs), a
markdown table (rows = methods, columns = overall perplexity and perplexity per token
range) and a PNG plot of perplexity against tokens (log scale), one line per method.

Example
-------
>>> meta = run_metadata(model_name="SmolLM2-135M-Instruct", text="war_and_peace")  # doctest: +SKIP
>>> write_json(comparison, "results/perplexity/ppl.json", meta)                       # doctest: +SKIP
>>> write_markdown(comparison, "results/perplexity/ppl.md", meta)                     # doctest: +SKIP
>>> write_plot(comparison, "results/perplexity/ppl.png", meta)                        # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger(__name__)


def _version(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001 - not installed
        return None


def machine_description() -> dict:
    """CPU, cores, memory, OS, Python and torch threads of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "os": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def run_metadata(model_name: str, text: str, **extra: Any) -> dict:
    """Settings and environment to store next to the numbers."""
    return {
        "model": model_name,
        "text": text,
        "versions": {
            "kvpress_lite": _version("kvpress-lite"),
            "torch": _version("torch"),
            "transformers": _version("transformers"),
        },
        "machine": machine_description(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        **extra,
    }


def _clean(x: Any) -> Any:
    """NaN/inf are not JSON: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(comparison: dict, path: str | os.PathLike, metadata: Optional[dict] = None) -> Path:
    """Everything: ``{"metadata": ..., **comparison}`` (per-token NLLs included)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean({"metadata": metadata or {}, **comparison}), indent=1))
    logger.info("wrote %s", path)
    return path


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.2f}"


def _subset(comparison: dict) -> str:
    """' (every 4th, in 10,000-12,000)' when recompute scored a subset, else ''."""
    parts = []
    if comparison.get("stride", 1) > 1 and any(m.startswith("recompute") for m in comparison["methods"]):
        parts.append(f"every {comparison['stride']}th")
    if comparison.get("score_range") and any(m.startswith("recompute") for m in comparison["methods"]):
        parts.append("in {:,}-{:,}".format(*comparison["score_range"]))
    return f" ({', '.join(parts)})" if parts else ""


def _range_label(r: dict) -> str:
    return f"{r['start']:,}-{r['end']:,}"


def markdown_table(comparison: dict, metadata: Optional[dict] = None) -> str:
    """Rows = methods; columns = overall perplexity, perplexity per range, time."""
    meta = metadata or {}
    methods = comparison["methods"]
    summary = comparison["summary"]
    first = summary[methods[0]]["ranges"]
    header = ["method", "budget", "ppl"] + [_range_label(r) for r in first] + ["s", "ms/call"]
    lines = []
    if meta:
        lines.append(f"Model: {meta.get('model')}; text: {meta.get('text')}; "
                     f"{comparison['tokens']:,} tokens; cache {comparison['n_sink']}+"
                     f"{comparison['capacity'] - comparison['n_sink']} (n_sink={comparison['n_sink']}, "
                     f"capacity={comparison['capacity']}).")
        m = meta.get("machine", {})
        v = meta.get("versions", {})
        lines.append(f"Machine: {m.get('cpu')}, {m.get('cores')} cores, torch {v.get('torch')}, "
                     f"transformers {v.get('transformers')}, kvpress-lite {v.get('kvpress_lite')}.")
    lines.append(f"Perplexity over the {comparison['scored_by_all']:,} predictions every method scored"
                 + _subset(comparison)
                 + "; columns a-b: predictions a to b-1 (prediction i scores token i+1).")
    lines.append("")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|")
    for m in methods:
        s = summary[m]
        r = comparison["results"][m]
        if m == "dense":
            budget = "all"
        elif r.get("n_sink") is not None:
            budget = f"{r['n_sink']}+{comparison['capacity'] - r['n_sink']}"
        else:
            budget = str(comparison["capacity"])
        cells = [m, budget, _fmt(s["ppl"])] + [_fmt(x["ppl"]) for x in s["ranges"]]
        cells += [f"{s['seconds']:.0f}", f"{s['ms_per_call']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(comparison: dict, path: str | os.PathLike, metadata: Optional[dict] = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown_table(comparison, metadata))
    logger.info("wrote %s", path)
    return path


def _common_mask(comparison: dict) -> list[bool]:
    n = comparison["tokens"] - 1
    keep = [True] * n
    for r in comparison["results"].values():
        for i, v in enumerate(r["nll"]):
            if v is None:
                keep[i] = False
    return keep


def write_plot(comparison: dict, path: str | os.PathLike, metadata: Optional[dict] = None) -> Path:
    """Two panels, log-scale perplexity: running (cumulative) and per range, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keep = _common_mask(comparison)
    chunk = comparison.get("chunk_report") or 0
    fig, (ax_run, ax_rng) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in comparison["methods"]:
        nll = comparison["results"][m]["nll"]
        xs, ys, total, count = [], [], 0.0, 0
        for i, v in enumerate(nll):
            if keep[i]:
                total += v
                count += 1
                xs.append(i + 1)
                ys.append(math.exp(total / count))
        ax_run.plot(xs, ys, label=m, linewidth=1.2)
        rows = [r for r in comparison["summary"][m]["ranges"] if chunk and r["end"] - r["start"] <= chunk]
        rows = [r for r in rows if r["ppl"] is not None and math.isfinite(r["ppl"])]
        if rows:
            ax_rng.plot([(r["start"] + r["end"]) / 2 for r in rows], [r["ppl"] for r in rows], marker="o", label=m)
    budget = f"cache {comparison['n_sink']}+{comparison['capacity'] - comparison['n_sink']}"
    title = f"{(metadata or {}).get('model', '')} on {(metadata or {}).get('text', '')}, {budget}".strip()
    ax_run.set(xscale="linear", yscale="log", xlabel="tokens", ylabel="running perplexity", title=title)
    ax_rng.set(yscale="log", xlabel="tokens", ylabel=f"perplexity per {chunk} tokens",
               title="per range" + _subset(comparison))
    for ax in (ax_run, ax_rng):
        ax.axvline(comparison["capacity"], color="grey", linestyle=":", linewidth=1)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    logger.info("wrote %s", path)
    return path
