"""One stream length, every method side by side: a memory phase (one method at a time) and an
interleaved timing phase. Shared by the benchmark runner and the kvpress peer (so neither
imports the other)."""

from __future__ import annotations

import gc
import logging
import statistics
from typing import Callable, Optional, Sequence

from .measure import PeakMemory, timed
from .methods import Method

logger = logging.getLogger(__name__)


def _median(xs: Sequence[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


def _cell(method: Method, length: int) -> dict:
    return {
        "method": method.name,
        "length": length,
        "latency_ms": None,
        "latency_ms_samples": [],
        "tokens_per_s": None,
        "peak_memory_bytes": None,
        "kv_bytes": None,
        "kv_length": None,
        "stream_position": None,
        "note": None,
        "error": None,
    }


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return text[:300]


def measure_length(
    methods: Sequence[Method],
    length: int,
    repeats: dict,
    device: str,
    probe: Optional[PeakMemory],
    status: Callable[[str], None] = lambda s: None,
) -> dict:
    """Memory phase then interleaved timing phase for every method at one stream length.

    ``repeats`` maps method name to the number of timed steps. Returns ``{name: cell}``.
    Errors are caught per method and written into its cell.
    """
    cells = {m.name: _cell(m, length) for m in methods}
    # memory phase: one method at a time
    survivors = []
    for m in methods:
        status(f"L={length} memory {m.name}")
        cell = cells[m.name]
        if probe is None and not m.warmup:
            survivors.append(m)
            continue
        try:
            m.prepare(length)  # a press stream advances here (untimed): every token runs through the model
            if probe is not None:
                probe.reset()
            seconds = timed(m.step, device)
            if probe is not None:
                cell["peak_memory_bytes"] = probe.read()
            cell["kv_bytes"], cell["kv_length"] = m.kv_bytes(), m.kv_length()
            cell["warmup_ms"] = seconds * 1e3
            m.after_step()
            cell["note"] = m.note
            survivors.append(m)
        except Exception as exc:  # noqa: BLE001
            logger.debug("step failed", exc_info=True)
            cell["error"] = _error_text(exc)
        m.release()
    gc.collect()

    # timing phase: side by side, order rotated every round
    timing = []
    for m in survivors:
        try:
            m.prepare(length)
            timing.append(m)
        except Exception as exc:  # noqa: BLE001
            cells[m.name]["error"] = "prepare: " + _error_text(exc)
    rounds = max((repeats.get(m.name, 1) for m in timing), default=0)
    for r in range(rounds):
        status(f"L={length} timing round {r + 1}/{rounds}")
        order = timing[r % len(timing):] + timing[: r % len(timing)] if timing else []
        for m in order:
            cell = cells[m.name]
            if cell["error"] or len(cell["latency_ms_samples"]) >= repeats.get(m.name, 1):
                continue
            try:
                seconds = timed(m.step, device)
                m.after_step()
            except Exception as exc:  # noqa: BLE001
                logger.debug("step failed", exc_info=True)
                cell["error"] = _error_text(exc)
                continue
            cell["latency_ms_samples"].append(round(seconds * 1e3, 4))
    for m in timing:
        cell = cells[m.name]
        cell["stream_position"] = m.stream_position()
        m.release()
    for cell in cells.values():
        cell["latency_ms"] = _median(cell["latency_ms_samples"])
        if cell["latency_ms"]:
            cell["tokens_per_s"] = 1e3 / cell["latency_ms"]
    return cells
