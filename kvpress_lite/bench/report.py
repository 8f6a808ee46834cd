"""Targets, markdown tables and plots from a results dict (see :mod:`.runner`).

Targets are measured ratios with a pass/fail mark; nothing here asserts anything.

>>> fmt_ms(12.3456)
'12.35'
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Optional

from .shapes import human_bytes

# thresholds from the issue
FLAT_COST_MAX = 1.10
OVERHEAD_MAX = 1.10
PEAK_MEMORY_MAX = 1.05
RECOMPUTE_MIN = 20.0

METHOD_ORDER = ("dense", "dense_at_capacity", "window", "press", "press_noshift", "recompute", "kvpress")


def _cells(model: dict, method: str) -> dict:
    return {c["length"]: c for c in model.get("results", []) if c["method"] == method}


def _lat(cell: Optional[dict]) -> Optional[float]:
    return None if not cell or cell.get("error") else cell.get("latency_ms")


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _target(name: str, model: str, value: Optional[float], op: str, threshold: Optional[float], detail: str) -> dict:
    if value is None or threshold is None:
        passed = None
    else:
        passed = value <= threshold if op == "<=" else value >= threshold
    return {"target": name, "model": model, "value": value, "op": op, "threshold": threshold, "pass": passed,
            "detail": detail}


def compute_targets(results: dict) -> list[dict]:
    """The issue's targets per model, as measured ratios with pass/fail (``pass`` None: not measurable)."""
    targets = []
    cfg = results.get("config", {})
    capacity = cfg.get("capacity")
    for model in results.get("models", []):
        if model.get("skipped"):
            continue
        name = model["name"]
        press, dense = _cells(model, "press"), _cells(model, "dense")
        lengths = sorted(press)
        if lengths:
            targets += _press_targets(model, press, dense, lengths, capacity)

        # vs re-computation
        rvp = model.get("recompute_vs_press") or {}
        cells = rvp.get("cells") or {}
        p, r = _lat(cells.get("press")), _lat(cells.get("recompute"))
        if rvp:
            targets.append(_target(
                "vs re-computation", name, _ratio(r, p), ">=", RECOMPUTE_MIN,
                f"re-computation / press per-token latency at capacity {rvp.get('capacity')}, stream of "
                f"{rvp.get('length')} tokens: {fmt_ms(r)} ms vs {fmt_ms(p)} ms"
                + (f" ({rvp['error']})" if rvp.get("error") else ""),
            ))

    peer = results.get("peer") or {}
    for model in peer.get("models", []):
        ours, theirs = _cells(model, "press"), _cells(model, "kvpress")
        for L in sorted(theirs):
            t, o = theirs[L], ours.get(L, {})
            targets.append(_target(
                "peer (kvpress)", model["name"], _ratio(_lat(t), _lat(o)), "info", None,
                f"kvpress / kvpress-lite per-token latency at stream {L}, transformers "
                f"{peer.get('versions', {}).get('transformers')}: {fmt_ms(_lat(t))} vs {fmt_ms(_lat(o))} ms; "
                f"peak memory {human_bytes(t.get('peak_memory_bytes'))} vs {human_bytes(o.get('peak_memory_bytes'))}; "
                f"KV {human_bytes(t.get('kv_bytes'))} vs {human_bytes(o.get('kv_bytes'))}"
                + (f"; kvpress error: {t['error']}" if t.get("error") else "")
                + (f"; kvpress-lite error: {o['error']}" if o.get("error") else ""),
            ))
    return targets


