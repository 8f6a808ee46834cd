"""The one reporter of the harness: every run writes JSON, markdown and PNG files the same way.

A run's results are a JSON-ready dict with a ``metadata`` entry (:func:`run_metadata`: when,
the command, the machine, the library versions, and the run's own settings); each kind of
run renders its markdown and figures from that dict alone, so ``--from-json`` re-renders
an earlier run without measuring.

>>> fmt(1.23456), fmt(None), human_bytes(1536)
('1.23', '-', '1.5 KiB')
>>> table(["method", "ms"], [["dense", "1.00"]])
['| method | ms |', '|---|---:|', '| dense | 1.00 |']
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from .measure import library_versions, machine_info

logger = logging.getLogger(__name__)


def command_line(subcommand: Optional[str] = None) -> str:
    """The ``kvpress-lite ...`` command this process runs, with ``subcommand`` first when given
    (argv lacks it when the subcommand's module is run directly)."""
    argv = sys.argv[1:]
    if subcommand and argv[:1] != [subcommand]:
        argv = [subcommand, *argv]
    return "kvpress-lite " + " ".join(shlex.quote(a) for a in argv)


def run_metadata(device: str = "cpu", command: Optional[str] = None, **settings: Any) -> dict:
    """Where and how the numbers came from, stored next to them."""
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command or command_line(),
        "machine": machine_info(device),
        "versions": library_versions(),
        **settings,
    }


def machine_line(metadata: dict) -> str:
    """``"AMD EPYC 7B13, 2 logical CPUs, 1 torch thread(s), 23.5 GiB RAM; torch 2.13.0, transformers 5.24.0, ..."``"""
    m, v = metadata.get("machine", {}), metadata.get("versions", {})
    cpus = m.get("logical_cpus", m.get("cores"))  # 'cores': files written before the harness was one
    threads = metadata.get("torch_threads", m.get("torch_threads"))  # a run's own setting first (its workers')
    where = f"{m.get('cpu')}, {cpus} logical CPUs, {threads} torch thread(s)"
    if m.get("memory_bytes"):
        where += f", {human_bytes(m['memory_bytes'])} RAM"
    if m.get("gpu"):
        where += f", GPU {m['gpu']}"
    return where + "; " + ", ".join(f"{k} {val}" for k, val in v.items() if val)


def clean(x: Any) -> Any:
    """NaN and infinities are not JSON: written as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


def write_json(results: dict, path: str | Path) -> Path:
    """Everything the run measured, indented; ``-`` writes to stdout."""
    text = json.dumps(clean(results), indent=1, default=str) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
        return Path("-")
    return write_text(text, path)


def write_text(text: str, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    logger.info("wrote %s", path)
    return path


def load_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def write_outputs(results: dict, markdown: Callable[[dict], str], figures: dict[str, Callable[[dict, Path], None]],
                  *, json_path: Optional[str] = None, md_path: Optional[str] = None,
                  plot_dir: Optional[str] = None) -> list[Path]:
    """Write the JSON, the markdown (``-``: stdout) and each figure (``name.png`` in ``plot_dir``)."""
    written = []
    if json_path:
        written.append(write_json(results, json_path))
    text = markdown(results)
    if md_path == "-":
        sys.stdout.write(text)
    elif md_path:
        written.append(write_text(text, md_path))
    if plot_dir:
        for name, draw in figures.items():
            path = Path(plot_dir) / f"{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            if draw(results, path) is not False:
                written.append(path)
    return [p for p in written if str(p) != "-"]


def pyplot():
    """matplotlib's pyplot on the file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    logger.info("wrote %s", path)


def table(header: list[str], rows: Iterable[list[str]], text_cols: int = 1) -> list[str]:
    """A markdown table: the first ``text_cols`` columns left-aligned, the rest right-aligned."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * text_cols + ["---:"] * (len(header) - text_cols)) + "|"]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def fmt(x: Optional[float], digits: int = 2) -> str:
    """A number for a table; ``-`` for one that was not measured."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}" if abs(x) < 100 else f"{x:.0f}"


def fx(x: Optional[float]) -> str:
    """A ratio: ``'1.05x'``."""
    return "-" if x is None else f"{x:.2f}x"


def human_bytes(n: Optional[float]) -> str:
    """``1536 -> '1.5 KiB'``; ``None -> '-'``."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
