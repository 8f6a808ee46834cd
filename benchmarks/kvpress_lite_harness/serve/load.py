"""``kvpress-lite bench-serve``: simulated users against ``kvpress-lite serve``, press beside dense.

For each mode (the press, then ``--dense``: the same server with no press) a server is
started as a subprocess on a loopback port with its own state folder; ``users`` threads,
each an ``openai`` client, play ``turns`` turns of the shipped chat script (each user from
another line of it), streamed, every request carrying the whole conversation as clients
do. Measured per request: time to the first content chunk, time per generated token
after it, errors; and the server process's resident memory, sampled every half second.
Bounded in count (users x turns) and time (``timeout_s`` per request).

>>> results = run_load(users=2, turns=3, max_tokens=8)      # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Optional

from ..report import fmt, human_bytes, machine_line, pyplot, save, table

logger = logging.getLogger(__name__)


def _rss(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _percentile(xs: list, q: float) -> Optional[float]:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _start(model: Optional[str], port: int, state_dir: str, n_sink: int, capacity: int, dense: bool):
    import http.client

    command = [os.path.join(os.path.dirname(sys.executable), "kvpress-lite"), "serve", "--port", str(port),
               "--state-dir", state_dir, "--n-sink", str(n_sink), "--capacity", str(capacity), "--threads", "1"]
    command += ["--model", model] if model else []
    command += ["--dense"] if dense else []
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v1/models")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the server did not start: {proc.stderr.read()[-2000:]}")


def _user(client: Any, model: str, lines: list, turns: int, max_tokens: int, timeout_s: float, out: list,
          turn_ends: dict, user: int, progress: Any) -> None:
    messages: list = []
    for turn in range(turns):
        messages.append({"role": "user", "content": lines[(user * 7 + turn) % len(lines)]})
        record = {"user": user, "turn": turn + 1, "error": None}
        start = time.perf_counter()
        try:
            first, text, usage = None, [], None
            for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                        temperature=0, stream=True, timeout=timeout_s,
                                                        stream_options={"include_usage": True}):
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter()
                    text.append(chunk.choices[0].delta.content)
                if chunk.usage:
                    usage = chunk.usage
            end = time.perf_counter()
            n = usage.completion_tokens if usage else 0
            record.update(ttft_ms=((first or end) - start) * 1000, tokens=n,
                          ms_per_token=(end - first) * 1000 / (n - 1) if first and n > 1 else None,
                          prompt_tokens=usage.prompt_tokens if usage else None)
            messages.append({"role": "assistant", "content": "".join(text)})
        except Exception as exc:  # counted, reported; the user stops (its conversation is broken)
            record["error"] = f"{type(exc).__name__}: {exc}"[:200]
            out.append(record)
            progress.update(turns - turn)
            return
        out.append(record)
        turn_ends.setdefault(turn + 1, []).append(time.perf_counter())
        progress.update(1)


def run_mode(dense: bool, *, model: Optional[str], users: int, turns: int, max_tokens: int, n_sink: int,
             capacity: int, timeout_s: float, progress: bool) -> dict:
    """One server, ``users`` x ``turns`` streamed requests; records, memory samples, turn ends."""
    import openai
    from tqdm.auto import tqdm

    from ..chat import DEFAULT_SCRIPT, read_script
    from ..embedded import model_display_name

    lines = read_script(DEFAULT_SCRIPT)
    state_dir = tempfile.mkdtemp(prefix="kvpress-lite-load-")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _start(model, port, state_dir, n_sink, capacity, dense)
    name = model_display_name(model) if model else model_display_name("default")
    samples, records, turn_ends, stop = [], [], {}, threading.Event()
    t0 = time.perf_counter()

    def sample() -> None:
        while not stop.is_set():
            rss = _rss(proc.pid)
            if rss:
                samples.append((round(time.perf_counter() - t0, 2), rss))
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    bar = tqdm(total=users * turns, desc="dense" if dense else "press", unit="turn", file=sys.stderr,
               disable=not progress)
    try:
        threads = [threading.Thread(target=_user, args=(
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="load", max_retries=0), name, lines, turns,
            max_tokens, timeout_s, records, turn_ends, u, bar)) for u in range(users)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        bar.close()
        stop.set()
        sampler.join(5)
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(state_dir, ignore_errors=True)
    wall = time.perf_counter() - t0
    by_turn = []
    for turn in range(1, turns + 1):
        rows = [r for r in records if r["turn"] == turn and not r["error"]]
        end = max((t - t0 for t in turn_ends.get(turn, [])), default=None)
        rss_at = next((rss for t, rss in samples if end is not None and t >= end), samples[-1][1] if samples else None)
        by_turn.append({"turn": turn, "served": len(rows),
                        "ttft_p50_ms": _percentile([r["ttft_ms"] for r in rows], 0.5),
                        "ttft_p95_ms": _percentile([r["ttft_ms"] for r in rows], 0.95),
                        "ms_per_token_p50": _percentile([r["ms_per_token"] for r in rows if r["ms_per_token"]], 0.5),
                        "ms_per_token_p95": _percentile([r["ms_per_token"] for r in rows if r["ms_per_token"]], 0.95),
                        "prompt_tokens_p50": _percentile([r["prompt_tokens"] for r in rows if r["prompt_tokens"]], 0.5),
                        "rss_bytes": rss_at})
    return {"mode": "dense" if dense else "press", "requests": len(records),
            "served": sum(not r["error"] for r in records), "errors": [r["error"] for r in records if r["error"]],
            "wall_seconds": round(wall, 1), "by_turn": by_turn, "rss_samples": samples, "records": records}


def run_load(*, model: Optional[str] = None, users: int = 3, turns: int = 12, max_tokens: int = 24, n_sink: int = 4,
             capacity: int = 256, timeout_s: float = 300, modes: tuple = ("press", "dense"), progress: bool = True,
             metadata: Optional[dict] = None) -> dict:
    """Both modes, one after the other; a JSON-ready dict."""
    runs = {mode: run_mode(mode == "dense", model=model, users=users, turns=turns, max_tokens=max_tokens,
                           n_sink=n_sink, capacity=capacity, timeout_s=timeout_s, progress=progress)
            for mode in modes}
    summary = {}
    for mode, run in runs.items():
        turns_ = [t for t in run["by_turn"] if t["served"]]
        if len(turns_) >= 2:
            first, last = turns_[0], turns_[-1]
            summary[mode] = {
                "rss growth, turn 2 to last": (last["rss_bytes"] or 0) - (turns_[1]["rss_bytes"] or 0),
                "ms/token p50, last turn / turn 2": (last["ms_per_token_p50"] or 0) / (turns_[1]["ms_per_token_p50"] or 1),
                "ttft p50, last turn / turn 2": (last["ttft_p50_ms"] or 0) / (turns_[1]["ttft_p50_ms"] or 1),
                "first turn ttft p50 ms": first["ttft_p50_ms"],
            }
    meta = dict(metadata or {}, users=users, turns=turns, max_tokens=max_tokens, n_sink=n_sink, capacity=capacity)
    return {"metadata": meta, "runs": runs, "summary": summary}


def markdown(results: dict) -> str:
    meta = results["metadata"]
    lines = [f"# kvpress-lite serve under load: {meta['users']} users x {meta['turns']} turns, streamed, "
             f"{meta['max_tokens']} tokens a reply (press: {meta['n_sink']} sinks, capacity {meta['capacity']})", ""]
    if meta.get("command"):
        lines.append(f"- command: `{meta['command']}`")
    if meta.get("machine"):
        lines.append(f"- machine: {machine_line(meta)}; server with 1 torch thread, one turn at a time")
    for mode, run in results["runs"].items():
        lines.append(f"- {mode}: {run['served']} of {run['requests']} requests served, {len(run['errors'])} errors, "
                     f"{run['wall_seconds']} s")
    lines += ["", "Per turn number (p50 / p95 over the users; RSS of the server when the turn's last reply ended):", ""]
    header = ["turn"]
    for mode in results["runs"]:
        header += [f"{mode} prompt tok", f"{mode} TTFT ms", f"{mode} ms/token", f"{mode} RSS"]
    rows = []
    turns = len(next(iter(results["runs"].values()))["by_turn"])
    for k in range(turns):
        row = [str(k + 1)]
        for run in results["runs"].values():
            t = run["by_turn"][k]
            row += [fmt(t["prompt_tokens_p50"], 0), f"{fmt(t['ttft_p50_ms'], 0)} / {fmt(t['ttft_p95_ms'], 0)}",
                    f"{fmt(t['ms_per_token_p50'], 1)} / {fmt(t['ms_per_token_p95'], 1)}", human_bytes(t["rss_bytes"])]
        rows.append(row)
    lines += table(header, rows)
    lines += ["", "Summary:", ""]
    lines += table(["measure"] + list(results["summary"]),
                   [[k] + [human_bytes(s[k]) if "rss" in k else fmt(s[k], 2) for s in results["summary"].values()]
                    for k in next(iter(results["summary"].values()), {})])
    return "\n".join(lines) + "\n"


def plot(results: dict, path) -> None:
    """Server RSS over the run and per-token latency by turn, press beside dense."""
    fig, (ax_mem, ax_lat) = pyplot().subplots(1, 2, figsize=(12, 4))
    colours = {"press": "tab:blue", "dense": "tab:red"}
    for mode, run in results["runs"].items():
        ts = [t for t, _ in run["rss_samples"]]
        ax_mem.plot(ts, [r / 2**20 for _, r in run["rss_samples"]], color=colours.get(mode), label=mode)
        turns = [t for t in run["by_turn"] if t["ms_per_token_p50"]]
        ax_lat.plot([t["turn"] for t in turns], [t["ms_per_token_p50"] for t in turns], "o-", color=colours.get(mode),
                    label=f"{mode}: ms/token p50")
        ax_lat.plot([t["turn"] for t in turns], [t["ttft_p50_ms"] / 10 for t in turns], "s--",
                    color=colours.get(mode), alpha=0.6, label=f"{mode}: TTFT p50 / 10")
    meta = results["metadata"]
    ax_mem.set(xlabel="seconds into the run", ylabel="server RSS, MiB", ylim=(0, None),
               title=f"{meta['users']} users x {meta['turns']} turns")
    ax_lat.set(xlabel="turn", ylabel="ms", ylim=(0, None), title="latency by turn (flat is the claim)")
    for a in (ax_mem, ax_lat):
        a.grid(True, alpha=0.3)
        a.legend(fontsize=8)
    save(fig, path)