def _press_targets(model: dict, press: dict, dense: dict, lengths: list, capacity) -> list[dict]:
    """Flat cost, overhead and constant memory of the press on one model."""
    targets = []
    name = model["name"]
    lo, hi = lengths[0], lengths[-1]
    # flat cost: primary value from the side-by-side phase (both lengths in the same rounds)
    across = _ratio(_lat(press.get(hi)), _lat(press.get(lo)))
    noshift = _ratio(_lat(_cells(model, "press_noshift").get(hi)), _lat(_cells(model, "press_noshift").get(lo)))
    dense_across = _ratio(_lat(dense.get(hi)), _lat(dense.get(lo)))
    side = (model.get("flat_cost_side_by_side") or {}).get("cells") or {}
    p_lo, p_hi = _lat(side.get(f"press@{lo}")), _lat(side.get(f"press@{hi}"))
    d_lo, d_hi = _lat(side.get(f"dense@{lo}")), _lat(side.get(f"dense@{hi}"))
    dense_note = _note(dense.get(hi))
    if p_lo and p_hi:
        value = p_hi / p_lo
        detail = (f"press per-token latency at {hi} / at {lo} tokens (capacity {capacity}), both streams timed in the "
                  f"same interleaved rounds: {fmt_ms(p_hi)} / {fmt_ms(p_lo)} ms; dense beside it: {_fx(_ratio(d_hi, d_lo))}. "
                  f"From the per-length table (lengths timed minutes apart): press {_fx(across)}, without position "
                  f"shift {_fx(noshift)}, dense {_fx(dense_across)}")
    else:
        value = across
        detail = (f"press per-token latency at {hi} / at {lo} tokens (capacity {capacity}), from the per-length table; "
                  f"without position shift {_fx(noshift)}, dense {_fx(dense_across)}")
    if lo != hi:  # one length compares nothing
        targets.append(_target("flat cost", name, value, "<=", FLAT_COST_MAX,
                               detail + (f" (dense at {hi}: {dense_note})" if dense_note else "")))

    # overhead at equal KV length: pooled over all lengths, both measured side by side
    ref = _cells(model, "dense_at_capacity")
    p_all = [s for c in press.values() if not c.get("error") for s in c["latency_ms_samples"]]
    d_all = [s for c in ref.values() if not c.get("error") for s in c["latency_ms_samples"]]
    per_length = {L: _ratio(_lat(press.get(L)), _lat(ref.get(L))) for L in lengths}
    value = _ratio(statistics.median(p_all), statistics.median(d_all)) if p_all and d_all else None
    targets.append(_target(
        "overhead", name, value, "<=", OVERHEAD_MAX,
        f"press step at capacity {capacity} / dense step at KV length {capacity}, medians of all "
        f"{len(p_all)} and {len(d_all)} interleaved steps; per length: "
        + ", ".join(f"{L}: {_fx(r)}" for L, r in per_length.items()),
    ))

    # constant memory
    full = [press[L] for L in lengths if L >= (capacity or 0) and not press[L].get("error")]
    kv = [c["kv_bytes"] for c in full if c.get("kv_bytes") is not None]
    if len(kv) > 1:
        targets.append(_target(
            "constant KV bytes", name, max(kv) / min(kv) if min(kv) else None, "<=", 1.0,
            f"press KV bytes at {', '.join(str(c['length']) for c in full)} tokens: "
            + ", ".join(human_bytes(b) for b in kv),
        ))
    ref_len = 1024 if 1024 in press else lo
    peak_hi, peak_ref = (press.get(hi) or {}).get("peak_memory_bytes"), (press.get(ref_len) or {}).get("peak_memory_bytes")
    dense_peak = _ratio((dense.get(hi) or {}).get("peak_memory_bytes"), (dense.get(ref_len) or {}).get("peak_memory_bytes"))
    if ref_len == hi:
        return targets
    targets.append(_target(
        "constant peak memory", name, _ratio(peak_hi, peak_ref), "<=", PEAK_MEMORY_MAX,
        f"press peak process memory at {hi} / at {ref_len} tokens ({human_bytes(peak_hi)} / {human_bytes(peak_ref)}); "
        f"dense: {_fx(dense_peak)}",
    ))
    return targets


def _note(cell: Optional[dict]) -> Optional[str]:
    if not cell:
        return None
    return cell.get("error") or cell.get("note")


def _fx(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def fmt_ms(x: Optional[float]) -> str:
    return "-" if x is None else (f"{x:.2f}" if x < 100 else f"{x:.0f}")


def _mark(passed: Optional[bool]) -> str:
    return {True: "PASS", False: "FAIL", None: "n/a"}[passed]


def _method_names(model: dict) -> list[str]:
    present = {c["method"] for c in model.get("results", [])}
    return [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))


