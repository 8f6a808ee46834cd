"""Compiled static-shape streaming against compiled dense decoding (``kvpress-lite compiled``).

One run, methods interleaved step by step, medians, one torch thread:

* ``compiled_sinks`` (:class:`kvpress_lite.StreamingCache`, ``torch.compile(model.forward)``)
  against ``compiled_dense`` (transformers' ``StaticCache``, the same compiled forward) at
  equal KV slots and, on the GPU preset, against dense at the stream's full length;
* ``compiled_sinks`` against the eager press (``sinks``) and ``sinks`` against eager
  ``dense``, at equal KV;
* the compiled press's cost and memory from about 1k tokens past the capacity to the
  longest stream (flat), and its recompiles after warm-up (0 expected).

Random weights at a shape of :mod:`.models` (speed does not depend on weight values).

>>> sorted(PRESETS)
['cpu', 'gpu-7b', 'tiny']
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Optional

import torch

from . import models
from .measure import PeakMemory
from .report import fmt, machine_line, pyplot, run_metadata, save, table

logger = logging.getLogger(__name__)

# gpu-7b: Llama-2-7B shape, bf16, CUDA graphs; the press at KV 4096 against dense StaticCache at KV 4096
# (equal) and at the stream's length (64k: what dense holds by then)
PRESETS = {
    "cpu": dict(model="llama-40m", kv=1024, steps=200, long=4096, dense_long=0, device="cpu", dtype="float32",
                mode="default"),
    "gpu-7b": dict(model="llama-2-7b", kv=4096, steps=200, long=8192, dense_long=65536, device="cuda",
                   dtype="bfloat16", mode="reduce-overhead"),
    "tiny": dict(model="tiny-llama", kv=64, steps=20, long=400, dense_long=512, device="cpu", dtype="float32",
                 mode="default"),
}


class _Decoder:
    """One method: a cache, a forward, and the tokens it has taken in."""

    def __init__(self, model, cache, forward, tokens) -> None:
        from kvpress_lite.cache_access import model_cache_kwarg

        self.model, self.cache, self.forward, self.tokens = model, cache, forward, tokens
        self.kwarg, self.seen = model_cache_kwarg(model), 0

    def feed(self, n: int) -> None:
        """Eager, 256 tokens a call at most (a static cache takes a long prompt that way)."""
        with torch.no_grad():
            while n > 0:
                k = min(n, 256)
                self.model(input_ids=self.tokens[:, self.seen : self.seen + k], use_cache=True, **{self.kwarg: self.cache})
                self.seen, n = self.seen + k, n - k

    def step(self) -> float:
        token = self.tokens[:, self.seen : self.seen + 1]
        start = time.perf_counter()
        with torch.no_grad():
            out = self.forward(input_ids=token, use_cache=True, **{self.kwarg: self.cache})
        out.logits[0, -1, 0].item()  # waits for the device
        self.seen += 1
        return (time.perf_counter() - start) * 1000


def _interleave(decoders: dict, steps: int) -> dict:
    times = {k: [] for k in decoders}
    for _ in range(steps):
        for name, decoder in decoders.items():
            times[name].append(decoder.step())
    return {k: statistics.median(v) for k, v in times.items()}


def run_compiled(preset: str = "cpu", steps: Optional[int] = None, command: Optional[str] = None) -> dict:
    """Measure the preset; returns a JSON-ready results dict (see the module docstring)."""
    from torch._dynamo.utils import counters
    from transformers import DynamicCache, StaticCache

    import kvpress_lite as kvl

    p = dict(PRESETS[preset], **({"steps": steps} if steps else {}))
    device, kv, steps, n_sink = p["device"], p["kv"], p["steps"], 4
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"the {preset} preset needs a CUDA device")
    torch.set_num_threads(1)
    model = models.build_model(models.resolve(p["model"]), device, p["dtype"], "sdpa")
    model.config.max_position_embeddings = max(model.config.max_position_embeddings, 1 << 17)
    tokens = torch.randint(0, model.config.vocab_size, (1, max(p["long"], p["dense_long"]) + 2 * steps + 8),
                           generator=torch.Generator().manual_seed(0)).to(device)
    forward = torch.compile(model.forward, mode=p["mode"])
    results = {"kind": "compiled", "metadata": run_metadata(device, command, preset=preset, config=p,
                                                            shape=models.describe_shape(model))}
    logger.info("%s: KV %d, %d steps each", p["model"], kv, steps)

    # compiled press vs compiled dense at equal KV slots: the press full, dense filled to kv - steps
    press = _Decoder(model, kvl.StreamingCache(model, n_sink=n_sink, capacity=kv - 1), forward, tokens)
    decoders = {"compiled_sinks": press,
                "compiled_dense": _Decoder(model, StaticCache(config=model.config, max_cache_len=kv), forward, tokens)}
    if p["dense_long"]:  # dense at the stream's full length: what the press saves as the stream grows
        decoders[f"compiled_dense@{p['dense_long']}"] = _Decoder(
            model, StaticCache(config=model.config, max_cache_len=p["dense_long"]), forward, tokens)
    press.feed(kv)
    decoders["compiled_dense"].feed(kv - steps - 4)
    if p["dense_long"]:
        decoders[f"compiled_dense@{p['dense_long']}"].feed(p["dense_long"] - steps - 4)
    start = time.perf_counter()
    for decoder in decoders.values():  # warm-up: compile every graph
        decoder.step(), decoder.step()
    results["compile_seconds"] = round(time.perf_counter() - start, 1)
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.config.error_on_recompile = True
    try:
        compiled = _interleave(decoders, steps)
        # the eager press and eager dense at equal KV, beside the compiled press
        torch._dynamo.config.error_on_recompile = False
        with kvl.apply_press(model, n_sink=n_sink, capacity=kv):
            eager_press = _Decoder(model, DynamicCache(config=model.config), model, tokens)
            eager_press.feed(kv + 1)
            eager = {"sinks": statistics.median(eager_press.step() for _ in range(steps))}
        eager_dense = _Decoder(model, DynamicCache(config=model.config), model, tokens)
        eager_dense.feed(kv - steps // 2)
        eager["dense"] = statistics.median(eager_dense.step() for _ in range(steps))
        torch._dynamo.config.error_on_recompile = True
        eager["compiled_sinks"] = statistics.median(press.step() for _ in range(steps))
        # the compiled press to the longest stream: flat cost and memory, no recompiles
        probe, cost, memory = PeakMemory(device), {}, {}
        while press.seen < p["long"]:
            ms = press.step()
            if press.seen in (kv + 2 * steps + 100, p["long"] - 1):
                cost[press.seen] = statistics.median([ms] + [press.step() for _ in range(steps // 2)])
                memory[press.seen] = probe.current()
    finally:
        torch._dynamo.config.error_on_recompile = False
    short, long_ = sorted(cost)
    results.update(compiled_ms=compiled, eager_ms=eager, stream={
        "ms_per_token": cost, "memory_bytes": memory, "tokens": press.seen,
        "recompiles_after_warmup": counters["stats"]["unique_graphs"] - graphs})
    ratios = {
        "compiled_sinks / compiled_dense (equal KV)": compiled["compiled_sinks"] / compiled["compiled_dense"],
        "compiled_sinks / sinks (equal KV)": eager["compiled_sinks"] / eager["sinks"],
        "sinks / dense (eager, equal KV)": eager["sinks"] / eager["dense"],
        f"compiled_sinks ms/token at {long_} / at {short} tokens": cost[long_] / cost[short],
        f"compiled_sinks memory at {long_} / at {short} tokens": memory[long_] / memory[short],
    }
    if p["dense_long"]:
        ratios[f"compiled_dense at KV {p['dense_long']} / compiled_sinks"] = (
            compiled[f"compiled_dense@{p['dense_long']}"] / compiled["compiled_sinks"])
    results["ratios"] = ratios
    return results


def markdown(results: dict) -> str:
    meta = results["metadata"]
    p = meta["config"]
    lines = [f"# Compiled static-shape streaming ({p['model']}, {p['dtype']}, {p['device']}, KV {p['kv']}, medians of "
             f"{p['steps']} interleaved steps)", "", f"- command: `{meta['command']}`",
             f"- machine: {machine_line(meta)}",
             f"- recompiles after warm-up: {results['stream']['recompiles_after_warmup']} over "
             f"{results['stream']['tokens']} tokens; compiling took {results['compile_seconds']} s", ""]
    lines += table(["ratio", "measured"], [[k, fmt(v, 3)] for k, v in results["ratios"].items()])
    lines += ["", "Per-token latency, ms (medians; the compiled and the eager runs are two sets of rounds):", ""]
    lines += table(["method", "ms/token"], [[k, fmt(v)] for k, v in results["compiled_ms"].items()]
                   + [[f"{k} (eager rounds)", fmt(v)] for k, v in results["eager_ms"].items()])
    return "\n".join(lines) + "\n"


def plot(results: dict, path) -> None:
    """Per-token latency of every method (bars; the compiled and the eager rounds side by side)
    and the compiled press's cost early and late in its stream."""
    p = results["metadata"]["config"]
    fig, (ax, ax_len) = pyplot().subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 1]})
    bars = {**results["compiled_ms"], **{f"{k}\n(eager rounds)": v for k, v in results["eager_ms"].items()}}
    ax.barh(list(bars)[::-1], list(bars.values())[::-1], color="tab:blue")
    ax.set(xlabel="ms per token (median)", title=f"{p['model']}, {p['dtype']}, {p['device']}, KV {p['kv']}")
    cost = {int(k): v for k, v in results["stream"]["ms_per_token"].items()}
    ax_len.bar([f"{n:,}" for n in cost], list(cost.values()), color="tab:green")
    ax_len.set(xlabel="tokens streamed", ylabel="ms per token", title="compiled_sinks over the stream")
    for a in (ax, ax_len):
        a.grid(True, axis="x" if a is ax else "y", alpha=0.3)
    save(fig, path)
