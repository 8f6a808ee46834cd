"""Clocks, memory probes, a description of the machine, and methods timed side by side.

Timing: ``time.perf_counter`` around one call, with ``torch.cuda.synchronize()`` before
and after on CUDA. Peak memory:

* CUDA: ``torch.cuda.reset_peak_memory_stats()`` then ``torch.cuda.max_memory_allocated()``
  (bytes held by tensors; the caching allocator's reserve is reported beside it).
* CPU: the process's resident-set high-water mark (``VmHWM`` in ``/proc/self/status``),
  reset before each measurement by writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0)
  after ``gc.collect()`` and glibc's ``malloc_trim(0)``, so freed memory is not counted.
  Where that file cannot be written the probe falls back to ``ru_maxrss``, which never
  decreases; results say which probe was used.

>>> probe = PeakMemory("cpu")
>>> probe.reset(); _ = bytearray(1 << 20); probe.read() > 0
True
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import platform
import resource
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import torch

logger = logging.getLogger(__name__)


def synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    """Seconds one call of ``fn`` takes, the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory over a stretch of work: ``reset()``, do the work, ``read()`` (bytes)."""

    def __init__(self, device: str) -> None:
        self.device = str(device)
        if self.device.startswith("cuda"):
            self.method = "torch.cuda.max_memory_allocated (reset_peak_memory_stats before each measurement)"
        elif self._can_reset_hwm():
            self.method = "process VmHWM (peak RSS), reset through /proc/self/clear_refs before each measurement"
        else:
            self.method = "ru_maxrss (process peak RSS since start: never decreases, so later lengths include earlier peaks)"

    @staticmethod
    def _can_reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return _read_status("VmHWM") is not None
        except OSError:
            return False

    def reset(self) -> None:
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return
        _malloc_trim()
        if self.method.startswith("process VmHWM"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def read(self) -> int:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        if self.method.startswith("process VmHWM"):
            return int(_read_status("VmHWM"))
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def current(self) -> int:
        """Memory in use now (CUDA: allocated by tensors; CPU: resident set)."""
        if self.device.startswith("cuda"):
            return int(torch.cuda.memory_allocated())
        rss = _read_status("VmRSS")
        return int(rss) if rss is not None else 0


def _read_status(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict:
    """Where the numbers came from: CPU, cores, memory, threads, GPU, load."""
    info = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        import psutil

        info["physical_cpus"] = psutil.cpu_count(logical=False)
        info["memory_bytes"] = psutil.virtual_memory().total
    except ImportError:
        pass
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    if str(device).startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_bytes"] = props.total_memory
        info["cuda"] = torch.version.cuda
    return info


def library_versions() -> dict:
    """Installed versions of the libraries that shape the numbers (``None`` when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"torch": torch.__version__}
    for dist in ("transformers", "kvpress-lite", "kvpress", "numpy"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = None
    return versions


def cache_tensors(cache) -> list:
    """The key/value tensors a transformers cache holds (layers with ``keys``/``values``)."""
    cache = getattr(cache, "self_attention_cache", cache)
    tensors = []
    for layer in getattr(cache, "layers", []) or []:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                tensors.append(t)
    return tensors


def kv_bytes(cache) -> int:
    """Bytes of the keys and values a cache holds, every layer (logical size: numel * itemsize)."""
    return int(sum(t.numel() * t.element_size() for t in cache_tensors(cache)))


def kv_length(cache) -> int:
    """Entries per layer in layer 0 of a cache (0 when empty)."""
    tensors = cache_tensors(cache)
    return int(tensors[0].shape[-2]) if tensors and tensors[0].dim() >= 2 else 0


# -- one stream length, every method side by side (used by the latency runs and the kvpress peer)
def _median(xs: Sequence[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


def _cell(method, length: int) -> dict:
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


def error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return text[:300]


def measure_length(
    methods: Sequence,
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
            cell["error"] = error_text(exc)
        m.release()
    gc.collect()

    # timing phase: side by side, order rotated every round
    timing = []
    for m in survivors:
        try:
            m.prepare(length)
            timing.append(m)
        except Exception as exc:  # noqa: BLE001
            cells[m.name]["error"] = "prepare: " + error_text(exc)
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
                cell["error"] = error_text(exc)
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