def _latency_table(model: dict) -> list[str]:
    lengths = sorted({c["length"] for c in model["results"]})
    lines = ["| method | " + " | ".join(f"{L}" for L in lengths) + " |",
             "| --- | " + " | ".join("---:" for _ in lengths) + " |"]
    footnotes = []
    for method in _method_names(model):
        cells = _cells(model, method)
        row = []
        for L in lengths:
            c = cells.get(L)
            if c is None:
                row.append("")
            elif c.get("error"):
                footnotes.append(f"{method} at {L}: {c['error']}")
                row.append(f"error[{len(footnotes)}]")
            else:
                text = f"{fmt_ms(c['latency_ms'])} ms ({c['tokens_per_s']:.1f}/s)" if c.get("latency_ms") else "-"
                if c.get("note"):
                    footnotes.append(f"{method} at {L}: {c['note']}")
                    text += f" [{len(footnotes)}]"
                row.append(text)
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return lines + [""] + [f"[{i}] {text}" for i, text in enumerate(footnotes, 1)]


def _memory_table(model: dict) -> list[str]:
    lengths = sorted({c["length"] for c in model["results"]})
    lines = ["| method | " + " | ".join(f"{L}" for L in lengths) + " |",
             "| --- | " + " | ".join("---:" for _ in lengths) + " |"]
    for method in _method_names(model):
        cells = _cells(model, method)
        row = []
        for L in lengths:
            c = cells.get(L)
            if c is None or c.get("error") or c.get("peak_memory_bytes") is None:
                row.append("-" if c is None or not c.get("error") else "error")
            else:
                row.append(f"{human_bytes(c['peak_memory_bytes'])} / KV {human_bytes(c['kv_bytes'])} ({c['kv_length']})")
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return lines


