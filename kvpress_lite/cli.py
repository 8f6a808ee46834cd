"""``kvpress-lite`` command line: ``adapters``, ``demo`` and ``verify``, plus the subcommands other packages
add through the ``kvpress_lite.commands`` entry points (the harness in ``benchmarks/`` adds
``perplexity``, ``bench``, ``compiled`` and ``chat``).

The command line is the edge of the library: it prints for people; the library logs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Optional


def _adapters(args: argparse.Namespace) -> int:
    import kvpress_lite as kvl
    from kvpress_lite.registry import get_registry, support_for

    if args.all:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        rows = [support_for(t) for t in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)]
        print(f"{'model_type':<28} {'status':<9} {'adapter':<18} detail")
        for row in rows:
            print(f"{row.model_type:<28} {row.status:<9} {row.adapter or '-':<18} {row.detail}")
        counts = {status: sum(r.status == status for r in rows) for status in ("accepted", "refused", "unknown")}
        print(f"{len(rows)} causal-LM model types in this transformers: "
              + ", ".join(f"{n} {status}" for status, n in counts.items()))
    else:
        infos = kvl.available_adapters()
        print(f"{'adapter':<18} {'types':>5}  {'plugin':<18} {'distribution':<24} model types")
        for info in infos:
            dist = f"{info.distribution} {info.version}" if info.distribution else "(registered by hand)"
            print(f"{info.name:<18} {len(info.model_types):>5}  {info.plugin:<18} {dist:<24} {', '.join(info.model_types)}")
        print(f"{len(infos)} adapters serving {sum(len(i.model_types) for i in infos)} model types; "
              "`kvpress-lite adapters --all` lists every causal-LM type of the installed transformers")
    for problem in get_registry().problems:
        print(f"warning: {problem}", file=sys.stderr)
    return 0


def _demo_model(family: str, attn: str):
    """A random-weight model of any family the registry serves (6 layers, tiny sizes; eager attention
    where the family has no sdpa)."""
    from kvpress_lite.registry import support_for
    from kvpress_lite.tiny import tiny_model_for_demo

    support = support_for(family)
    if support.status != "accepted":
        raise SystemExit(f"kvpress-lite demo: {family!r} is {support.status}: {support.detail}. "
                         "`kvpress-lite adapters --all` lists every family and its status.")
    return tiny_model_for_demo(family, num_layers=6, attn_implementation=attn)


def _demo(args: argparse.Namespace) -> int:
    """Stream a random-weight model token by token and show that the cache stays flat."""
    import torch
    from transformers import DynamicCache

    import kvpress_lite as kvl
    from kvpress_lite.cache_access import model_cache_kwarg as cache_kwarg

    model = _demo_model(args.family, args.attn)
    name = cache_kwarg(model)
    print(f"{args.family} (random weights, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), "
          f"n_sink={args.n_sink}, capacity={args.capacity}, {args.tokens} tokens")
    print(f"{'tokens':>8} {'cache entries':>14} {'KV MiB':>8} {'RSS MiB':>9} {'ms/token':>9}")
    with kvl.apply_press(model, n_sink=args.n_sink, capacity=args.capacity) as press, torch.no_grad():
        cache = DynamicCache(config=model.config)
        token = torch.zeros(1, 1, dtype=torch.long)
        start, every = time.perf_counter(), max(1, args.tokens // 10)
        for step in range(1, args.tokens + 1):
            out = model(input_ids=token, use_cache=True, **{name: cache})
            token = out.logits[:, -1:].argmax(-1)
            if step % every == 0:
                layers = [layer for layer in cache.layers if getattr(layer, "keys", None) is not None]
                kv = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in layers)
                ms = (time.perf_counter() - start) / every * 1000
                print(f"{step:>8} {press.stats.cache_length[0]:>14} {kv / 2**20:>8.2f} "
                      f"{_rss_mib():>9.0f} {ms:>9.2f}")
                start = time.perf_counter()
    print(f"evicted {press.stats.evicted_tokens} entries per layer; the cache never held more than {args.capacity}.")
    return 0


def _rss_mib() -> float:
    """Resident memory of this process (Linux /proc; 0 where it cannot be read)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return 0.0


