"""The harness's benchmarks cannot rot: the micro-benchmarks run once each, the latency and the
compiled runs run on tiny shapes, through the same `kvpress-lite` command a user types.

Timings are never asserted here (see benchmarks/results for measured numbers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")

ROOT = Path(__file__).resolve().parents[1]
TINY = ("tiny-gpt-neox", "tiny-gpt2", "tiny-llama")


def test_micro_benchmarks_run_once():
    env = dict(os.environ, KVPRESS_LITE_MICRO_MODELS=",".join(TINY), KVPRESS_LITE_MICRO_CAPACITY="32")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "benchmarks" / "test_micro.py"), "--benchmark-disable", "-q",
         "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "passed" in proc.stdout


def test_runner_tiny_writes_every_method_and_length(tmp_path):
    from kvpress_lite.cli import main
    from kvpress_lite_harness.latency import ALL_METHODS

    lengths = [48, 80]
    status = main(["bench", "--preset", "tiny", "--lengths", ",".join(map(str, lengths)), "--repeats", "1",
                   "--recompute-repeats", "1", "--recompute-capacity", "48", "--threads", "1", "--no-progress",
                   "--methods", "all", "--out", str(tmp_path)])
    assert status == 0
    results = json.loads((tmp_path / "results.json").read_text())

    meta = results["metadata"]
    assert meta["config"]["lengths"] == lengths
    assert meta["machine"]["logical_cpus"] and meta["versions"]["torch"]
    assert [m["name"] for m in results["models"]] == list(TINY)
    for model in results["models"]:
        assert not model["skipped"]
        cells = {(c["method"], c["length"]): c for c in model["results"]}
        assert set(cells) == {(m, n) for m in ALL_METHODS for n in lengths}
        for (method, length), cell in cells.items():
            assert cell["error"] is None, (model["name"], method, length, cell["error"])
            assert cell["latency_ms"] > 0 and cell["tokens_per_s"] > 0
            assert cell["peak_memory_bytes"] > 0
        # the press is full (capacity 32 of the tiny preset) at both lengths
        assert {cells[(m, n)]["kv_length"] for n in lengths for m in ("sinks", "window", "sliding_cache")} == {32}
        assert cells[("dense", 80)]["kv_length"] == 81
        assert set(model["methods"]) == set(ALL_METHODS)
        assert all(model["methods"][m]["how"] for m in ALL_METHODS)
        rvp = model["recompute_vs_press"]
        assert rvp["capacity"] == 48 and rvp["cells"]["recompute_sinks"]["latency_ms"] > 0

    names = {(r["ratio"], r["model"]) for r in results["ratios"]}
    for model in TINY:
        for ratio in ("press at 80 / at 48 tokens", "press / dense at equal KV", "press KV bytes, most / fewest",
                      "re-computation / press"):
            assert (ratio, model) in names
    assert "skipped" in results["peer"] and "--kvpress-python" in results["peer"]["skipped"]

    markdown = (tmp_path / "results.md").read_text()
    assert "## Ratios" in markdown and "tiny-gpt2" in markdown and "Skipped" in markdown
    assert (tmp_path / "latency.png").stat().st_size > 0 and (tmp_path / "memory.png").stat().st_size > 0


def test_rerendering_from_json_measures_nothing_and_writes_the_same_files(tmp_path):
    from kvpress_lite.cli import main

    assert main(["bench", "--preset", "tiny", "--models", "tiny-llama", "--lengths", "40,72", "--repeats", "1",
                 "--recompute-repeats", "1", "--recompute-capacity", "0", "--threads", "1", "--no-progress",
                 "--out", str(tmp_path / "run")]) == 0
    before = (tmp_path / "run" / "results.md").read_text()
    for name in ("results.md", "latency.png", "memory.png"):
        (tmp_path / "run" / name).unlink()
    assert main(["bench", "--from-json", str(tmp_path / "run" / "results.json")]) == 0
    assert (tmp_path / "run" / "results.md").read_text() == before
    assert (tmp_path / "run" / "latency.png").stat().st_size > 0


@pytest.mark.parametrize("command", ["bench", "compiled", "perplexity"])
def test_cli_help_lists_the_shared_output_options(command, capsys):
    from kvpress_lite.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--out", "--name", "--json", "--markdown", "--from-json", "--no-progress"):
        assert flag in text
    if command == "bench":
        assert "gpu-7b" in text and "llama-2-7b" in text and "--kvpress-python" in text


def test_lengths_accept_k_suffix():
    from kvpress_lite_harness.cli import _ints

    assert _ints("512,1k,2K,8192") == [512, 1024, 2048, 8192]


def test_compiled_run_at_a_tiny_shape_never_recompiles(tmp_path, capsys):
    import transformers

    from kvpress_lite.cli import main

    status = main(["compiled", "--preset", "tiny", "--steps", "4", "--out", str(tmp_path)])
    if int(transformers.__version__.split(".")[0]) < 5:  # static streaming is refused there, saying why
        assert status == 2 and "transformers >= 5" in capsys.readouterr().err
        return
    assert status == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["stream"]["recompiles_after_warmup"] == 0
    assert set(results["compiled_ms"]) >= {"compiled_sinks", "compiled_dense"}
    assert "compiled_sinks / compiled_dense (equal KV)" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "latency.png").read_bytes()[:4] == b"\x89PNG"


def test_peer_is_skipped_with_a_reason_when_its_interpreter_is_missing(tmp_path):
    from kvpress_lite_harness.latency import BenchConfig
    from kvpress_lite_harness.peer import run_peer

    cfg = BenchConfig.from_preset("tiny", kvpress_python=str(tmp_path / "no-such-python"))
    assert "does not exist" in run_peer(cfg)["skipped"]
    cfg = BenchConfig.from_preset("tiny")
    assert "--kvpress-python" in run_peer(cfg)["skipped"]


def test_ratios_from_synthetic_results():
    from kvpress_lite_harness.latency_report import markdown, ratios

    def cell(method, length, ms, peak=1000, kv=10, kv_length=4):
        return {"method": method, "length": length, "latency_ms": ms, "latency_ms_samples": [ms], "tokens_per_s": 1e3 / ms,
                "peak_memory_bytes": peak, "kv_bytes": kv, "kv_length": kv_length, "note": None, "error": None}

    results = {
        "metadata": {"config": {"capacity": 4, "lengths": [8, 1024, 2048]}},
        "models": [{
            "name": "m", "description": "", "shape": {}, "notes": [], "methods": {}, "skipped": None,
            "results": [cell("sinks", 8, 1.0), cell("sinks", 1024, 1.0, peak=1000), cell("sinks", 2048, 1.2, peak=1100),
                        cell("dense", 8, 1.0), cell("dense", 1024, 2.0), cell("dense", 2048, 3.0),
                        cell("dense_at_capacity", 8, 1.0), cell("dense_at_capacity", 1024, 1.0),
                        cell("dense_at_capacity", 2048, 1.0)],
            "recompute_vs_press": {"capacity": 4, "length": 8, "cells": {
                "sinks": cell("sinks", 8, 1.0), "recompute_sinks": cell("recompute_sinks", 8, 25.0)}},
        }],
        "peer": {"skipped": "no"},
    }
    measured = {r["ratio"]: r["value"] for r in ratios(results)}
    assert measured["press at 2048 / at 8 tokens"] == pytest.approx(1.2)
    assert measured["press / dense at equal KV"] == pytest.approx(1.0)
    assert measured["press KV bytes, most / fewest"] == pytest.approx(1.0)
    assert measured["press peak memory at 2048 / at 1024 tokens"] == pytest.approx(1.1)
    assert measured["re-computation / press"] == pytest.approx(25.0)
    results["ratios"] = ratios(results)
    text = markdown(results)
    assert "| re-computation / press | m | 25.00x |" in text
    assert "PASS" not in text and "FAIL" not in text  # measured values, not verdicts against an issue's thresholds


def test_bench_takes_any_served_family_at_a_tiny_shape():
    from kvpress_lite_harness import models as shapes

    spec = shapes.resolve("tiny:cohere")
    model = shapes.build_model(spec, attn="sdpa")
    assert model.config.model_type == "cohere" and model.config.num_hidden_layers == 4
    assert shapes.build_model(shapes.resolve("tiny:bloom")).config._attn_implementation == "eager"  # no sdpa there
    with pytest.raises(ValueError, match="tiny:<model_type>"):
        shapes.resolve("no-such-model")
