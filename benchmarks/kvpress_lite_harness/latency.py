"""The end-to-end benchmark: every method on every model, at every stream length.

For one model and one stream length the runner does

1. a **memory phase**: one method at a time, it brings the method to that length
   (``prepare``: the press streams for real, dense and sliding caches are filled, see
   :mod:`.methods`), resets the peak-memory probe, decodes one token and reads the peak and
   the KV bytes; nothing else of size is alive but the press streams (``capacity`` entries
   each). The step doubles as warm-up;
2. a **timing phase**: all methods rebuilt side by side, then ``repeats`` rounds in which
   each method decodes one token, in an order rotated every round (A B C, B C A, ...), so
   slow drifts of a shared machine hit every method alike. Per-token latency is the median.

Then, per model, two more side-by-side phases: the press at the shortest and the longest
length (a fresh stream for the short one) with dense at both, for the flat-cost target; and
the press against re-computation (keeping the sinks) at ``recompute_capacity``.

Method names are those of :data:`.methods.VOCABULARY`.

>>> cfg = BenchConfig.from_preset("tiny", lengths=[64], methods=["dense"])  # doctest: +SKIP
>>> results = run_benchmark(cfg)                                            # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import models as shapes
from .measure import PeakMemory, error_text, measure_length
from .methods import Dense, Method, ModelContext, Pinned, Press, Recompute, SlidingCache
from .report import run_metadata

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: one method vocabulary (press -> sinks, window -> sliding_cache, recompute -> recompute_sinks)
ALL_METHODS = ("dense", "dense_at_capacity", "sliding_cache", "window", "sinks", "sinks_noshift", "recompute",
               "recompute_sinks")
DEFAULT_METHODS = ("dense", "dense_at_capacity", "sliding_cache", "sinks", "sinks_noshift", "recompute_sinks")


@dataclass(frozen=True)
class Preset:
    """Defaults of one benchmark run; every field can be overridden on the command line."""

    models: tuple[str, ...]
    lengths: tuple[int, ...]
    capacity: int
    recompute_capacity: int  # 0: skip the press-vs-recompute comparison
    device: str = "cpu"
    dtype: str = "float32"
    repeats: int = 5
    recompute_repeats: int = 2
    peer_models: tuple[str, ...] = ()
    peer_lengths: tuple[int, ...] = ()


PRESETS: dict[str, Preset] = {
    # about 15 minutes on 2 CPU cores
    "default": Preset(
        models=("pythia-160m", "gpt2-small", "llama-1b", "smollm2-135m"),
        lengths=(512, 1024, 2048, 4096, 8192),
        capacity=256,
        recompute_capacity=1024,
        peer_models=("llama-1b",),
        peer_lengths=(2048,),
    ),
    # seconds: the same code path as the others on toy shapes (tests, CPU check of the GPU path)
    "tiny": Preset(
        models=("tiny-gpt-neox", "tiny-gpt2", "tiny-llama"),
        lengths=(64, 128),
        capacity=32,
        recompute_capacity=64,
        repeats=3,
        peer_models=("tiny-llama",),
        peer_lengths=(96,),
    ),
    # one GPU with >= 40 GB: dense at 32k holds 17 GB of bf16 KV next to 13.5 GB of weights
    "gpu-7b": Preset(
        models=("llama-2-7b",),
        lengths=(1024, 2048, 4096, 8192, 16384, 32768),
        capacity=1024,
        recompute_capacity=4096,
        device="cuda",
        dtype="bfloat16",
        repeats=10,
        recompute_repeats=5,
        peer_models=("llama-2-7b",),
        peer_lengths=(8192,),
    ),
}


@dataclass
class BenchConfig:
    """Everything a run depends on; stored in the results."""

    models: list[str]
    lengths: list[int]
    capacity: int = 256
    n_sink: int = 4
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    repeats: int = 5
    recompute_repeats: int = 2
    recompute_capacity: int = 1024
    device: str = "cpu"
    dtype: str = "float32"
    attn: str = "sdpa"
    seed: int = 0
    prefill_chunk: Optional[int] = None
    threads: Optional[int] = None
    kvpress_python: Optional[str] = None
    peer_models: list[str] = field(default_factory=list)
    peer_lengths: list[int] = field(default_factory=list)
    preset: Optional[str] = None
    progress: bool = True

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "BenchConfig":
        preset = PRESETS[name]
        values = dict(
            models=list(preset.models), lengths=list(preset.lengths), capacity=preset.capacity,
            recompute_capacity=preset.recompute_capacity, device=preset.device, dtype=preset.dtype,
            repeats=preset.repeats, recompute_repeats=preset.recompute_repeats,
            peer_models=list(preset.peer_models), peer_lengths=list(preset.peer_lengths), preset=name,
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def validate(self) -> None:
        for name in self.models:
            shapes.resolve(name)  # raises, naming the known ones
        bad = [m for m in self.methods if m not in ALL_METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; known: {list(ALL_METHODS)} (kvpress runs through --kvpress-python)")
        if not self.lengths or any(n < 1 for n in self.lengths):
            raise ValueError(f"lengths must be positive token counts, got {self.lengths}")
        if not 0 <= self.n_sink < self.capacity:
            raise ValueError(f"need 0 <= n_sink < capacity, got n_sink={self.n_sink}, capacity={self.capacity}")
        if self.repeats < 1 or self.recompute_repeats < 1:
            raise ValueError("repeats and recompute_repeats must be >= 1")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but torch sees no CUDA device (use --device cpu, e.g. with --preset tiny)")
        if self.dtype not in shapes.DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; known: {sorted(shapes.DTYPES)}")


# -- measuring ---------------------------------------------------------------------------
def _make_methods(ctx: ModelContext, cfg: BenchConfig, notes: list) -> list[Method]:
    builders = {
        "dense": lambda: Dense(ctx),
        "dense_at_capacity": lambda: Dense(ctx, fixed_length=cfg.capacity),
        "sliding_cache": lambda: SlidingCache(ctx, cfg.capacity),
        "window": lambda: Press(ctx, 0, cfg.capacity, True, cfg.prefill_chunk),
        "sinks": lambda: Press(ctx, cfg.n_sink, cfg.capacity, True, cfg.prefill_chunk),
        "sinks_noshift": lambda: Press(ctx, cfg.n_sink, cfg.capacity, False, cfg.prefill_chunk),
        "recompute": lambda: Recompute(ctx, 0, cfg.capacity),
        "recompute_sinks": lambda: Recompute(ctx, cfg.n_sink, cfg.capacity),
    }
    methods = []
    for name in cfg.methods:
        try:
            method = builders[name]()
        except Exception as exc:  # noqa: BLE001 - e.g. the press refusing a model
            notes.append(f"{name}: could not be set up: {error_text(exc)}")
            continue
        if isinstance(method, SlidingCache) and method.ignored:
            notes.append(
                f"sliding_cache: this family's DynamicCache ignores config.sliding_window (layers: {method.layer_types}); "
                "its numbers are dense numbers"
            )
        methods.append(method)
    return methods


def _stream_budget(cfg: BenchConfig) -> int:
    """Tokens a press stream can consume: the longest length plus every decoded step."""
    steps = len(cfg.lengths) * (cfg.repeats + 2) + cfg.repeats + 8
    return max(max(cfg.lengths), cfg.recompute_capacity + 64) + steps + 64


def run_model(spec: shapes.ModelSpec, cfg: BenchConfig, probe: Optional[PeakMemory],
              status: Callable[[str], None], advance: Callable[[], None]) -> dict:
    """Every method at every length for one model; then press vs re-computation."""
    entry = {"name": spec.name, "family": spec.family, "description": spec.description,
             "shape": None, "notes": [], "methods": {}, "results": [], "recompute_vs_press": None,
             "flat_cost_side_by_side": None, "prefill": {}, "skipped": None, "seconds": None}
    start = time.perf_counter()
    status(f"{spec.name}: building")
    try:
        model = shapes.build_model(spec, cfg.device, cfg.dtype, cfg.attn, cfg.seed)
    except shapes.ModelUnavailable as exc:
        entry["skipped"] = f"model not available: {exc}"
        for _ in range(len(cfg.lengths) + 1):
            advance()
        return entry
    gc.collect()
    gc.freeze()  # the import-time object graph is large: keep it out of the collections done between steps
    entry["shape"] = shapes.describe_shape(model)
    entry["build_seconds"] = round(time.perf_counter() - start, 2)
    methods: list[Method] = []
    with torch.no_grad():
        ctx = ModelContext(model, cfg.device, cfg.seed, _stream_budget(cfg))
        methods = _make_methods(ctx, cfg, entry["notes"])
        entry["methods"] = {m.name: {"label": m.label, "how": m.how} for m in methods}
        repeats = {m.name: (cfg.recompute_repeats if isinstance(m, Recompute) else cfg.repeats) for m in methods}
        try:
            for length in cfg.lengths:
                cells = measure_length(methods, length, repeats, cfg.device, probe,
                                       lambda s: status(f"{spec.name} {s}"))
                entry["results"].extend(cells.values())
                advance()
            press = next((m for m in methods if m.name == "sinks"), None)
            if press is not None and len(cfg.lengths) > 1:
                entry["flat_cost_side_by_side"] = _flat_cost_side_by_side(ctx, cfg, press, spec.name, status)
            for m in methods:
                if isinstance(m, Press) and m.prefill_tokens:
                    entry["prefill"][m.name] = {
                        "tokens": m.prefill_tokens, "seconds": round(m.prefill_seconds, 3),
                        "tokens_per_s": m.prefill_tokens / m.prefill_seconds if m.prefill_seconds else None,
                        "stats": dataclasses.asdict(m.press.stats),
                    }
        finally:
            for m in methods:
                m.close()
        if cfg.recompute_capacity and {"sinks", "recompute_sinks"} <= set(cfg.methods):
            entry["recompute_vs_press"] = _recompute_vs_press(ctx, cfg, status_prefix=spec.name, status=status)
        advance()
    entry["seconds"] = round(time.perf_counter() - start, 1)
    del methods, ctx, model
    gc.unfreeze()
    gc.collect()
    return entry


def _flat_cost_side_by_side(ctx: ModelContext, cfg: BenchConfig, press: Press, prefix: str, status) -> dict:
    """The press at the longest length and a fresh press stream at the shortest, timed interleaved.

    The per-length tables are measured one length after the other, minutes apart; on a
    shared machine the load can change in between. Here both lengths run in the same rounds
    (with dense at both lengths beside them), so the ratio is free of that drift.
    """
    lo, hi = min(cfg.lengths), max(cfg.lengths)
    out = {"lengths": [lo, hi], "cells": {}, "error": None}
    methods: list[Method] = []
    try:
        fresh = Press(ctx, cfg.n_sink, cfg.capacity, True, cfg.prefill_chunk)
        methods = [Pinned(fresh, lo, f"sinks@{lo}"), Pinned(press, hi, f"sinks@{hi}"),
                   Pinned(Dense(ctx), lo, f"dense@{lo}"), Pinned(Dense(ctx), hi, f"dense@{hi}")]
        repeats = {m.name: cfg.repeats for m in methods}
        out["cells"] = measure_length(methods, hi, repeats, cfg.device, None,
                                      lambda s: status(f"{prefix} flat cost {lo} vs {hi}: {s}"))
    except Exception as exc:  # noqa: BLE001
        out["error"] = error_text(exc)
    finally:
        if methods:
            methods[0].close()
            methods[2].close()
            methods[3].close()
    return out


def _recompute_vs_press(ctx: ModelContext, cfg: BenchConfig, status_prefix: str, status) -> dict:
    capacity = cfg.recompute_capacity
    length = capacity + 32  # the press is full and evicting on every step
    out = {"capacity": capacity, "length": length, "cells": {}, "error": None}
    methods: list[Method] = []
    try:
        methods = [Press(ctx, cfg.n_sink, capacity, True, cfg.prefill_chunk), Recompute(ctx, cfg.n_sink, capacity)]
        repeats = {"sinks": cfg.repeats, "recompute_sinks": cfg.recompute_repeats}
        cells = measure_length(methods, length, repeats, cfg.device, None,
                               lambda s: status(f"{status_prefix} capacity {capacity}: {s}"))
        out["cells"] = cells
        out["how"] = {m.name: m.how for m in methods}
    except Exception as exc:  # noqa: BLE001
        out["error"] = error_text(exc)
    finally:
        for m in methods:
            m.close()
    return out


# -- the whole run ------------------------------------------------------------------------
def run_benchmark(cfg: BenchConfig, command: Optional[str] = None) -> dict:
    """Run the benchmark described by ``cfg`` and return the results (a JSON-ready dict)."""
    from tqdm import tqdm

    from .latency_report import ratios
    from .peer import run_peer

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    probe = PeakMemory(cfg.device)
    config = dataclasses.asdict(cfg)
    config.pop("progress", None)
    timing = (
        "time.perf_counter around one model call per decoded token"
        + (" with torch.cuda.synchronize before and after" if cfg.device.startswith("cuda") else "")
        + f"; median over {cfg.repeats} steps ({cfg.recompute_repeats} for re-computation), methods interleaved "
        "with the order rotated each round; one untimed warm-up step per method and length (the memory step)"
    )
    results = {"schema": SCHEMA_VERSION, "kind": "latency",
               "metadata": run_metadata(cfg.device, command, config=config, memory_probe=probe.method, timing=timing),
               "models": [], "peer": None, "ratios": []}
    total = len(cfg.models) * (len(cfg.lengths) + 1)
    bar = tqdm(total=total, desc="kvpress-lite bench", unit="step", disable=not cfg.progress, file=sys.stderr,
               dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for name in cfg.models:
            entry = run_model(shapes.resolve(name), cfg, probe, status=lambda s: bar.set_postfix_str(s, refresh=True),
                              advance=lambda: bar.update(1))
            results["models"].append(entry)
        bar.set_postfix_str("kvpress peer")
        results["peer"] = run_peer(cfg)
    finally:
        bar.close()
    results["metadata"]["seconds"] = round(time.perf_counter() - start, 1)
    results["metadata"]["machine"]["load_average_end"] = list(os.getloadavg())
    results["ratios"] = ratios(results)
    return results
