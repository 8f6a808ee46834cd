"""The peer comparison with NVIDIA kvpress, run under another interpreter.

kvpress 0.5.5 pins ``transformers<5.3``, so it lives in its own virtual environment. The
runner starts this module there as a subprocess (``--kvpress-python PATH``), with this
checkout on ``PYTHONPATH``; the worker times, side by side in one process (so on the same
transformers): dense at the stream length, dense at KV length ``capacity``, kvpress-lite's
press (position shift) and kvpress's ``DecodingPress(StreamingLLMPress(n_sink),
compression_interval=1, target_size=capacity)``, on the Llama shape kvpress supports.

Building that environment (CPU; torch first and pinned, or pip fetches a CUDA build)::

    python -m venv .venv-kvpress
    .venv-kvpress/bin/pip install torch==2.13.0
    .venv-kvpress/bin/pip install kvpress==0.5.5 'transformers<5.3' pluggy tqdm psutil
    .venv-kvpress/bin/pip install --no-deps -e .    # kvpress-lite itself: its adapters load through entry points
    kvpress-lite bench --kvpress-python .venv-kvpress/bin/python

Run by hand: ``.venv-kvpress/bin/python -m kvpress_lite_harness.peer CONFIG_JSON OUT_JSON``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

PEER_FAMILIES = ("llama",)  # kvpress's supported classes include Llama; not GPT-NeoX, not GPT-2


def run_peer(cfg) -> dict:
    """Run the kvpress worker under ``cfg.kvpress_python``; a dict saying why when skipped."""
    from . import models

    if not cfg.kvpress_python:
        return {"skipped": "no --kvpress-python given: NVIDIA kvpress needs its own environment (transformers<5.3); "
                           "see benchmarks/kvpress_lite_harness/peer.py for how to build it"}
    python = Path(cfg.kvpress_python)
    if not python.exists():
        return {"skipped": f"--kvpress-python {python} does not exist"}
    models = [m for m in cfg.peer_models if m in models.MODELS and models.MODELS[m].family in PEER_FAMILIES
              and models.MODELS[m].loader is None]
    if not models:
        return {"skipped": f"no peer model of a family kvpress supports among {cfg.peer_models} (Llama shapes only)"}
    lengths = list(cfg.peer_lengths) or [max(cfg.lengths)]
    worker_cfg = {
        "models": models, "lengths": lengths, "capacity": cfg.capacity, "n_sink": cfg.n_sink,
        "repeats": cfg.repeats, "device": cfg.device, "dtype": cfg.dtype, "attn": cfg.attn, "seed": cfg.seed,
        "threads": cfg.threads, "prefill_chunk": cfg.prefill_chunk,
    }
    harness_root, repo_root = Path(__file__).resolve().parents[1], Path(__file__).resolve().parents[2]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(harness_root), str(repo_root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    with tempfile.TemporaryDirectory() as tmp:
        out_path = Path(tmp) / "peer.json"
        cmd = [str(python), "-m", "kvpress_lite_harness.peer", json.dumps(worker_cfg), str(out_path)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0 or not out_path.exists():
            tail = "\n".join(proc.stderr.strip().splitlines()[-6:])
            return {"skipped": f"the kvpress worker failed (exit {proc.returncode}): {tail}", "command": cmd[:3]}
        result = json.loads(out_path.read_text())
    result["command"] = " ".join([str(python), "-m", "kvpress_lite_harness.peer", "'<config json>'", "OUT"])
    result["interpreter"] = str(python)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def worker(config: dict) -> dict:
    """Measure the peer methods (runs under the kvpress interpreter)."""
    import torch

    from . import models
    from .measure import PeakMemory, library_versions, machine_info, measure_length
    from .methods import Dense, ModelContext, Press, kvpress_streaming

    try:
        import kvpress  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return {"skipped": f"kvpress does not import under {sys.executable}: {type(exc).__name__}: {exc}"}
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    logging.getLogger("kvpress").setLevel(logging.ERROR)  # its per-step debug/warnings are not ours to print
    capacity, n_sink = config["capacity"], config["n_sink"]
    probe = PeakMemory(config["device"])
    out = {"machine": machine_info(config["device"]), "versions": library_versions(), "memory_probe": probe.method,
           "capacity": capacity, "n_sink": n_sink, "models": []}
    for name in config["models"]:
        spec = models.MODELS[name]
        entry = {"name": name, "notes": [], "methods": {}, "results": []}
        with torch.no_grad():
            model = models.build_model(spec, config["device"], config["dtype"], config["attn"], config["seed"])
            entry["shape"] = models.describe_shape(model)
            budget = max(config["lengths"]) + (config["repeats"] + 4) * len(config["lengths"]) + 64
            ctx = ModelContext(model, config["device"], config["seed"], budget)
            builders = [
                ("dense", lambda: Dense(ctx)),
                ("dense_at_capacity", lambda: Dense(ctx, fixed_length=capacity)),
                ("sinks", lambda: Press(ctx, n_sink, capacity, True, config.get("prefill_chunk"))),
                ("kvpress", lambda: kvpress_streaming(ctx, n_sink, capacity)),
            ]
            methods = []
            for method_name, build in builders:
                try:
                    methods.append(build())
                except Exception as exc:  # noqa: BLE001
                    entry["notes"].append(f"{method_name}: could not be set up: {type(exc).__name__}: {exc}")
            entry["methods"] = {m.name: {"label": m.label, "how": m.how} for m in methods}
            repeats = {m.name: config["repeats"] for m in methods}
            try:
                for length in config["lengths"]:
                    cells = measure_length(methods, length, repeats, config["device"], probe,
                                           lambda s, n=name: print(f"[kvpress peer] {n} {s}", file=sys.stderr, flush=True))
                    entry["results"].extend(cells.values())
                entry["kept_positions_check"] = _kvpress_keeps_sinks(ctx, n_sink, capacity)
            finally:
                for m in methods:
                    m.close()
        out["models"].append(entry)
    return out


def _kvpress_keeps_sinks(ctx, n_sink: int, capacity: int, steps: int = 16) -> dict:
    """Which stream positions kvpress's cache still holds after ``steps`` decoded tokens.

    Layer 0, head 0: every cached key gets its stream position written into its first
    feature, and so does each new key after its step (found as the one entry that carries no
    known position), so the kept entries can be read back. Exact StreamingLLM keeps
    ``[0, n_sink)`` and the last ``capacity - n_sink`` positions, in stream order.
    """
    import torch

    from .methods import filled_dynamic_cache, kvpress_streaming

    if ctx.kv_dtype != torch.float32:
        return {"skipped": "needs float32 keys to carry positions exactly"}
    method = kvpress_streaming(ctx, n_sink, capacity)
    try:
        cache = filled_dynamic_cache(ctx, capacity)
        layer = cache.layers[0]
        layer.keys = layer.keys.clone()
        layer.keys[0, 0, :, 0] = torch.arange(capacity, dtype=layer.keys.dtype)
        method.cache = cache
        known = set(range(capacity))
        for seen in range(capacity, capacity + steps):
            method.step()
            column = layer.keys[0, 0, :, 0]
            fresh = [i for i, v in enumerate(column.tolist()) if v not in known]
            if len(fresh) != 1:
                return {"skipped": f"could not find the new entry after a step ({len(fresh)} candidates)"}
            column[fresh[0]] = float(seen)
            known.add(seen)
        kept = [int(v) for v in layer.keys[0, 0, :, 0].tolist()]
    finally:
        method.close()
    seen = capacity + steps
    expected = list(range(n_sink)) + list(range(seen - (capacity - n_sink), seen))
    return {
        "steps": steps,
        "kept_in_cache_order_first": kept[: n_sink + 4],
        "sinks_kept": set(range(n_sink)) <= set(kept),
        "same_set_as_exact_sink_window": sorted(kept) == expected,
        "in_stream_order": kept == sorted(kept),
    }


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    config = json.loads(argv[0])
    result = worker(config)
    Path(argv[1]).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
