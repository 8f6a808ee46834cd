"""``kvpress-lite serve``: an OpenAI-compatible endpoint whose sessions stay at constant memory.

::

    kvpress-lite serve                         # the embedded SmolLM2 on http://127.0.0.1:8000/v1
    kvpress-lite serve --model DIR --capacity 512 --port 8080 --api-key secret --state-dir sessions/

Any OpenAI client talks to it::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    messages = [{"role": "user", "content": "Hello!"}]
    reply = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages)

Sessions are found from the messages (:mod:`.sessions`), served one turn at a time by one
model thread (:mod:`.app`), and written to ``--state-dir`` after every turn, so a
restarted server continues them. Needs the ``serve`` extra (starlette, uvicorn).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def default_state_dir(model_name: str, n_sink: int, capacity: int) -> Path:
    from ..embedded import _cache_base

    return _cache_base() / "sessions" / f"{model_name}-s{n_sink}-c{capacity}"


def make_app(model: Any, tokenizer: Any, *, model_name: str, n_sink: int = 4, capacity: int = 256,
             state_dir: str | Path, max_sessions: int = 64, api_key: str | None = None,
             max_request_tokens: int = 8192, max_tokens: int = 256, dense: bool = False) -> Any:
    """Press ``model`` and build the app (the press stays on the model for the app's life).
    ``dense=True``: no press, the same server otherwise (the baseline of ``kvpress-lite bench-serve``).

    >>> app = make_app(model, tokenizer, model_name="tiny", state_dir="/tmp/s")   # doctest: +SKIP
    """
    import kvpress_lite as kvl
    from kvpress_lite.chat import ChatTemplate

    from .app import ServerSettings, build_app
    from .sessions import SessionStore

    ChatTemplate(tokenizer)  # refuses a tokenizer without a chat template before anything is pressed
    press = False if dense else kvl.apply_press(model, n_sink=n_sink, capacity=capacity)
    store = SessionStore(model, tokenizer, press, state_dir=state_dir, max_sessions=max_sessions)
    settings = ServerSettings(model_name=model_name, api_key=api_key, max_request_tokens=max_request_tokens,
                              default_max_tokens=max_tokens)
    return build_app(store, settings)


def add_parser(subparsers) -> Any:
    """Register ``kvpress-lite serve``."""
    p = subparsers.add_parser(
        "serve", help="an OpenAI-compatible chat endpoint: pressed sessions at flat memory, kept across restarts",
        description="POST /v1/chat/completions (streamed or not) and GET /v1/models for one model under one "
                    "StreamingLLM press. A client sending the growing message list continues its session (only the "
                    "new turn is fed); sessions are written to --state-dir after every turn and resumed after a "
                    "restart.")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="a local model folder whose tokenizer has a chat template, or an embedded model's name "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--n-sink", type=int, default=4)
    p.add_argument("--capacity", type=int, default=256, help="cache entries per layer (default %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--state-dir", default=None, help="where sessions are written (default: under the kvpress-lite "
                                                     "cache folder, one per model and press settings)")
    p.add_argument("--max-sessions", type=int, default=64, help="sessions held in memory (default %(default)s)")
    p.add_argument("--max-request-tokens", type=int, default=8192,
                   help="most tokens of one message (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=256, help="reply length when a request names none")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--dense", action="store_true",
                   help="no press: the same server with the dense model, whose memory grows every turn (a baseline)")
    p.set_defaults(func=run)
    return p


def run(args: Any) -> int:
    try:
        import uvicorn
    except ImportError:
        print("kvpress-lite serve needs starlette and uvicorn: pip install 'kvpress-lite-harness[serve]'",
              file=sys.stderr)
        return 2
    import torch

    from kvpress_lite.errors import KVPressLiteError

    from ..chat import load_chat_model
    from ..embedded import ModelNotAvailableError, model_display_name

    if args.capacity <= args.n_sink:
        print(f"kvpress-lite serve: --capacity ({args.capacity}) must exceed --n-sink ({args.n_sink})", file=sys.stderr)
        return 2
    if args.max_sessions < 1 or args.max_request_tokens < 1 or args.max_tokens < 1:
        print("kvpress-lite serve: --max-sessions, --max-request-tokens and --max-tokens must be at least 1",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tokenizer = load_chat_model(args.model)
        name = model_display_name(args.model) if args.model else model_display_name("default")
        state_dir = Path(args.state_dir) if args.state_dir else default_state_dir(name, args.n_sink, args.capacity)
        app = make_app(model, tokenizer, model_name=name, n_sink=args.n_sink, capacity=args.capacity,
                       state_dir=state_dir, max_sessions=args.max_sessions, api_key=args.api_key,
                       max_request_tokens=args.max_request_tokens, max_tokens=args.max_tokens, dense=args.dense)
    except (KVPressLiteError, ModelNotAvailableError, ValueError, OSError) as exc:
        print(f"kvpress-lite serve: {exc}", file=sys.stderr)
        return 2
    what = "dense, no press" if args.dense else f"n_sink={args.n_sink}, capacity={args.capacity}"
    print(f"serving {name} ({what}) on http://{args.host}:{args.port}/v1; "
          f"sessions in {state_dir}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
