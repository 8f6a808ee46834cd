"""The OpenAI-compatible HTTP app: ``POST /v1/chat/completions`` (streamed or not), ``GET /v1/models``.

One model, one press, many sessions (:mod:`.sessions`). The model runs in one worker
thread, one turn at a time: requests queue for it in arrival order (honest queueing, no
batching), and a second request for a conversation whose turn is in flight gets 409.
Every bad input gets an OpenAI-style error object (``{"error": {"message", "type",
"param", "code"}}``) with a 4xx status.

Beyond the OpenAI fields the response carries ``kvpress_lite``: the session, where it was
found (``new``, ``memory``, ``disk``), the conversation's length and the cache's entries
per layer; ``usage.prompt_tokens_details.cached_tokens`` counts the conversation tokens
the turn did not have to feed again.

>>> app = build_app(store, ServerSettings(model_name="smollm2"))     # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import torch

from kvpress_lite.chat import ChatError

from .sessions import Session, SessionBusy, SessionStore

logger = logging.getLogger(__name__)

ROLES = {"system", "developer", "user", "assistant", "tool"}


@dataclass
class ServerSettings:
    model_name: str
    api_key: Optional[str] = None
    max_request_tokens: int = 8192  # most tokens of one message
    default_max_tokens: int = 256
    max_tokens_limit: int = 4096


class RequestError(Exception):
    """A request the server refuses: its status and the OpenAI error fields."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Cancelled(Exception):
    """The client went away mid-stream: generation stops at the next token."""


@dataclass
class Turn:
    """A validated request."""

    messages: list
    stream: bool
    max_tokens: int
    temperature: float
    top_p: float
    stop: list
    seed: Optional[int]
    logprobs: Optional[int]
    include_usage: bool


def _text_of(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(400, f"messages[{index}].content: only text parts are served (got {part!r:.60})",
                                   param=f"messages[{index}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(400, f"messages[{index}].content must be a string or a list of text parts",
                       param=f"messages[{index}].content")


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            (low < value if low_open else low <= value) and value <= high):
        raise RequestError(400, f"{name} must be a number in {'(' if low_open else '['}{low}, {high}], got {value!r}",
                           param=name)
    return float(value)


