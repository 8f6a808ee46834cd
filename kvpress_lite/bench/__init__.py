"""Benchmarks of kvpress-lite: per-token latency and memory against stream length.

Modules: :mod:`.shapes` (model shapes and presets), :mod:`.methods` (the decoding methods
compared, one class each), :mod:`.measure` (clocks and memory probes), :mod:`.runner`
(the measuring loop), :mod:`.peer` (NVIDIA kvpress, in its own interpreter),
:mod:`.report` (targets, markdown, plots) and :mod:`.cli` (``kvpress-lite bench``).

>>> from kvpress_lite.bench import BenchConfig, run_benchmark      # doctest: +SKIP
>>> results = run_benchmark(BenchConfig.from_preset("tiny"))         # doctest: +SKIP
>>> [t["target"] for t in results["targets"]][:2]                    # doctest: +SKIP
['flat cost', 'overhead']
"""

from .runner import ALL_METHODS, BenchConfig, run_benchmark

__all__ = ["ALL_METHODS", "BenchConfig", "run_benchmark"]
