"""The benchmarks cannot rot: the micro-benchmarks run once each, the runner runs on tiny shapes.

Timings are never asserted here (see benchmarks/results for measured numbers).
"""

from __future__ import annotations

import argparse
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
    from kvpress_lite.bench import ALL_METHODS
    from kvpress_lite.bench.cli import main

    lengths = [48, 80]
    status = main(["--preset", "tiny", "--lengths", ",".join(map(str, lengths)), "--repeats", "1",
                   "--recompute-repeats", "1", "--recompute-capacity", "48", "--threads", "1", "--no-progress",
                   "--out", str(tmp_path)])
    assert status == 0
    results = json.loads((tmp_path / "results.json").read_text())

    assert results["config"]["lengths"] == lengths
    assert results["machine"]["logical_cpus"] and results["versions"]["torch"]
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
        assert {cells[("press", n)]["kv_length"] for n in lengths} == {32}
        assert cells[("dense", 80)]["kv_length"] == 81
        assert set(model["methods"]) == set(ALL_METHODS)
        assert all(model["methods"][m]["how"] for m in ALL_METHODS)
        rvp = model["recompute_vs_press"]
        assert rvp["capacity"] == 48 and rvp["cells"]["recompute"]["latency_ms"] > 0

    names = {(t["target"], t["model"]) for t in results["targets"]}
    for model in TINY:
        for target in ("flat cost", "overhead", "constant KV bytes", "constant peak memory", "vs re-computation"):
            assert (target, model) in names
    assert "skipped" in results["peer"] and "--kvpress-python" in results["peer"]["skipped"]

    markdown = (tmp_path / "results.md").read_text()
    assert "## Targets" in markdown and "tiny-gpt2" in markdown and "Skipped" in markdown
    assert (tmp_path / "latency.png").stat().st_size > 0 and (tmp_path / "memory.png").stat().st_size > 0


def test_cli_help_lists_outputs_and_presets(capsys):
    from kvpress_lite.bench import cli

    parser = argparse.ArgumentParser(prog="kvpress-lite")
    cli.add_parser(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["bench", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--json", "--markdown", "--plot", "--kvpress-python", "--preset", "--device", "--dtype"):
        assert flag in text
    assert "gpu-7b" in text and "llama-2-7b" in text


def test_lengths_accept_k_suffix():
    from kvpress_lite.bench.cli import _ints

    assert _ints("512,1k,2K,8192") == [512, 1024, 2048, 8192]


def test_peer_is_skipped_with_a_reason_when_its_interpreter_is_missing(tmp_path):
    from kvpress_lite.bench.peer import run_peer
    from kvpress_lite.bench.runner import BenchConfig

    cfg = BenchConfig.from_preset("tiny", kvpress_python=str(tmp_path / "no-such-python"))
    assert "does not exist" in run_peer(cfg)["skipped"]
    cfg = BenchConfig.from_preset("tiny")
    assert "--kvpress-python" in run_peer(cfg)["skipped"]


def test_targets_from_synthetic_results():
    from kvpress_lite.bench.report import compute_targets, to_markdown

    def cell(method, length, ms, peak=1000, kv=10, kv_length=4):
        return {"method": method, "length": length, "latency_ms": ms, "latency_ms_samples": [ms], "tokens_per_s": 1e3 / ms,
                "peak_memory_bytes": peak, "kv_bytes": kv, "kv_length": kv_length, "note": None, "error": None}

    results = {
        "config": {"capacity": 4, "lengths": [8, 1024, 2048]},
        "models": [{
            "name": "m", "description": "", "shape": {}, "notes": [], "methods": {}, "skipped": None,
            "results": [cell("press", 8, 1.0), cell("press", 1024, 1.0, peak=1000), cell("press", 2048, 1.2, peak=1100),
                        cell("dense", 8, 1.0), cell("dense", 1024, 2.0), cell("dense", 2048, 3.0),
                        cell("dense_at_capacity", 8, 1.0), cell("dense_at_capacity", 1024, 1.0),
                        cell("dense_at_capacity", 2048, 1.0)],
            "recompute_vs_press": {"capacity": 4, "length": 8,
                                   "cells": {"press": cell("press", 8, 1.0), "recompute": cell("recompute", 8, 25.0)}},
        }],
        "peer": {"skipped": "no"},
    }
    targets = {t["target"]: t for t in compute_targets(results)}
    assert targets["flat cost"]["value"] == pytest.approx(1.2) and targets["flat cost"]["pass"] is False
    assert targets["overhead"]["value"] == pytest.approx(1.0) and targets["overhead"]["pass"] is True
    assert targets["constant KV bytes"]["pass"] is True
    assert targets["constant peak memory"]["value"] == pytest.approx(1.1) and targets["constant peak memory"]["pass"] is False
    assert targets["vs re-computation"]["value"] == pytest.approx(25.0) and targets["vs re-computation"]["pass"] is True
    results["targets"] = list(targets.values())
    assert "FAIL" in to_markdown(results) and "PASS" in to_markdown(results)


def test_bench_takes_any_served_family_at_a_tiny_shape():
    from kvpress_lite.bench import shapes

    spec = shapes.resolve("tiny:cohere")
    model = shapes.build_model(spec, attn="sdpa")
    assert model.config.model_type == "cohere" and model.config.num_hidden_layers == 4
    assert shapes.build_model(shapes.resolve("tiny:bloom")).config._attn_implementation == "eager"  # no sdpa there
    with pytest.raises(ValueError, match="tiny:<model_type>"):
        shapes.resolve("no-such-model")