def parse_request(body: Any, settings: ServerSettings, count_tokens) -> Turn:
    """Check a chat-completions body; raises :class:`RequestError` naming the field at fault."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "model is required (GET /v1/models lists the one served)", param="model")
    if model != settings.model_name:
        raise RequestError(404, f"the model {model!r} does not exist; this server serves {settings.model_name!r}",
                           type_="invalid_request_error", param="model", code="model_not_found")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise RequestError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(400, f"messages[{i}].role must be one of {sorted(ROLES)}, got "
                                    f"{m.get('role') if isinstance(m, dict) else m!r}", param=f"messages[{i}].role")
        text = _text_of(m.get("content", ""), i)
        n = count_tokens(text)
        if n > settings.max_request_tokens:
            raise RequestError(400, f"messages[{i}] has {n} tokens, more than this server's --max-request-tokens "
                                    f"{settings.max_request_tokens}", param=f"messages[{i}].content",
                               code="context_length_exceeded")
        messages.append({"role": "system" if m["role"] == "developer" else m["role"], "content": text})
    if messages[-1]["role"] == "assistant":
        raise RequestError(400, "the last message is the assistant's: end with the turn to answer", param="messages")
    n = body.get("n")
    if n not in (None, 1):
        raise RequestError(400, "only n=1 is served", param="n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = settings.default_max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= settings.max_tokens_limit:
        raise RequestError(400, f"max_tokens must be an integer in [1, {settings.max_tokens_limit}], got {max_tokens!r}",
                           param="max_tokens")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(400, "stop must be a string or a list of at most 4 non-empty strings", param="stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(400, f"seed must be an integer, got {seed!r}", param="seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "stream must be true or false", param="stream")
    logprobs = None
    if body.get("logprobs"):
        top = body.get("top_logprobs") or 0
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20:
            raise RequestError(400, "top_logprobs must be an integer in [0, 20]", param="top_logprobs")
        logprobs = top
    options = body.get("stream_options") or {}
    return Turn(messages=messages, stream=stream, max_tokens=max_tokens,
                temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True), stop=stop, seed=seed, logprobs=logprobs,
                include_usage=bool(isinstance(options, dict) and options.get("include_usage")))


class _Streamer:
    """A generate() streamer: the tokens of the reply, passed to the event loop; stops the
    generation by raising when the client has gone."""

    def __init__(self, push, cancelled: threading.Event) -> None:
        self.push, self.cancelled, self.prompt_seen = push, cancelled, False

    def put(self, value: torch.Tensor) -> None:
        if self.cancelled.is_set():
            raise _Cancelled()
        if self.prompt_seen:
            self.push(("tokens", value.reshape(-1).tolist()))
        self.prompt_seen = True

    def end(self) -> None:
        pass


class TextDeltas:
    """The reply's text as it grows, emitted only where it is final: after leading whitespace,
    before trailing whitespace, an unfinished UTF-8 character or a possible stop string's
    start; so the deltas concatenate to exactly the final (stripped, cut) reply."""

    def __init__(self, tokenizer: Any, stop: list) -> None:
        self.tokenizer, self.stop, self.ids, self.sent = tokenizer, stop, [], ""
        self.hold = max((len(s) for s in stop), default=1) - 1

    def add(self, ids: list) -> str:
        self.ids += ids
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        cut = min((at for at in (text.find(s) for s in self.stop) if at >= 0), default=-1)
        if cut >= 0:
            text = text[:cut]
        elif self.hold:
            text = text[: max(0, len(text) - self.hold)]
        text = text.rstrip().rstrip("\ufffd")
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def rest(self, final: str) -> str:
        if not final.startswith(self.sent):
            logger.warning("streamed text %r is not a prefix of the reply %r", self.sent[-40:], final[:40])
            return ""
        return final[len(self.sent):]


def _usage(session: Session) -> dict:
    last = session.chat.last
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": len(last.ids),
            "total_tokens": last.prompt_tokens + len(last.ids),
            "prompt_tokens_details": {"cached_tokens": last.prompt_tokens - last.fed_tokens}}


def _extension(session: Session) -> dict:
    from kvpress_lite.cache_access import cache_layers, layer_length

    chat = session.chat
    return {"session": session.id, "found": session.origin, "conversation_tokens": int(chat.sequences.shape[1]),
            "cache_length": [layer_length(layer) for layer in cache_layers(chat.cache)],
            "capacity": chat.press.capacity if chat.press is not None else None}


def _logprobs_field(session: Session, tokenizer: Any) -> Optional[dict]:
    lps = session.chat.last.logprobs
    if lps is None:
        return None
    piece = lambda i: tokenizer.decode([i])  # noqa: E731
    return {"content": [{"token": piece(t), "logprob": lp, "bytes": list(piece(t).encode()),
                         "top_logprobs": [{"token": piece(i), "logprob": v, "bytes": list(piece(i).encode())}
                                          for i, v in top]} for t, lp, top in lps]}


class Server:
    """The state behind the app: settings, sessions, the model's worker thread."""

    def __init__(self, store: SessionStore, settings: ServerSettings) -> None:
        self.store, self.settings = store, settings
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvpress-lite-model")
        self.served = self.failed = 0

    def count_tokens(self, text: str) -> int:
        return len(self.store.tokenizer(text, add_special_tokens=False)["input_ids"])

    def run_turn(self, session: Session, turn: Turn, streamer: Optional[_Streamer]) -> None:
        """In the worker thread: one reply, then the session filed (or dropped if it failed)."""
        kwargs: dict = {"do_sample": turn.temperature > 0}
        if turn.temperature > 0:
            kwargs.update(temperature=turn.temperature, top_p=turn.top_p)
        if turn.seed is not None:
            torch.manual_seed(turn.seed)
        try:
            session.chat.reply(turn.messages, max_new_tokens=turn.max_tokens, stop=turn.stop or None,
                               logprobs=turn.logprobs, streamer=streamer, **kwargs)
            self.store.commit(session)
            self.served += 1
        except BaseException:
            self.store.abandon(session)
            self.failed += 1
            raise

    def response(self, session: Session, turn: Turn, completion_id: str) -> dict:
        last = session.chat.last
        choice = {"index": 0, "message": {"role": "assistant", "content": last.text},
                  "finish_reason": last.finish_reason, "logprobs": _logprobs_field(session, self.store.tokenizer)}
        return {"id": completion_id, "object": "chat.completion", "created": int(time.time()),
                "model": self.settings.model_name, "choices": [choice], "usage": _usage(session),
                "kvpress_lite": _extension(session)}


