"""Compiled static-shape streaming against compiled dense decoding, on CPU (issue 9).

One run, methods interleaved step by step, medians, one torch thread:

* compiled press (``kvpress_lite.StreamingCache``, ``torch.compile(model.forward)``) vs
  compiled dense (transformers ``StaticCache``, same compile) at equal KV slots;
* compiled press vs eager press (hooks + DynamicCache), and eager press vs eager dense, at equal KV;
* the compiled press's cost and memory at 1k and at the longest stream (flat), and its
  recompiles after warm-up (must be 0).

Random weights at a Llama shape (speed does not depend on weight values).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compiled.py --preset cpu --out benchmarks/results/compiled
    python benchmarks/compiled.py --preset gpu-7b --out benchmarks/results/compiled-gpu   # on a CUDA machine
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import psutil
import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, StaticCache

import kvpress_lite as kvl
from kvpress_lite.cache_access import model_cache_kwarg

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    "llama-40m": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=8192),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
}

# GPU preset (issue 9): Llama-2-7B shape, bf16, CUDA graphs; the press at KV 4096 against dense
# StaticCache at KV 4096 (equal) and at the stream's length (64k: what dense holds by then)
PRESETS = {
    "cpu": dict(shape="llama-40m", kv=1024, steps=200, long=4096, dense_long=0, device="cpu", dtype="float32",
                mode="default"),
    "gpu-7b": dict(shape="llama-2-7b", kv=4096, steps=200, long=8192, dense_long=65536, device="cuda",
                   dtype="bfloat16", mode="reduce-overhead"),
    "tiny": dict(shape="tiny", kv=64, steps=20, long=400, dense_long=512, device="cpu", dtype="float32",
                 mode="default"),
}


def build(shape: str, device: str = "cpu", dtype: str = "float32"):
    config = LlamaConfig(max_position_embeddings=1 << 17, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                         **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=getattr(torch, dtype))
    return model.eval()


class Runner:
    """One decoding method: a cache, a forward, and the tokens it has taken in."""

    def __init__(self, model, cache, forward, tokens):
        self.model, self.cache, self.forward, self.tokens = model, cache, forward, tokens
        self.name, self.seen = model_cache_kwarg(model), 0

    def feed(self, n):  # eager, several tokens (the prompt) or one by one
        with torch.no_grad():
            while n > 0:
                k = min(n, 256)
                self.model(input_ids=self.tokens[:, self.seen : self.seen + k], use_cache=True, **{self.name: self.cache})
                self.seen, n = self.seen + k, n - k

    def step(self) -> float:
        token = self.tokens[:, self.seen : self.seen + 1]
        start = time.perf_counter()
        with torch.no_grad():
            out = self.forward(input_ids=token, use_cache=True, **{self.name: self.cache})
        out.logits[0, -1, 0].item()  # waits for the device
        self.seen += 1
        return (time.perf_counter() - start) * 1000


def interleave(runners: dict, steps: int) -> dict:
    times = {k: [] for k in runners}
    for _ in range(steps):
        for name, runner in runners.items():
            times[name].append(runner.step())
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--steps", type=int, help="timed steps per comparison (medians); default from the preset")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compiled"))
    args = parser.parse_args(argv)
    preset = dict(PRESETS[args.preset])
    if args.steps:
        preset["steps"] = args.steps
    torch.set_num_threads(1)
    device = preset["device"]
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("the gpu-7b preset needs a CUDA device")
    model = build(preset["shape"], device, preset["dtype"])
    kv, steps, sink = preset["kv"], preset["steps"], 4
    tokens = torch.randint(0, model.config.vocab_size, (1, max(preset["long"], preset["dense_long"]) + 2 * steps + 8),
                           generator=torch.Generator().manual_seed(0)).to(device)
    forward = torch.compile(model.forward, mode=preset["mode"])
    args.shape, args.long = preset["shape"], preset["long"]
    result = {"preset": args.preset, **preset, "machine": {
        "cpu": platform.processor() or platform.machine(), "cores": psutil.cpu_count(), "torch": torch.__version__,
        "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None}}
    print(f"{args.shape}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, KV {kv}, {steps} steps each")

    # compiled press vs compiled dense at equal KV slots: the press full (kv slots), dense filled to kv - steps
    press = Runner(model, kvl.StreamingCache(model, n_sink=sink, capacity=kv - 1), forward, tokens)
    dense = Runner(model, StaticCache(config=model.config, max_cache_len=kv), forward, tokens)
    dense_long = None
    if preset["dense_long"]:  # dense at the stream's full length: what the press saves as the stream grows
        dense_long = Runner(model, StaticCache(config=model.config, max_cache_len=preset["dense_long"]), forward, tokens)
    press.feed(kv)
    dense.feed(kv - steps - 4)
    if dense_long is not None:
        dense_long.feed(preset["dense_long"] - steps - 4)
    t0 = time.perf_counter()
    for runner in (press, dense) + ((dense_long,) if dense_long else ()):  # warm-up: compile every graph
        runner.step(), runner.step()
    compile_s = time.perf_counter() - t0
    from torch._dynamo.utils import counters

    graphs_after_warmup = counters["stats"]["unique_graphs"]
    torch._dynamo.config.error_on_recompile = True
    runners = {"compiled press": press, "compiled dense": dense}
    if dense_long is not None:
        runners[f"compiled dense at KV {preset['dense_long']}"] = dense_long
    medians = interleave(runners, steps)
    result["compiled_equal_kv"] = medians
    print(f"compiled press {medians['compiled press']:.2f} ms, compiled dense {medians['compiled dense']:.2f} ms "
          f"(warm-up with compiles {compile_s:.0f} s)")

    # eager press vs eager dense vs compiled press at equal KV
    torch._dynamo.config.error_on_recompile = False
    with kvl.apply_press(model, n_sink=sink, capacity=kv):
        eager_press = Runner(model, DynamicCache(config=model.config), model, tokens)
        eager_press.feed(kv + 1)
        eager_medians = {"eager press": statistics.median(eager_press.step() for _ in range(steps))}
    eager_dense = Runner(model, DynamicCache(config=model.config), model, tokens)
    eager_dense.feed(kv - steps // 2)
    eager_medians["eager dense"] = statistics.median(eager_dense.step() for _ in range(steps))
    eager_medians["compiled press"] = statistics.median(press.step() for _ in range(steps))
    result["eager_equal_kv"] = eager_medians
    print("eager: " + ", ".join(f"{k} {v:.2f} ms" for k, v in eager_medians.items()))

    # the compiled press to the longest stream: flat cost and memory, no recompiles
    torch._dynamo.config.error_on_recompile = True
    rss, cost = {}, {}
    process = psutil.Process()
    while press.seen < args.long:
        ms = press.step()
        if press.seen in (kv + 2 * steps + 100, args.long - 1):
            cost[press.seen] = statistics.median([ms] + [press.step() for _ in range(steps // 2)])
            rss[press.seen] = (torch.cuda.memory_allocated() if device == "cuda" else process.memory_info().rss) / 2**20
    torch._dynamo.config.error_on_recompile = False
    short, long_ = sorted(cost)
    result["compiled_press_stream"] = {"ms_per_token": cost, "rss_mib": rss,
                                       "graphs_after_warmup": graphs_after_warmup,
                                       "graphs_at_end": counters["stats"]["unique_graphs"],
                                       "tokens": press.seen}
    ratios = {
        "compiled press / compiled dense (equal KV)": medians["compiled press"] / medians["compiled dense"],
        "compiled press / eager press (equal KV)": eager_medians["compiled press"] / eager_medians["eager press"],
        "eager press / eager dense (equal KV)": eager_medians["eager press"] / eager_medians["eager dense"],
        f"compiled press ms/token at {long_} / at {short}": cost[long_] / cost[short],
        f"compiled press memory at {long_} / at {short}": rss[long_] / rss[short],
        **({f"compiled dense at KV {preset['dense_long']} / compiled press": medians[f"compiled dense at KV {preset['dense_long']}"] / medians["compiled press"]} if dense_long else {}),
        "recompiles after warm-up": counters["stats"]["unique_graphs"] - graphs_after_warmup,
    }
    result["ratios"] = ratios
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    where = result["machine"]["gpu"] or "CPU"
    lines = [f"# Compiled static-shape streaming, {where} ({args.shape}, {preset['dtype']}, KV {kv}, medians of "
             f"{steps} interleaved steps)",
             "", f"Machine: {result['machine']}", "", "| ratio | value |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in ratios.items()]
    lines += ["", "| method | ms/token |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.2f} |" for k, v in {**medians, **{f'{k} (eager run)': v for k, v in eager_medians.items()}}.items()]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