def to_markdown(results: dict) -> str:
    """A self-contained markdown report: machine, command, targets, tables, how each number was obtained."""
    m, v, cfg = results.get("machine", {}), results.get("versions", {}), results.get("config", {})
    out = ["# kvpress-lite benchmark", ""]
    out.append(f"- command: `{results.get('command') or '(library call)'}`")
    out.append(
        f"- machine: {m.get('cpu')}, {m.get('logical_cpus')} logical CPUs, torch threads {m.get('torch_threads')}, "
        f"{human_bytes(m.get('memory_bytes'))} RAM" + (f", GPU {m['gpu']}" if m.get("gpu") else "")
        + f"; load average at start {_loads(m.get('load_average'))}, at end {_loads(m.get('load_average_end'))}"
    )
    out.append("- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val))
    out.append(
        f"- run: device {cfg.get('device')}, {cfg.get('dtype')}, attention {cfg.get('attn')}, capacity "
        f"{cfg.get('capacity')} (n_sink {cfg.get('n_sink')}), lengths {cfg.get('lengths')}, "
        f"{cfg.get('repeats')} timed steps per method and length ({cfg.get('recompute_repeats')} for re-computation); "
        f"took {results.get('seconds')} s"
    )
    out.append(f"- timing: {results.get('timing')}")
    out.append(f"- memory: {results.get('memory_probe')}; KV bytes = keys + values of every layer of the cache object")
    out += ["", "## Targets", "", "| target | model | measured | threshold | result | detail |",
            "| --- | --- | ---: | ---: | --- | --- |"]
    for t in results.get("targets", []):
        threshold = "" if t["threshold"] is None else f"{t['op']} {t['threshold']:g}"
        mark = "info" if t["op"] == "info" else _mark(t["pass"])
        out.append(f"| {t['target']} | {t['model']} | {_fx(t['value'])} | {threshold} | {mark} | {t['detail']} |")
    for model in results.get("models", []):
        out += ["", f"## {model['name']}", "", model.get("description", "")]
        if model.get("skipped"):
            out += ["", f"**Skipped**: {model['skipped']}"]
            continue
        shape = model.get("shape") or {}
        out.append(
            f"({shape.get('model_type')}, {shape.get('layers')} layers, {shape.get('heads')} heads / "
            f"{shape.get('kv_heads')} KV heads of {shape.get('head_dim')}, {shape.get('parameters', 0) / 1e6:.0f}M "
            f"parameters, {human_bytes(shape.get('weight_bytes'))} of weights, {shape.get('dtype')}; "
            f"measured in {model.get('seconds')} s)"
        )
        for note in model.get("notes", []):
            out.append(f"\n> {note}")
        out += ["", "Per-token decode latency, median (tokens per second), by stream length:", ""]
        out += _latency_table(model)
        out += ["", "Peak process memory during one decode step / KV-cache bytes (entries per layer):", ""]
        out += _memory_table(model)
        side = model.get("flat_cost_side_by_side")
        if side and side.get("cells"):
            c = side["cells"]
            out += ["", "Side by side (the flat-cost check): " + ", ".join(
                f"{k} {fmt_ms(_lat(v))} ms" for k, v in c.items()) + " per token, all timed in the same rounds."]
        rvp = model.get("recompute_vs_press")
        if rvp and rvp.get("cells"):
            c = rvp["cells"]
            out += ["", f"At capacity {rvp['capacity']} (stream of {rvp['length']} tokens): press "
                    f"{fmt_ms(_lat(c.get('press')))} ms, re-computation {fmt_ms(_lat(c.get('recompute')))} ms per token."]
        if model.get("prefill"):
            out += ["", "Streaming the press to the lengths above (prefill through the press, in chunks): " + "; ".join(
                f"{k}: {p['tokens']} tokens in {p['seconds']:.1f} s ({p['tokens_per_s']:.0f} tokens/s)"
                for k, p in model["prefill"].items() if p.get("tokens_per_s"))]
        out += ["", "How each method's numbers were obtained:", ""]
        for name, info in model.get("methods", {}).items():
            out.append(f"- **{name}** ({info['label']}): {info['how']}")
    out += ["", "## Peer: NVIDIA kvpress", ""]
    peer = results.get("peer") or {}
    if peer.get("skipped"):
        out.append(f"**Skipped**: {peer['skipped']}")
    else:
        pv = peer.get("versions", {})
        out.append(f"Run in a separate interpreter (`{peer.get('interpreter')}`): torch {pv.get('torch')}, transformers "
                   f"{pv.get('transformers')}, kvpress {pv.get('kvpress')}; all methods below side by side in that "
                   f"process. Command: `{peer.get('command')}`.")
        for model in peer.get("models", []):
            out += ["", f"### {model['name']}", ""]
            for note in model.get("notes", []):
                out.append(f"> {note}\n")
            out += _latency_table(model) + [""] + _memory_table(model)
            check = model.get("kept_positions_check")
            if check:
                out += ["", f"kvpress's kept entries after {check.get('steps')} decode steps (layer 0, head 0): "
                        + ", ".join(f"{k}={val}" for k, val in check.items() if k != "steps")]
            out += ["", "How:", ""] + [f"- **{n}** ({i['label']}): {i['how']}" for n, i in model.get("methods", {}).items()]
    return "\n".join(out) + "\n"


def _loads(x) -> str:
    return "-" if not x else "/".join(f"{v:.1f}" for v in x)


def write_json(results: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return path


def write_plots(results: dict, folder) -> list[Path]:
    """``latency.png`` and ``memory.png``: one panel per model, one line per method, against stream length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    models = [m for m in results.get("models", []) if not m.get("skipped") and m.get("results")]
    written = []
    if not models:
        return written
    cfg = results.get("config", {})
    for kind, key, ylabel in (("latency", "latency_ms", "ms per token (median)"),
                              ("memory", "peak_memory_bytes", "peak memory during a step (MiB)")):
        fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 3.8), squeeze=False)
        for ax, model in zip(axes[0], models):
            for method in _method_names(model):
                cells = sorted(_cells(model, method).values(), key=lambda c: c["length"])
                pts = [(c["length"], c[key]) for c in cells if not c.get("error") and c.get(key) is not None]
                if not pts:
                    continue
                xs, ys = zip(*pts)
                if key == "peak_memory_bytes":
                    ys = [y / 2**20 for y in ys]
                ax.plot(xs, ys, marker="o", label=method, linestyle="--" if method == "dense_at_capacity" else "-")
            ax.set_xscale("log", base=2)
            lengths = sorted({c["length"] for c in model["results"]})
            ax.set_xticks(lengths)
            ax.set_xticklabels([f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            if kind == "latency":
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
                ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_title(model["name"])
            ax.set_xlabel("stream length (tokens)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="best")
        fig.suptitle(f"kvpress-lite: {kind} vs stream length (capacity {cfg.get('capacity')}, "
                     f"{cfg.get('device')}, {cfg.get('dtype')})", fontsize=10)
        fig.tight_layout()
        path = folder / f"{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
