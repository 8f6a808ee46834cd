"""A chat that never ends, through ``model.generate()`` under one StreamingLLM press.

Each turn continues the conversation the way the press requires (see
:mod:`kvpress_lite.conversation`): the previous call's cache is passed back, and the input is
the previous call's ``sequences`` with the *new turn's* token ids appended. The whole
conversation is never re-tokenized: a model's reply, decoded and encoded again, need not
give back the tokens it generated, and the press checks that the repeated tokens are the
ones it took in.

Rendering only the new turn. :class:`ChatTemplate` renders, with the tokenizer's own chat
template, the conversation so far with a marker in place of the last reply, followed by the
new user message and the generation prompt, and keeps the text after the marker: what the
template writes after a reply (``<|im_end|>\\n`` for ChatML templates such as SmolLM2's),
the new user turn and the assistant header. When the reply ended with the end-of-turn token
(generation stops on it, so it is already in ``sequences``), its text is dropped from the
front; a reply cut at ``max_new_tokens`` gets the end-of-turn text from the template. For
SmolLM2 (ChatML):

    first turn   <|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n
    reply        Hello! How can I help?<|im_end|>                    (generated, EOS included)
    next turn    \\n<|im_start|>user\\nBye<|im_end|>\\n<|im_start|>assistant\\n

whose concatenation is exactly what the template renders for the whole conversation
(tested). Special tokens split the text, so each piece tokenizes as it would in the whole.

The ``kvpress-lite chat`` command (:func:`add_parser`, :func:`run`) closes this module: only
it prints; the rest logs.

>>> from kvpress_lite_harness.chat import ChatSession, format_status                   # doctest: +SKIP
>>> with ChatSession(model, tokenizer, n_sink=4, capacity=256) as chat:        # doctest: +SKIP
...     turn = chat.send("Hello!")
...     print(turn.reply, format_status(turn))
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from kvpress_lite.chat import ChatError, ChatTemplate, stop_token_ids
from kvpress_lite.errors import KVPressLiteError

logger = logging.getLogger(__name__)

DEFAULT_N_SINK = 4
DEFAULT_CAPACITY = 256
DEFAULT_MAX_NEW_TOKENS = 200
DEFAULT_SCRIPT = Path(__file__).resolve().parent / "data" / "chat_script.json"


# ------------------------------------------------------------------------------- a session


@dataclass
class Turn:
    """One exchange and the state after it.

    ``user_tokens``: ids appended for the user turn (template text included);
    ``generated_tokens``: tokens of the reply (its end-of-turn token included when it came);
    ``stopped``: ``"eos"`` or ``"max_new_tokens"``; ``conversation_tokens``: length of
    ``sequences`` after the reply; ``cache_length``: entries per layer; ``evicted_tokens``:
    entries evicted per layer so far; ``rss_bytes``: resident memory of the process (None
    without psutil); ``first_token_ms``: from the call to the first reply token (feeding the
    user turn); ``ms_per_token``: per reply token after the first.
    """

    turn: int
    user: str
    reply: str
    user_tokens: int
    generated_tokens: int
    stopped: str
    conversation_tokens: int
    cache_length: list[int]
    capacity: int
    evicted_tokens: int
    rss_bytes: Optional[int]
    seconds: float
    first_token_ms: float
    ms_per_token: float
    reply_ids: list[int] = field(default_factory=list, repr=False)


def rss_bytes() -> Optional[int]:
    """Resident set size of this process, or None when psutil is not installed."""
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process(os.getpid()).memory_info().rss)


class _Timing:
    """A generate() streamer that notes when each new token arrives and passes everything on."""

    def __init__(self, inner: Any = None):
        self.inner, self.times, self._prompt_seen = inner, [], False

    def put(self, value):
        if self._prompt_seen:  # generate() puts the prompt first, then one token (per row) at a time
            self.times.append(time.perf_counter())
        self._prompt_seen = True
        if self.inner is not None:
            self.inner.put(value)

    def end(self):
        if self.inner is not None:
            self.inner.end()


class ChatSession:
    """A conversation with ``model`` through ``generate()`` under one StreamingLLM press.

    The press is attached on creation and removed by :meth:`close` (or leaving a ``with``
    block). :meth:`send` plays one user message and returns a :class:`Turn`. Greedy by
    default; ``do_sample=True`` with optional ``temperature`` / ``top_p`` samples.
    """

    def __init__(self, model: Any, tokenizer: Any, *, n_sink: int = DEFAULT_N_SINK,
                 capacity: int = DEFAULT_CAPACITY, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 do_sample: bool = False, temperature: Optional[float] = None, top_p: Optional[float] = None,
                 system: Optional[str] = None):
        import kvpress_lite as kvl
        from kvpress_lite.cache_access import model_cache_kwarg

        if max_new_tokens < 1:
            raise ChatError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        self.model, self.tokenizer, self.n_sink = model, tokenizer, n_sink
        self.template = ChatTemplate(tokenizer, system)
        self.max_new_tokens, self.do_sample = max_new_tokens, do_sample
        self.sampling = {}
        if do_sample:
            self.sampling = {k: v for k, v in (("temperature", temperature), ("top_p", top_p)) if v is not None}
        self.stop_ids = stop_token_ids(model, tokenizer, self.template)
        pad = getattr(model.generation_config, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else self.stop_ids[0]
        self.cache_kwarg = model_cache_kwarg(model)
        self.sequences: Optional[torch.Tensor] = None
        self.cache: Any = None
        self.history: list[dict] = []
        self.turns: list[Turn] = []
        self._broken = False
        self.press = kvl.apply_press(model, n_sink=n_sink, capacity=capacity)
        logger.info("chat on %s: n_sink=%d, capacity=%d, stop tokens %s", type(model).__name__, n_sink, capacity,
                    self.stop_ids)

    @property
    def conversation_tokens(self) -> int:
        return 0 if self.sequences is None else int(self.sequences.shape[1])

    def new_turn_ids(self, message: str) -> list[int]:
        """The ids :meth:`send` appends for ``message``."""
        if self.sequences is None:
            return self.template.first_turn(message)
        return self.template.next_turn(self.history[:-1], message, int(self.sequences[0, -1]))

    def send(self, message: str, streamer: Any = None) -> Turn:
        """Play one user message; ``streamer`` (e.g. a ``TextStreamer``) receives the reply as it comes."""
        from kvpress_lite.cache_access import output_cache

        if self._broken:
            raise ChatError("the previous turn was interrupted, so the cache and the conversation no longer agree; "
                            "start a new session")
        if self.press is None:
            raise ChatError("the session is closed")
        new = torch.tensor([self.new_turn_ids(message)], dtype=torch.long)
        inputs = new if self.sequences is None else torch.cat([self.sequences, new], dim=1)
        extra = {} if self.cache is None else {self.cache_kwarg: self.cache}
        timing = _Timing(streamer)
        self._broken = True  # until the call returns
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(
                inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=self.max_new_tokens,
                do_sample=self.do_sample, eos_token_id=self.stop_ids, pad_token_id=self.pad_token_id,
                return_dict_in_generate=True, streamer=timing, **self.sampling, **extra)
        seconds = time.perf_counter() - start
        self._broken = False
        self.sequences, self.cache = out.sequences, output_cache(out)
        reply_ids = out.sequences[0, inputs.shape[1]:].tolist()
        reply = self.tokenizer.decode(reply_ids, skip_special_tokens=True).strip()
        self.history += [{"role": "user", "content": message}, {"role": "assistant", "content": reply}]
        times = timing.times
        first_ms = (times[0] - start) * 1000 if times else seconds * 1000
        if len(times) >= 2:
            per_token = (times[-1] - times[0]) * 1000 / (len(times) - 1)
        else:
            per_token = seconds * 1000 / max(1, len(reply_ids))
        stats = self.press.stats
        turn = Turn(
            turn=len(self.turns) + 1, user=message, reply=reply, user_tokens=int(new.shape[1]),
            generated_tokens=len(reply_ids),
            stopped="eos" if reply_ids and reply_ids[-1] in self.stop_ids else "max_new_tokens",
            conversation_tokens=self.conversation_tokens, cache_length=list(stats.cache_length),
            capacity=int(stats.capacity), evicted_tokens=int(stats.evicted_tokens), rss_bytes=rss_bytes(),
            seconds=round(seconds, 3), first_token_ms=round(first_ms, 1), ms_per_token=round(per_token, 1),
            reply_ids=reply_ids,
        )
        self.turns.append(turn)
        logger.info("turn %d: %s", turn.turn, format_status(turn))
        return turn

    def close(self) -> None:
        """Remove the press; the model behaves as before."""
        if self.press is not None:
            self.press.remove()
            self.press = None

    def __enter__(self) -> "ChatSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def transcript(self, **meta: Any) -> dict:
        """The conversation with per-turn stats, as written by ``kvpress-lite chat --json-out``."""
        return {
            **meta,
            "n_sink": self.n_sink,
            "capacity": self.turns[-1].capacity if self.turns else None,
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            **({"sampling": self.sampling} if self.sampling else {}),
            "system": self.template.system,
            "stop_token_ids": self.stop_ids,
            "conversation_tokens": self.conversation_tokens,
            "turns": [asdict(t) for t in self.turns],
        }


# --------------------------------------------------------------------------------- helpers


def format_status(turn: Turn) -> str:
    """``[cache 256/256 entries · 1,834 evicted · 2,090 tokens · RSS 1.21 GiB · 38 ms/token]``"""
    lengths = turn.cache_length or [0]
    cache = f"{max(lengths)}" if min(lengths) == max(lengths) else f"{min(lengths)}-{max(lengths)}"
    rss = "RSS n/a" if turn.rss_bytes is None else f"RSS {turn.rss_bytes / 2**30:.2f} GiB"
    return (f"[cache {cache}/{turn.capacity} entries · {turn.evicted_tokens:,} evicted · "
            f"{turn.conversation_tokens:,} tokens · {rss} · {turn.ms_per_token:.0f} ms/token]")


def read_script(path: str | os.PathLike) -> list[str]:
    """User turns from ``path``: a JSON list of strings, or else one turn per line (blank lines
    and lines starting with ``#`` skipped). Raises :class:`ChatError` when it holds none."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ChatError(f"cannot read the chat script {str(path)!r}: {exc.strerror or exc}") from exc
    if text.lstrip().startswith("["):
        try:
            turns = json.loads(text)
        except ValueError as exc:
            raise ChatError(f"{path}: starts with '[' but is not valid JSON ({exc}); write a JSON list of strings, "
                            "or one user turn per line") from exc
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise ChatError(f"{path}: a JSON chat script must be a list of strings (one per user turn)")
        turns = [t.strip() for t in turns if t.strip()]
    else:
        turns = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not turns:
        raise ChatError(f"the chat script {str(path)!r} holds no user turns (one per line, or a JSON list of strings)")
    return turns


def load_chat_model(path: Optional[str] = None) -> tuple[Any, Any]:
    """``(model, tokenizer)``: the embedded default SmolLM2-135M-Instruct, or a local model folder
    (or another embedded model's name; see :func:`kvpress_lite_harness.embedded.load_model`).
    Raises :class:`ChatError` when the tokenizer has no chat template."""
    from .embedded import load_default_model, load_model

    model, tokenizer = load_default_model() if path is None else load_model(path)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        where = path or "the default model"
        raise ChatError(f"{where}: the tokenizer has no chat template; `kvpress-lite chat` needs an instruct/chat "
                        "model whose tokenizer carries one (tokenizer_config.json or chat_template.jinja)")
    return model, tokenizer


# ---------------------------------------------------------------------------- command line
# `kvpress-lite chat`: the edge of the library, where it prints for people (the code above logs).

DEMO_TURNS_HINT = "varied turns: questions, pasted logs, code, notes, tables"


def add_parser(subparsers) -> Any:
    """Register the ``chat`` subcommand on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "chat",
        help="chat with an instruct model through generate() under one press; cache and memory stay flat",
        description=(
            "Chat with an instruct model (default: the embedded SmolLM2-135M-Instruct) through model.generate() "
            "under one StreamingLLM press. Interactive by default (one user message per line; Ctrl-D, Ctrl-C or "
            "/quit ends); --script plays scripted turns. After each reply a status line (on stderr) gives the "
            "cache entries per layer, the tokens evicted so far, the conversation's length, the process's RSS "
            "and the decode speed."
        ),
    )
    p.add_argument("--model", default=None, metavar="DIR",
                   help="a local Hugging Face model folder whose tokenizer has a chat template (default: the embedded "
                        "SmolLM2-135M-Instruct)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--script", metavar="FILE",
                        help="play the user turns of FILE (one per line, or a JSON list of strings) and exit")
    source.add_argument("--demo", action="store_true",
                        help=f"play the shipped script ({DEFAULT_SCRIPT.name}: {DEMO_TURNS_HINT}) and exit")
    p.add_argument("--n-sink", type=int, default=DEFAULT_N_SINK,
                   help="first tokens kept for the whole chat (default %(default)s)")
    p.add_argument("--capacity", type=int, default=DEFAULT_CAPACITY,
                   help="cache entries kept per layer (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help="most tokens of one reply (default %(default)s)")
    p.add_argument("--system", default=None, help="system prompt (default: the template's own, if any)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (with --sample)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (with --sample)")
    p.add_argument("--seed", type=int, default=None, help="random seed (with --sample)")
    p.add_argument("--json-out", metavar="FILE", default=None,
                   help="write the transcript with per-turn stats (cache, evicted, RSS, timings) as JSON")
    p.set_defaults(func=run)
    return p


def _interactive_turns(stream, prompt: bool):
    """User messages read from ``stream`` until EOF or /quit; blank lines skipped."""
    while True:
        if prompt:
            print("you> ", end="", flush=True)
        line = stream.readline()
        if not line:  # EOF
            if prompt:
                print()
            return
        message = line.strip()
        if message in ("/quit", "/exit"):
            return
        if message:
            yield message


def run(args) -> int:
    """Run ``kvpress-lite chat``; returns the exit status."""
    import sys

    from transformers import TextStreamer

    from .embedded import ModelNotAvailableError

    if not args.sample and (args.temperature is not None or args.top_p is not None or args.seed is not None):
        print("error: --temperature, --top-p and --seed apply with --sample", file=sys.stderr)
        return 2
    for name in ("n_sink", "capacity", "max_new_tokens"):
        if getattr(args, name) < (0 if name == "n_sink" else 1):
            print(f"error: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    script = str(DEFAULT_SCRIPT) if args.demo else args.script
    try:
        scripted = read_script(script) if script else None
        model, tokenizer = load_chat_model(args.model)
        session = ChatSession(model, tokenizer, n_sink=args.n_sink, capacity=args.capacity,
                              max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                              temperature=args.temperature, top_p=args.top_p, system=args.system)
    except (KVPressLiteError, ModelNotAvailableError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.seed is not None:
        torch.manual_seed(args.seed)

    name = getattr(model.config, "name_or_path", "") or type(model).__name__
    mode = "greedy" if not args.sample else "sampling " + ", ".join(f"{k}={v}" for k, v in session.sampling.items())
    print(f"{name}: n_sink={args.n_sink}, capacity={args.capacity}, up to {args.max_new_tokens} tokens a reply, {mode}"
          + (f"; {len(scripted)} scripted turns from {script}" if scripted else "; Ctrl-D, Ctrl-C or /quit ends"),
          file=sys.stderr)
    prompt = scripted is None and sys.stdin.isatty()
    turns = iter(scripted) if scripted is not None else _interactive_turns(sys.stdin, prompt)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    interrupted = False
    try:
        for message in turns:
            if not prompt:  # echo scripted and piped turns, so that stdout is the transcript
                print(f"you> {message}")
            print("assistant> ", end="", flush=True)
            turn = session.send(message, streamer=streamer)
            sys.stdout.flush()
            print(format_status(turn), file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("\n(interrupted)", file=sys.stderr)
    finally:
        session.close()
        if args.json_out:
            data = session.transcript(model=name, script=script, interrupted=interrupted)
            path = Path(args.json_out)
            if path.parent != Path(""):
                path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if session.turns:
        _summary(session.turns, args.capacity)
    return 0


def _summary(turns: list[Turn], capacity: int) -> None:
    import sys

    full = [t for t in turns if min(t.cache_length or [0]) >= capacity]
    line = (f"{len(turns)} turn{'s' if len(turns) != 1 else ''}, {turns[-1].conversation_tokens:,} tokens, "
            f"{turns[-1].evicted_tokens:,} evicted")
    if full and full[0].rss_bytes is not None:
        line += (f"; cache at {capacity} entries from turn {full[0].turn} on; RSS {full[0].rss_bytes / 2**30:.2f} GiB "
                 f"then, {turns[-1].rss_bytes / 2**30:.2f} GiB at the end")
    decode = [t.ms_per_token for t in turns if t.generated_tokens > 1]
    if decode:
        line += f"; median {sorted(decode)[len(decode) // 2]:.0f} ms/token"
    print(line, file=sys.stderr)