# subcommands of the measuring harness (benchmarks/), named so a user without it learns how to get it
HARNESS_COMMANDS = ("perplexity", "bench", "compiled", "chat")
HARNESS_HINT = "pip install -e benchmarks/ (from a kvpress-lite checkout; `make setup` does it)"


def _add_plugin_commands(sub) -> None:
    """Subcommands registered under the ``kvpress_lite.commands`` entry-point group: each entry point
    is a function taking the argparse subparsers object and adding its parser."""
    from importlib.metadata import entry_points

    found = entry_points(group="kvpress_lite.commands")
    for ep in sorted(found, key=lambda e: e.name):
        try:
            ep.load()(sub)
        except Exception as exc:  # noqa: BLE001 - a broken add-on must not take the core commands down
            logging.getLogger(__name__).warning("command %r from %s could not be loaded: %s", ep.name, ep.value, exc)
    for name in HARNESS_COMMANDS:
        if name not in sub.choices:
            # no option prefix: whatever follows the name is taken in, and the command says what is missing
            missing = sub.add_parser(name, help=f"(needs the measuring harness: {HARNESS_HINT})", add_help=False,
                                     prefix_chars="\0")
            missing.set_defaults(func=_harness_missing(name))
            missing.add_argument("rest", nargs="*")


def _load_for_verify(spec: str):
    """A local model folder (transformers' from_pretrained), else an embedded model of the harness."""
    import os

    if os.path.isdir(spec):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(spec, dtype="float32")
    from importlib import metadata

    # embedded models come from the harness, through an entry point (the library never imports it)
    loaders = list(metadata.entry_points(group="kvpress_lite.models"))
    if not loaders:
        raise SystemExit(f"kvpress-lite verify: {spec!r} is not a model folder (embedded model names need the "
                         f"harness: {HARNESS_HINT})")
    try:
        return loaders[0].load()(spec)[0]
    except Exception as exc:  # the harness names what is missing
        raise SystemExit(f"kvpress-lite verify: cannot load {spec!r}: {exc}") from exc


def _verify(args: argparse.Namespace) -> int:
    """Run the exactness checks on the user's model; exit 0 only when every check ran and passed."""
    import kvpress_lite as kvl

    model = _load_for_verify(args.model)
    start = time.perf_counter()
    try:
        report = kvl.verify(model, adapter=args.adapter)
    except kvl.UnsupportedModelError as exc:
        print(f"kvpress-lite verify: {exc}", file=sys.stderr)
        return 2
    print(report)
    print(f"({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return 0 if report.exact else 1


def _harness_missing(name: str):
    def run(args: argparse.Namespace) -> int:
        print(f"kvpress-lite {name}: this command comes with kvpress-lite's measuring harness, which is not "
              f"installed. Install it with: {HARNESS_HINT}", file=sys.stderr)
        return 2

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvpress-lite",
        description="StreamingLLM KV-cache press for Hugging Face transformers: tools and evaluations.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does (INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    adapters = sub.add_parser("adapters", help="list the adapters found and the plugins that provide them")
    adapters.add_argument("--all", action="store_true",
                          help="every causal-LM model type of the installed transformers: accepted, refused (why) or unknown")
    adapters.set_defaults(func=_adapters)

    demo = sub.add_parser("demo", help="stream a random-weight model and print cache size and memory as it goes")
    demo.add_argument("--family", default="llama", help="any model_type the adapters serve (see `adapters --all`)")
    demo.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa")
    demo.add_argument("--tokens", type=int, default=2000)
    demo.add_argument("--n-sink", type=int, default=4)
    demo.add_argument("--capacity", type=int, default=128)
    demo.set_defaults(func=_demo)

    verify = sub.add_parser("verify", help="check that the press is exact on your model (real weights, its first "
                                           "layers of each type, seconds on a CPU)")
    verify.add_argument("model", help="a local model folder, or an embedded model's name (with the harness)")
    verify.add_argument("--adapter", default=None, help="check this adapter instead of the registry's choice")
    verify.set_defaults(func=_verify)

    _add_plugin_commands(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
