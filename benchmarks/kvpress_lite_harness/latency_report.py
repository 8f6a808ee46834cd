"""Markdown and figures of a latency run (:func:`~kvpress_lite_harness.latency.run_benchmark`),
written through :mod:`.report`, and the ratios that sum it up.

The ratios are measured values with what they compare; judging them against a target is
left to the reader (the README states the project's).

>>> fmt_ms(12.3456)
'12.35'
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Optional

from .report import fmt as fmt_ms
from .report import fx as _fx
from .report import human_bytes, machine_line, pyplot, save

METHOD_ORDER = ("dense", "dense_at_capacity", "sliding_cache", "window", "sinks", "sinks_noshift", "recompute",
                "recompute_sinks", "kvpress")


def _cells(model: dict, method: str) -> dict:
    return {c["length"]: c for c in model.get("results", []) if c["method"] == method}


def _lat(cell: Optional[dict]) -> Optional[float]:
    return None if not cell or cell.get("error") else cell.get("latency_ms")


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _entry(name: str, model: str, value: Optional[float], detail: str) -> dict:
    return {"ratio": name, "model": model, "value": value, "detail": detail}


def ratios(results: dict) -> list[dict]:
    """What the press buys and costs on each model, as measured ratios with how each was measured."""
    out = []
    capacity = results.get("metadata", {}).get("config", {}).get("capacity")
    for model in results.get("models", []):
        if model.get("skipped"):
            continue
        press, dense = _cells(model, "sinks"), _cells(model, "dense")
        if press:
            out += _press_ratios(model, press, dense, sorted(press), capacity)
        rvp = model.get("recompute_vs_press") or {}
        cells = rvp.get("cells") or {}
        p, r = _lat(cells.get("sinks")), _lat(cells.get("recompute_sinks"))
        if rvp:
            out.append(_entry(
                "re-computation / press", model["name"], _ratio(r, p),
                f"per-token latency at capacity {rvp.get('capacity')}, stream of {rvp.get('length')} tokens: "
                f"{fmt_ms(r)} ms vs {fmt_ms(p)} ms" + (f" ({rvp['error']})" if rvp.get("error") else ""),
            ))
    peer = results.get("peer") or {}
    for model in peer.get("models", []):
        ours, theirs = _cells(model, "sinks"), _cells(model, "kvpress")
        for L in sorted(theirs):
            t, o = theirs[L], ours.get(L, {})
            out.append(_entry(
                "kvpress / press", model["name"], _ratio(_lat(t), _lat(o)),
                f"per-token latency at stream {L}, transformers {peer.get('versions', {}).get('transformers')}: "
                f"{fmt_ms(_lat(t))} vs {fmt_ms(_lat(o))} ms; peak memory {human_bytes(t.get('peak_memory_bytes'))} vs "
                f"{human_bytes(o.get('peak_memory_bytes'))}; KV {human_bytes(t.get('kv_bytes'))} vs "
                f"{human_bytes(o.get('kv_bytes'))}" + (f"; kvpress error: {t['error']}" if t.get("error") else "")
                + (f"; kvpress-lite error: {o['error']}" if o.get("error") else ""),
            ))
    return out


def _press_ratios(model: dict, press: dict, dense: dict, lengths: list, capacity) -> list[dict]:
    """Cost against stream length, overhead at equal KV, and memory of the press on one model."""
    out = []
    name = model["name"]
    lo, hi = lengths[0], lengths[-1]
    # flat cost: primary value from the side-by-side phase (both lengths in the same rounds)
    across = _ratio(_lat(press.get(hi)), _lat(press.get(lo)))
    noshift = _ratio(_lat(_cells(model, "sinks_noshift").get(hi)), _lat(_cells(model, "sinks_noshift").get(lo)))
    dense_across = _ratio(_lat(dense.get(hi)), _lat(dense.get(lo)))
    side = (model.get("flat_cost_side_by_side") or {}).get("cells") or {}
    p_lo, p_hi = _lat(side.get(f"sinks@{lo}")), _lat(side.get(f"sinks@{hi}"))
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
        out.append(_entry(f"press at {hi} / at {lo} tokens", name, value,
                               detail + (f" (dense at {hi}: {dense_note})" if dense_note else "")))

    # overhead at equal KV length: pooled over all lengths, both measured side by side
    ref = _cells(model, "dense_at_capacity")
    p_all = [s for c in press.values() if not c.get("error") for s in c["latency_ms_samples"]]
    d_all = [s for c in ref.values() if not c.get("error") for s in c["latency_ms_samples"]]
    per_length = {L: _ratio(_lat(press.get(L)), _lat(ref.get(L))) for L in lengths}
    value = _ratio(statistics.median(p_all), statistics.median(d_all)) if p_all and d_all else None
    out.append(_entry(
        "press / dense at equal KV", name, value,
        f"press step at capacity {capacity} / dense step at KV length {capacity}, medians of all "
        f"{len(p_all)} and {len(d_all)} interleaved steps; per length: "
        + ", ".join(f"{L}: {_fx(r)}" for L, r in per_length.items()),
    ))

    # constant memory
    full = [press[L] for L in lengths if L >= (capacity or 0) and not press[L].get("error")]
    kv = [c["kv_bytes"] for c in full if c.get("kv_bytes") is not None]
    if len(kv) > 1:
        out.append(_entry(
            "press KV bytes, most / fewest", name, max(kv) / min(kv) if min(kv) else None,
            f"press KV bytes at {', '.join(str(c['length']) for c in full)} tokens: "
            + ", ".join(human_bytes(b) for b in kv),
        ))
    ref_len = 1024 if 1024 in press else lo
    peak_hi, peak_ref = (press.get(hi) or {}).get("peak_memory_bytes"), (press.get(ref_len) or {}).get("peak_memory_bytes")
    dense_peak = _ratio((dense.get(hi) or {}).get("peak_memory_bytes"), (dense.get(ref_len) or {}).get("peak_memory_bytes"))
    if ref_len == hi:
        return out
    out.append(_entry(
        f"press peak memory at {hi} / at {ref_len} tokens", name, _ratio(peak_hi, peak_ref),
        f"press peak process memory at {hi} / at {ref_len} tokens ({human_bytes(peak_hi)} / {human_bytes(peak_ref)}); "
        f"dense: {_fx(dense_peak)}",
    ))
    return out


def _note(cell: Optional[dict]) -> Optional[str]:
    if not cell:
        return None
    return cell.get("error") or cell.get("note")


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


def markdown(results: dict) -> str:
    """A self-contained markdown report: machine, command, ratios, tables, how each number was obtained."""
    meta = results.get("metadata", {})
    m, cfg = meta.get("machine", {}), meta.get("config", {})
    out = ["# kvpress-lite latency and memory", ""]
    out.append(f"- command: `{meta.get('command') or '(library call)'}`")
    out.append(f"- machine: {machine_line(meta)}; load average at start {_loads(m.get('load_average'))}, at end "
               f"{_loads(m.get('load_average_end'))}")
    out.append(
        f"- run: device {cfg.get('device')}, {cfg.get('dtype')}, attention {cfg.get('attn')}, capacity "
        f"{cfg.get('capacity')} (n_sink {cfg.get('n_sink')}), lengths {cfg.get('lengths')}, "
        f"{cfg.get('repeats')} timed steps per method and length ({cfg.get('recompute_repeats')} for re-computation); "
        f"took {meta.get('seconds')} s"
    )
    out.append(f"- timing: {meta.get('timing')}")
    out.append(f"- memory: {meta.get('memory_probe')}; KV bytes = keys + values of every layer of the cache object")
    out += ["", "## Ratios", "", "| ratio | model | measured | how |", "| --- | --- | ---: | --- |"]
    out += [f"| {r['ratio']} | {r['model']} | {_fx(r['value'])} | {r['detail']} |" for r in results.get("ratios", [])]
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
                    f"{fmt_ms(_lat(c.get('sinks')))} ms, re-computation {fmt_ms(_lat(c.get('recompute_sinks')))} ms per token."]
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


def _plot(results: dict, path: Path, kind: str, key: str, ylabel: str):
    """One panel per model, one line per method, against stream length (False: nothing to draw)."""
    import matplotlib.ticker

    models = [m for m in results.get("models", []) if not m.get("skipped") and m.get("results")]
    if not models:
        return False
    cfg = results.get("metadata", {}).get("config", {})
    fig, axes = pyplot().subplots(1, len(models), figsize=(4.6 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        for method in _method_names(model):
            cells = sorted(_cells(model, method).values(), key=lambda c: c["length"])
            pts = [(c["length"], c[key]) for c in cells if not c.get("error") and c.get(key) is not None]
            if pts:
                xs, ys = zip(*pts)
                ys = [y / 2**20 for y in ys] if key == "peak_memory_bytes" else ys
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
        ax.set(title=model["name"], xlabel="stream length (tokens)", ylabel=ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"kvpress-lite: {kind} vs stream length (capacity {cfg.get('capacity')}, "
                 f"{cfg.get('device')}, {cfg.get('dtype')})", fontsize=10)
    save(fig, path)


FIGURES = {
    "latency": lambda results, path: _plot(results, path, "latency", "latency_ms", "ms per token (median)"),
    "memory": lambda results, path: _plot(results, path, "memory", "peak_memory_bytes", "peak memory during a step (MiB)"),
}
