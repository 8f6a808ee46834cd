"""``kvpress-lite perplexity``, ``kvpress-lite bench`` and ``kvpress-lite compiled``.

The harness adds these subcommands to the library's ``kvpress-lite`` command through the
``kvpress_lite.commands`` entry points (see ``benchmarks/pyproject.toml``). All three
share the output options: ``--out DIR``, ``--name STEM`` (``STEM.json``, ``STEM.md``, the
figures as PNG), ``--json``/``--markdown`` paths (``-``: stdout) and ``--from-json`` to
re-render an earlier run without measuring.

Examples::

    kvpress-lite perplexity                                    # embedded SmolLM2, War and Peace, ~10 min
    kvpress-lite perplexity --model gemma3-270m --tokens 4096 --stride 4 --methods all
    kvpress-lite bench --out benchmarks/results                # latency and memory, ~15 min on 2 CPU cores
    kvpress-lite bench --preset tiny --markdown -              # seconds: a smoke run
    kvpress-lite bench --kvpress-python .venv-kvpress/bin/python   # adds the NVIDIA kvpress peer
    kvpress-lite compiled --preset cpu                         # compiled static streaming vs compiled dense
    kvpress-lite compiled --preset gpu-7b --out benchmarks/results/compiled-gpu
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Callable

from . import report

logger = logging.getLogger(__name__)


# -- argument types ------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    """``"512,1k,2K"`` -> ``[512, 1024, 2048]``."""
    try:
        return [int(float(x[:-1]) * 1024) if x.endswith("k") else int(x)
                for x in (item.strip().lower() for item in text.split(",")) if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts like 512,1k,2048, got {text!r}")


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _range(value: str) -> tuple[int, int]:
    """``"10k:12k"`` -> ``(10000, 12000)``."""
    try:
        start, end = (int(x.replace("_", "").replace("k", "000")) for x in value.split(":"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected START:END (e.g. 10000:12000 or 10k:12k), got {value!r}") from exc
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"need 0 <= START < END, got {value!r}")
    return start, end


def _methods(known: tuple) -> Callable[[str], list[str]]:
    def parse(value: str) -> list[str]:
        names = list(known) if value == "all" else _names(value)
        bad = [m for m in names if m not in known]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; choose from {', '.join(known)} or 'all'")
        return names

    return parse


# -- shared output options -----------------------------------------------------------------
def _output_arguments(p: argparse.ArgumentParser, out: str, name: str) -> None:
    o = p.add_argument_group("output")
    o.add_argument("--out", "--out-dir", dest="out", default=out, metavar="DIR",
                   help="folder of the files (default: %(default)s)")
    o.add_argument("--name", default=name, metavar="STEM", help="file stem in --out (default: %(default)s)")
    o.add_argument("--json", metavar="PATH", help="JSON path instead of DIR/STEM.json ('-': stdout)")
    o.add_argument("--markdown", metavar="PATH", help="markdown path instead of DIR/STEM.md ('-': stdout)")
    o.add_argument("--from-json", metavar="PATH", help="measure nothing: re-render an earlier run's JSON")
    o.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _write(args: argparse.Namespace, results: dict, markdown: Callable[[dict], str], figures: dict) -> int:
    out, stem = Path(args.out), args.name
    if args.from_json:  # re-rendered next to the JSON it came from
        out, stem = Path(args.from_json).parent, Path(args.from_json).stem
    paths = report.write_outputs(
        results, markdown, figures, json_path=None if args.from_json else (args.json or out / f"{stem}.json"),
        md_path=args.markdown or out / f"{stem}.md", plot_dir=str(out))
    if "-" not in (args.markdown, args.json):
        print(markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


def _rerender(args: argparse.Namespace, markdown: Callable[[dict], str], plot: Callable) -> int:
    return _write(args, report.load_json(args.from_json), markdown, {Path(args.from_json).stem: plot})


def _check_budget(args: argparse.Namespace) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.capacity <= args.n_sink:
        raise SystemExit(f"--capacity ({args.capacity}) must exceed --n-sink ({args.n_sink})")


# -- perplexity ----------------------------------------------------------------------------
def add_perplexity(subparsers) -> argparse.ArgumentParser:
    """Register ``kvpress-lite perplexity``."""
    from .perplexity import ALL_METHODS, METHODS

    p = subparsers.add_parser(
        "perplexity", help="streaming perplexity on a real model and text: dense, window, sinks, re-computation",
        description="Feed a long text one token at a time and score each next token under several methods ("
                    + ", ".join(ALL_METHODS) + "). Models and texts are read from installed wheels or local paths; "
                    "nothing is downloaded.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct), 'gemma3-270m', a local HF model folder or a .gguf file "
                        "(any name of `kvpress-lite bench --list` with a tokenizer)")
    p.add_argument("--bos", choices=("auto", "yes", "no"), default="auto",
                   help="start the text with the BOS token: 'auto' does so for models trained that way (Gemma)")
    p.add_argument("--text", default="war_and_peace",
                   help="war_and_peace, sherlock_holmes, history_of_the_united_states, manual_of_surgery, or a text file")
    p.add_argument("--tokens", type=int, default=2048, help="tokens of the text to stream")
    p.add_argument("--n-sink", type=int, default=4, help="attention sinks kept by the press")
    p.add_argument("--capacity", type=int, default=256, help="cache entries kept per layer (sinks + window)")
    p.add_argument("--methods", type=_methods(ALL_METHODS), default=list(METHODS),
                   help="comma-separated methods, or 'all' (adds recompute_sinks, the ceiling for a sink cache)")
    p.add_argument("--stride", type=int, default=8,
                   help="score every k-th token with recompute (costly); all methods are compared on those tokens")
    p.add_argument("--chunk-report", type=int, default=1024, help="report perplexity per range of this many tokens")
    p.add_argument("--range", dest="ranges", type=_range, action="append", default=[], metavar="START:END",
                   help="an extra token range to report (repeatable), e.g. 10000:12000")
    p.add_argument("--score-range", type=_range, default=None, metavar="START:END",
                   help="recompute scores only tokens in this range (e.g. 10k:12k); all methods are compared there")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward for recompute")
    p.add_argument("--dense-chunk", type=int, default=512, help="tokens per call for dense (1: one at a time, same numbers)")
    p.add_argument("--attn-implementation", default="model",
                   help="attention kernel: 'model' keeps the model's (sdpa), or eager / sdpa")
    p.add_argument("--jobs", type=int, default=2,
                   help="worker processes, each running whole methods (one-token steps are memory-bound: "
                        "2 processes on 2 cores run about twice as fast as 1 process with 2 threads)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (per worker with --jobs > 1, default 1 there; else torch's choice)")
    p.add_argument("--resume", action="store_true",
                   help="reuse the methods a stopped run with the same settings finished (from STEM.partial.json)")
    _output_arguments(p, "results/perplexity", "<text>_<tokens>")
    p.set_defaults(func=run_perplexity)
    return p


def run_perplexity(args: argparse.Namespace) -> int:
    """Load model and text, compare the methods, write the files, print the table."""
    import torch

    from .embedded import model_display_name, needs_bos
    from .models import load
    from .perplexity import compare_methods, tokenize_prefix
    from .perplexity_report import markdown, plot
    from .texts import load_text

    if args.from_json:
        return _rerender(args, markdown, plot)
    _check_budget(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tokenizer = load(args.model)
    if tokenizer is None:
        raise SystemExit(f"kvpress-lite perplexity: {args.model!r} has random weights and no tokenizer; score real "
                         "text with an embedded model (default, gemma3-270m) or a local model folder")
    if args.attn_implementation != "model":
        model.set_attn_implementation(args.attn_implementation)
    text_name = Path(args.text).stem if Path(args.text).suffix else args.text
    bos = needs_bos(args.model, model) if args.bos == "auto" else args.bos == "yes"
    ids = tokenize_prefix(tokenizer, load_text(args.text), args.tokens, bos=bos)
    if args.name == "<text>_<tokens>":
        args.name = f"{text_name}_{args.tokens}"
    settings = {"model": model_display_name(args.model), "text": text_name, "tokens": args.tokens,
                "n_sink": args.n_sink, "capacity": args.capacity, "stride": args.stride,
                "chunk_report": args.chunk_report, "ranges": [list(r) for r in args.ranges],
                "dense_chunk": args.dense_chunk, "score_range": list(args.score_range) if args.score_range else None,
                "bos": bos}
    logger.info("%s: %d tokens of %s; methods %s; cache %d+%d; stride %d", settings["model"], ids.numel(), text_name,
                ",".join(args.methods), args.n_sink, args.capacity - args.n_sink, args.stride)
    checkpoint = Path(args.json or Path(args.out) / f"{args.name}.json").with_suffix(".partial.json")
    done = _read_checkpoint(checkpoint, settings) if args.resume else {}

    def keep(method: str, result: dict) -> None:
        done[method] = result
        report.write_json({"settings": settings, "results": done}, checkpoint)

    common = dict(n_sink=args.n_sink, capacity=args.capacity, chunk_report=args.chunk_report, progress=args.progress,
                  stride=args.stride, dense_chunk=args.dense_chunk, batch_size=args.batch_size, ranges=args.ranges,
                  score_range=args.score_range, done=dict(done), on_result=keep)
    comparison = compare_methods(
        args.model if args.jobs > 1 else model, ids, args.methods, jobs=args.jobs, threads_per_job=args.threads or 1,
        attn_implementation=None if args.attn_implementation == "model" else args.attn_implementation, **common)
    threads = (args.threads or 1) if args.jobs > 1 else torch.get_num_threads()
    meta = report.run_metadata("cpu", report.command_line("perplexity"), **settings, first_tokens=ids[:8].tolist(),
                               jobs=args.jobs, torch_threads=threads, dtype=str(model.dtype),
                               attn_implementation=getattr(model.config, "_attn_implementation", None),
                               wall_seconds=round(time.perf_counter() - start, 1))
    status = _write(args, {"metadata": meta, **comparison}, markdown, {args.name: plot})
    checkpoint.unlink(missing_ok=True)
    return status


def _read_checkpoint(path: Path, settings: dict) -> dict:
    try:
        saved = report.load_json(path)
    except (OSError, ValueError):
        logger.info("no checkpoint at %s: running every method", path)
        return {}
    if saved.get("settings") != settings:
        logger.warning("ignoring %s: it was written with other settings (%s)", path, saved.get("settings"))
        return {}
    logger.info("resuming from %s: %s already done", path, ", ".join(saved["results"]))
    return saved["results"]


# -- bench -----------------------------------------------------------------------------------
def _listing() -> str:
    from . import latency, models

    presets = "\n".join(
        f"  {name:8s} models {','.join(p.models)}; lengths {','.join(map(str, p.lengths))}; capacity {p.capacity}; "
        f"{p.device} {p.dtype}" for name, p in latency.PRESETS.items())
    names = "\n".join(f"  {name:14s} {spec.description}" for name, spec in models.MODELS.items())
    names += "\n  tiny:<type>    any model_type the adapters serve, at a tiny shape (kvpress-lite adapters --all)"
    names += "\n  PATH           a local Hugging Face model folder or .gguf file (real weights)"
    return f"presets:\n{presets}\n\nmodels:\n{names}"


def add_bench(subparsers) -> argparse.ArgumentParser:
    """Register ``kvpress-lite bench``."""
    from .latency import ALL_METHODS, PRESETS
    from .models import DTYPES

    p = subparsers.add_parser(
        "bench", help="per-token latency and memory against stream length, every method side by side",
        description="Time per-token decoding and measure memory at several stream lengths on several models, "
                    "methods interleaved: " + ", ".join(ALL_METHODS) + " and, given --kvpress-python, kvpress.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_listing())
    g = p.add_argument_group("what to run")
    g.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="defaults for everything below (default: %(default)s)")
    g.add_argument("--models", type=_names, help="comma-separated model names (see the list below)")
    g.add_argument("--lengths", type=_ints, help="stream lengths in tokens, e.g. 512,1024,2048,4096,8192 (2k = 2048)")
    g.add_argument("--capacity", type=int, help="press capacity: entries kept per layer (sinks + window)")
    g.add_argument("--n-sink", type=int, default=4, help="attention sinks (default: %(default)s)")
    g.add_argument("--methods", type=_methods(ALL_METHODS), help="comma-separated methods, or 'all'")
    g.add_argument("--repeats", type=int, help="timed decode steps per method and length")
    g.add_argument("--recompute-repeats", type=int, help="timed steps for re-computation (it is slow)")
    g.add_argument("--recompute-capacity", type=int, help="capacity of the press-vs-re-computation run (0: skip)")
    g.add_argument("--prefill-chunk", type=int, help="chunk size the press streams long prompts with")
    d = p.add_argument_group("where")
    d.add_argument("--device", help="cpu or cuda (the preset's by default)")
    d.add_argument("--dtype", choices=sorted(DTYPES), help="weights and KV dtype")
    d.add_argument("--attn", default="sdpa", help="attention implementation (default: %(default)s)")
    d.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--kvpress-python", metavar="PATH",
                   help="interpreter of an environment with kvpress==0.5.5 (see benchmarks/kvpress_lite_harness/peer.py); "
                        "without it the kvpress comparison is skipped, saying so")
    d.add_argument("--peer-models", type=_names, help="Llama-family models for the kvpress comparison")
    d.add_argument("--peer-lengths", type=_ints, help="stream lengths for the kvpress comparison")
    d.add_argument("--list", action="store_true", help="list presets and models, then exit")
    _output_arguments(p, "benchmarks/results", "results")
    p.set_defaults(func=run_bench)
    return p


def run_bench(args: argparse.Namespace) -> int:
    from .latency import BenchConfig, run_benchmark
    from .latency_report import FIGURES, markdown, ratios

    if args.list:
        print(_listing())
        return 0
    if args.from_json:
        results = report.load_json(args.from_json)
        results["ratios"] = ratios(results)
        return _write(args, results, markdown, FIGURES)
    cfg = BenchConfig.from_preset(
        args.preset, models=args.models, lengths=args.lengths, capacity=args.capacity, n_sink=args.n_sink,
        methods=args.methods, repeats=args.repeats, recompute_repeats=args.recompute_repeats,
        recompute_capacity=args.recompute_capacity, device=args.device, dtype=args.dtype, attn=args.attn,
        seed=args.seed, prefill_chunk=args.prefill_chunk, threads=args.threads, kvpress_python=args.kvpress_python,
        peer_models=args.peer_models, peer_lengths=args.peer_lengths, progress=args.progress)
    try:
        cfg.validate()
    except ValueError as exc:
        print(f"kvpress-lite bench: {exc}", file=sys.stderr)
        return 2
    results = run_benchmark(cfg, command=report.command_line("bench"))
    status = _write(args, results, markdown, FIGURES)
    for r in results["ratios"]:
        print(f"{r['ratio']:40s} {r['model']:14s} {report.fx(r['value'])}", file=sys.stderr)
    return status


# -- compiled ----------------------------------------------------------------------------------
def add_compiled(subparsers) -> argparse.ArgumentParser:
    """Register ``kvpress-lite compiled``."""
    from .compiled import PRESETS

    p = subparsers.add_parser(
        "compiled", help="compiled static-shape streaming against compiled dense decoding",
        description="torch.compile'd kvpress_lite.StreamingCache against transformers' StaticCache under the same "
                    "compile, and against the eager press: ratios, recompiles after warm-up, cost and memory over a "
                    "long stream. Presets: " + "; ".join(f"{k}: {v['model']} on {v['device']}" for k, v in PRESETS.items()))
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--steps", type=int, help="timed steps per comparison (medians); default from the preset")
    _output_arguments(p, "benchmarks/results/compiled", "results")
    p.set_defaults(func=run_compiled)
    return p


def run_compiled(args: argparse.Namespace) -> int:
    from kvpress_lite.errors import KVPressLiteError

    from .compiled import markdown, plot, run_compiled as measure

    if args.from_json:
        return _write(args, report.load_json(args.from_json), markdown, {"latency": plot})
    try:
        results = measure(args.preset, args.steps, command=report.command_line("compiled"))
    except (ValueError, KVPressLiteError) as exc:
        print(f"kvpress-lite compiled: {exc}", file=sys.stderr)
        return 2
    return _write(args, results, markdown, {"latency": plot})


# -- longrun -----------------------------------------------------------------------------------
def add_longrun(subparsers) -> argparse.ArgumentParser:
    """Register ``kvpress-lite longrun``."""
    p = subparsers.add_parser(
        "longrun", help="a long stream on real weights: compiled StreamingCache, perplexity per block, memory",
        description="Streams --tokens consecutive tokens of a text through the compiled kvpress_lite.StreamingCache, "
                    "one token per call, scoring every next token; reports perplexity per --block, tokens/s and "
                    "process memory over the stream, beside dense over the first --dense-tokens.")
    p.add_argument("--model", default="default", help="embedded model (default, gemma3-270m) or a model folder")
    p.add_argument("--text", default="war_and_peace", help="text name or path (default: %(default)s)")
    p.add_argument("--tokens", type=lambda s: _ints(s)[0] if s.endswith("k") else int(s), default=100_000,
                   help="tokens to stream (default: %(default)s)")
    p.add_argument("--n-sink", type=int, default=4)
    p.add_argument("--capacity", type=int, default=1024)
    p.add_argument("--block", type=int, default=4096, help="report every this many tokens (default: %(default)s)")
    p.add_argument("--dense-tokens", type=int, default=16384,
                   help="dense over this many tokens first, 0 for none (default: %(default)s)")
    p.add_argument("--eager", action="store_true", help="do not compile (for a quick look)")
    p.add_argument("--head-batch", type=int, default=256,
                   help="score the decoder's hidden states through the output embedding this many at a time "
                        "(the same logits; its vocabulary matrix is read once per batch), 1: the causal LM's own "
                        "call every token (default: %(default)s)")
    p.add_argument("--fresh-blocks", action="store_true",
                   help="also the dense model over each block from a fresh cache: the text's own difficulty per "
                        "block, beside the press's (with --from-json: added to that run's results)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    _output_arguments(p, "benchmarks/results/longrun", "<model>")
    p.set_defaults(func=run_longrun)
    return p


def run_longrun(args: argparse.Namespace) -> int:
    import torch

    from .embedded import model_display_name, needs_bos
    from .longrun import add_fresh, fresh_blocks, markdown, plot, run_longrun as measure
    from .models import load
    from .perplexity import tokenize_prefix
    from .texts import load_text

    if args.from_json and args.fresh_blocks:  # the text's own difficulty, added to a finished run
        torch.set_num_threads(args.threads)
        results = report.load_json(args.from_json)
        meta = results["metadata"]
        model, tokenizer = load(args.model)
        ids = tokenize_prefix(tokenizer, load_text(meta["text"]), meta["tokens"] + 1, bos=needs_bos(args.model, model))
        add_fresh(results["summary"], fresh_blocks(model, ids, block=meta["block"], progress=args.progress))
        meta["fresh_blocks_command"] = report.command_line("longrun")
        report.write_json(results, Path(args.from_json))
        return _rerender(args, markdown, plot)
    if args.from_json:
        return _rerender(args, markdown, plot)
    _check_budget(args)
    if args.tokens < 2 or args.block < 1 or args.head_batch < 1:
        raise SystemExit("--tokens must be at least 2, --block and --head-batch at least 1")
    torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model)
    if tokenizer is None:
        raise SystemExit(f"kvpress-lite longrun: {args.model!r} has random weights and no tokenizer; stream real "
                         "text with an embedded model (default, gemma3-270m) or a local model folder")
    name = model_display_name(args.model)
    if args.name == "<model>":
        args.name = name
    ids = tokenize_prefix(tokenizer, load_text(args.text), args.tokens + 1, bos=needs_bos(args.model, model))
    meta = report.run_metadata("cpu", report.command_line("longrun"), model=name, text=args.text,
                               torch_threads=args.threads, dtype=str(model.dtype))
    results = measure(model, ids, n_sink=args.n_sink, capacity=args.capacity, block=args.block,
                      dense_tokens=min(args.dense_tokens, args.tokens), compile=not args.eager,
                      partial=Path(args.out) / f"{args.name}.partial.json", metadata=meta, progress=args.progress,
                      head_batch=args.head_batch, fresh=args.fresh_blocks)
    return _write(args, results, markdown, {args.name: plot})


# -- bench-serve -------------------------------------------------------------------------------
def add_bench_serve(subparsers) -> argparse.ArgumentParser:
    """Register ``kvpress-lite bench-serve``."""
    p = subparsers.add_parser(
        "bench-serve", help="simulated users against kvpress-lite serve: latency by turn and server memory, "
                            "press beside dense",
        description="Starts kvpress-lite serve (the press, then --dense) on a loopback port and plays USERS "
                    "concurrent streamed conversations of TURNS turns each through the openai client; reports "
                    "requests served, errors, time to first token and per-token latency by turn, and the server's "
                    "RSS over the run.")
    p.add_argument("--model", default=None, help="model folder or embedded name (default: the embedded SmolLM2)")
    p.add_argument("--users", type=int, default=3)
    p.add_argument("--turns", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=24, help="tokens a reply (default %(default)s)")
    p.add_argument("--n-sink", type=int, default=4)
    p.add_argument("--capacity", type=int, default=256)
    p.add_argument("--timeout", type=float, default=300, help="seconds a request may take (default %(default)s)")
    p.add_argument("--modes", type=_names, default=["press", "dense"], help="press,dense (default: both)")
    _output_arguments(p, "benchmarks/results/serve", "load")
    p.set_defaults(func=run_bench_serve)
    return p


def run_bench_serve(args: argparse.Namespace) -> int:
    from .serve.load import markdown, plot, run_load

    if args.from_json:
        return _rerender(args, markdown, plot)
    _check_budget(args)
    bad = [m for m in args.modes if m not in ("press", "dense")]
    if bad or args.users < 1 or args.turns < 2 or args.max_tokens < 1:
        raise SystemExit("--modes takes press and/or dense; --users >= 1, --turns >= 2, --max-tokens >= 1")
    meta = report.run_metadata("cpu", report.command_line("bench-serve"), model=args.model or "default")
    results = run_load(model=args.model, users=args.users, turns=args.turns, max_tokens=args.max_tokens,
                       n_sink=args.n_sink, capacity=args.capacity, timeout_s=args.timeout, modes=tuple(args.modes),
                       progress=args.progress, metadata=meta)
    return _write(args, results, markdown, {args.name: plot})