def build_app(store: SessionStore, settings: ServerSettings) -> Any:
    """The Starlette app serving ``store``'s model."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    server = Server(store, settings)

    def error(exc: RequestError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {settings.api_key}":
            raise RequestError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                               type_="authentication_error", code="invalid_api_key")

    async def models(request: Request) -> JSONResponse:
        try:
            authorize(request)
        except RequestError as exc:
            return error(exc)
        return JSONResponse({"object": "list", "data": [{"id": settings.model_name, "object": "model",
                                                         "created": 0, "owned_by": "kvpress-lite"}]})

    async def completions(request: Request) -> Any:
        try:
            authorize(request)
            try:
                body = json.loads(await request.body())
            except (ValueError, UnicodeDecodeError) as exc:
                raise RequestError(400, f"the request body is not valid JSON: {exc}") from exc
            turn = parse_request(body, settings, server.count_tokens)
            try:
                session = store.find(turn.messages)
            except SessionBusy:
                raise RequestError(409, "this conversation has a turn in flight; send the next turn after its reply",
                                   type_="conflict_error", code="session_busy") from None
        except RequestError as exc:
            return error(exc)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        loop = asyncio.get_running_loop()
        if not turn.stream:
            try:
                await loop.run_in_executor(server.worker, server.run_turn, session, turn, None)
            except ChatError as exc:
                return error(RequestError(400, str(exc), param="messages"))
            except Exception as exc:  # a bug or the model failing: the session is dropped, the server goes on
                logger.exception("turn failed")
                return error(RequestError(500, f"the turn failed: {exc}", type_="server_error"))
            return JSONResponse(server.response(session, turn, completion_id),
                                headers={"x-kvpress-lite-session": session.id})
        return StreamingResponse(_events(server, session, turn, completion_id, loop), media_type="text/event-stream",
                                 headers={"x-kvpress-lite-session": session.id, "cache-control": "no-cache"})

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(RequestError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                  code="not_found" if exc.status_code == 404 else None))

    app = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"]),
                            Route("/v1/models", models, methods=["GET"])],
                    exception_handlers={HTTPException: http_error})
    app.state.server = server
    return app


async def _events(server: Server, session: Session, turn: Turn, completion_id: str, loop: Any):
    """Server-sent events of one streamed turn; a client gone mid-stream stops the generation."""
    queue: asyncio.Queue = asyncio.Queue()
    cancelled = threading.Event()

    def push(item: tuple) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def job() -> None:
        try:
            server.run_turn(session, turn, _Streamer(push, cancelled))
            push(("done", None))
        except _Cancelled:
            logger.info("client left mid-stream: session %s stays as before the turn", session.id)
        except BaseException as exc:  # noqa: BLE001 - reported to the client as an error event
            push(("error", exc))

    def chunk(delta: dict, finish: Optional[str] = None, **extra: Any) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": server.settings.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    deltas = TextDeltas(server.store.tokenizer, turn.stop)
    future = loop.run_in_executor(server.worker, job)
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await queue.get()
            if kind == "tokens":
                text = deltas.add(value)
                if text:
                    yield chunk({"content": text})
            elif kind == "error":
                err = RequestError(400 if isinstance(value, ChatError) else 500, f"the turn failed: {value}",
                                   type_="invalid_request_error" if isinstance(value, ChatError) else "server_error")
                yield f"data: {json.dumps(err.body())}\n\n"
                break
            else:
                last = session.chat.last
                rest = deltas.rest(last.text)
                if rest:
                    yield chunk({"content": rest})
                yield chunk({}, last.finish_reason, kvpress_lite=_extension(session))
                if turn.include_usage:
                    body = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
                            "model": server.settings.model_name, "choices": [], "usage": _usage(session)}
                    yield f"data: {json.dumps(body)}\n\n"
                yield "data: [DONE]\n\n"
                break
    finally:
        cancelled.set()  # a no-op once the turn is done; stops it at its next token when the client left
        del future
