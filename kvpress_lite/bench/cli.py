"""``kvpress-lite bench``: the end-to-end benchmark from the command line.

Wired into the main CLI with :func:`add_parser` and :func:`run`; also runnable alone as
``python -m kvpress_lite.bench``.

Examples::

    kvpress-lite bench --out benchmarks/results                 # the default run (~15 min, 2 CPU cores)
    kvpress-lite bench --preset tiny --json /tmp/tiny.json        # seconds: a smoke run
    kvpress-lite bench --models pythia-160m --lengths 512,8192 --markdown -
    kvpress-lite bench --kvpress-python .venv-kvpress/bin/python  # adds the NVIDIA kvpress peer
    kvpress-lite bench --preset gpu-7b --out results-gpu          # one GPU: Llama-2-7B shape, bf16, to 32k
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from . import shapes

DESCRIPTION = (
    "Time per-token decoding and measure memory for dense, transformers' sliding window, the kvpress-lite press "
    "(with and without position shift), sliding window with re-computation and, given --kvpress-python, NVIDIA "
    "kvpress, at several stream lengths on several model shapes. Writes JSON, a markdown report and plots."
)


def _ints(text: str) -> list[int]:
    """``"512,1k,2K"`` -> ``[512, 1024, 2048]``."""
    values = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            values.append(int(float(item[:-1]) * 1024) if item.endswith("k") else int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated token counts like 512,1k,2048, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``bench`` sub-command to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    parser = subparsers.add_parser("bench", help="benchmark latency and memory against stream length",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=_epilog())
    _add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def _listing() -> str:
    presets = "\n".join(
        f"  {name:8s} models {','.join(p.models)}; lengths {','.join(map(str, p.lengths))}; capacity {p.capacity}; "
        f"{p.device} {p.dtype}" for name, p in shapes.PRESETS.items())
    models = "\n".join(f"  {name:14s} {spec.description}" for name, spec in shapes.MODELS.items())
    models += "\n  tiny:<type>    any model_type the adapters serve, at a tiny shape (kvpress-lite adapters --all)"
    return f"presets:\n{presets}\n\nmodels:\n{models}"


def _epilog() -> str:
    return _listing() + "\n\nexamples:" + (__doc__ or "").split("Examples::")[-1]


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("what to run")
    g.add_argument("--preset", choices=sorted(shapes.PRESETS), default="default",
                   help="defaults for everything below (default: %(default)s)")
    g.add_argument("--models", type=_names, help="comma-separated model names (see the list below)")
    g.add_argument("--lengths", type=_ints, help="stream lengths in tokens, e.g. 512,1024,2048,4096,8192 (2k = 2048)")
    g.add_argument("--capacity", type=int, help="press capacity: entries kept per layer (sinks + window)")
    g.add_argument("--n-sink", type=int, default=4, help="attention sinks (default: %(default)s)")
    g.add_argument("--methods", type=_names,
                   help="subset of dense,dense_at_capacity,window,press,press_noshift,recompute (default: all)")
    g.add_argument("--repeats", type=int, help="timed decode steps per method and length")
    g.add_argument("--recompute-repeats", type=int, help="timed steps for re-computation (it is slow)")
    g.add_argument("--recompute-capacity", type=int,
                   help="capacity of the press-vs-re-computation comparison (0: skip it)")
    g.add_argument("--prefill-chunk", type=int, help="chunk size the press uses to stream long prompts "
                                                     "(default: the press's own, capacity - n_sink)")
    d = parser.add_argument_group("where")
    d.add_argument("--device", help="cpu or cuda (the preset's by default)")
    d.add_argument("--dtype", choices=sorted(shapes.DTYPES), help="weights and KV dtype")
    d.add_argument("--attn", default="sdpa", help="attention implementation (default: %(default)s)")
    d.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    d.add_argument("--seed", type=int, default=0)
    p = parser.add_argument_group("peer")
    p.add_argument("--kvpress-python", metavar="PATH",
                   help="interpreter of an environment with kvpress==0.5.5 and transformers<5.3 (see "
                        "kvpress_lite/bench/peer.py); without it the kvpress comparison is skipped, saying so")
    p.add_argument("--peer-models", type=_names, help="Llama-family models for the kvpress comparison")
    p.add_argument("--peer-lengths", type=_ints, help="stream lengths for the kvpress comparison")
    o = parser.add_argument_group("output")
    o.add_argument("--out", metavar="DIR", help="write DIR/results.json, DIR/results.md, DIR/latency.png, DIR/memory.png")
    o.add_argument("--json", metavar="PATH", help="write the results as JSON ('-': stdout)")
    o.add_argument("--markdown", metavar="PATH", help="write the markdown report ('-': stdout)")
    o.add_argument("--plot", metavar="DIR", help="write latency.png and memory.png into DIR")
    o.add_argument("--from-json", metavar="PATH",
                   help="measure nothing: recompute targets, markdown and plots from an earlier results.json")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--list", action="store_true", help="list presets and models, then exit")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark the parsed ``args`` describe; returns an exit status."""
    from .report import to_markdown, write_json, write_plots
    from .runner import BenchConfig, run_benchmark

    if getattr(args, "list", False):
        print(_listing())
        return 0
    cfg = BenchConfig.from_preset(
        args.preset, models=args.models, lengths=args.lengths, capacity=args.capacity, n_sink=args.n_sink,
        methods=args.methods, repeats=args.repeats, recompute_repeats=args.recompute_repeats,
        recompute_capacity=args.recompute_capacity, device=args.device, dtype=args.dtype, attn=args.attn,
        seed=args.seed, prefill_chunk=args.prefill_chunk, threads=args.threads, kvpress_python=args.kvpress_python,
        peer_models=args.peer_models, peer_lengths=args.peer_lengths, progress=not args.no_progress,
    )
    try:
        cfg.validate()
    except ValueError as exc:
        print(f"kvpress-lite bench: {exc}", file=sys.stderr)
        return 2
    if args.from_json:
        import json

        from .report import compute_targets

        results = json.loads(Path(args.from_json).read_text())
        results["targets"] = compute_targets(results)
    else:
        command = "kvpress-lite bench " + " ".join(shlex.quote(a) for a in getattr(args, "argv", None) or sys.argv[2:])
        results = run_benchmark(cfg, command=command)

    json_path, md_path, plot_dir = args.json, args.markdown, args.plot
    if args.out:
        out = Path(args.out)
        json_path = json_path or str(out / "results.json")
        md_path = md_path or str(out / "results.md")
        plot_dir = plot_dir or str(out)
    markdown = to_markdown(results)
    if json_path == "-":
        import json

        print(json.dumps(results, indent=1, default=str))
    elif json_path:
        print(f"wrote {write_json(results, json_path)}", file=sys.stderr)
    if md_path == "-" or not (json_path or md_path or plot_dir):
        print(markdown)
    elif md_path:
        Path(md_path).parent.mkdir(parents=True, exist_ok=True)
        Path(md_path).write_text(markdown)
        print(f"wrote {md_path}", file=sys.stderr)
    if plot_dir:
        for path in write_plots(results, plot_dir):
            print(f"wrote {path}", file=sys.stderr)
    for t in results["targets"]:
        mark = "info" if t["op"] == "info" else {True: "PASS", False: "FAIL", None: "n/a"}[t["pass"]]
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        print(f"{mark:5s} {t['target']:22s} {t['model']:14s} {value}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kvpress-lite")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_parser(subparsers)
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] != "bench":
        argv = ["bench"] + argv
    args = parser.parse_args(argv)
    args.argv = argv[1:]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)
