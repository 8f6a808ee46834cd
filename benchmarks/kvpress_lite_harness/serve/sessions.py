"""Sessions of the server: pressed conversations found from the messages a client sends.

Every OpenAI client sends the whole message list each turn. A session is a
:class:`kvpress_lite.Chat` (one stream of the server's one press) filed under the digest of
the messages it holds, its last reply included (:func:`kvpress_lite.chat.messages_key`).
A request continues the session filed under its longest prefix that ends with an
assistant message; anything else (a new conversation, an edited or branched one) starts
a new session from the whole list, so an edit is never continued silently.

Memory is bounded: at most ``max_sessions`` chats in memory, the least recently used
dropped first. Each completed turn is written to ``state_dir/<digest>.safetensors``
(atomically, :meth:`kvpress_lite.Chat.save`) before the old file goes, so a session
dropped from memory, or lost with a killed server, is read back from disk by its next
request. A turn that fails part-way (a client that disconnects mid-stream) drops the
session from memory; its file still holds the state before that turn.

>>> store = SessionStore(model, tokenizer, press, state_dir="sessions", max_sessions=64)  # doctest: +SKIP
>>> session = store.find(messages)                                                       # doctest: +SKIP
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from kvpress_lite.chat import Chat, messages_key

logger = logging.getLogger(__name__)


class SessionBusy(RuntimeError):
    """The conversation this request continues has a turn in flight."""


@dataclass
class Session:
    chat: Chat
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    key: Optional[str] = None  # digest of the messages held; None until the first reply
    origin: str = "new"  # where this request found it: new, memory or disk
    busy: bool = False


class SessionStore:
    """Sessions by the digest of their messages, in memory (LRU) and on disk."""

    def __init__(self, model: Any, tokenizer: Any, press: Any, state_dir: str | Path, max_sessions: int = 64) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {max_sessions}")
        self.model, self.tokenizer, self.press = model, tokenizer, press
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.max_sessions = max_sessions
        self._memory: OrderedDict[str, Session] = OrderedDict()  # key -> session
        self._lock = threading.Lock()
        self.counts = {"new": 0, "memory": 0, "disk": 0, "dropped": 0}

    def _path(self, key: str) -> Path:
        return self.state_dir / f"{key}.safetensors"

    def _new_chat(self) -> Chat:
        return Chat(self.model, self.tokenizer, press=self.press)

    def find(self, messages: Sequence[dict]) -> Session:
        """The session ``messages`` continue (marked busy), or a new one. Raises
        :class:`SessionBusy` when that session has a turn in flight."""
        prefixes = [k for k in range(len(messages) - 1, 0, -1) if messages[k - 1].get("role") == "assistant"]
        with self._lock:
            for k in prefixes:
                key = messages_key(messages[:k])
                session = self._memory.get(key)
                if session is not None:
                    if session.busy:
                        raise SessionBusy(key)
                    self._memory.move_to_end(key)
                    session.busy, session.origin = True, "memory"
                    break
                if self._path(key).exists():
                    chat = self._new_chat()
                    chat.restore(self._path(key))
                    session = Session(chat, key=key, origin="disk", busy=True)
                    self._memory[key] = session
                    break
            else:
                session = Session(self._new_chat(), busy=True)
            self.counts[session.origin] += 1
            self._shrink()
            return session

    def commit(self, session: Session) -> None:
        """After a completed turn: file the session under its new digest, on disk then in memory."""
        old, new = session.key, session.chat.key
        session.chat.save(self._path(new))
        with self._lock:
            if old is not None:
                self._memory.pop(old, None)
                if old != new:
                    self._path(old).unlink(missing_ok=True)
            session.key, session.busy = new, False
            self._memory[new] = session
            self._shrink()

    def abandon(self, session: Session) -> None:
        """A turn failed part-way: forget the session in memory (its file keeps the turn before)."""
        with self._lock:
            if session.key is not None:
                self._memory.pop(session.key, None)
            session.busy = False
            self.counts["dropped"] += 1

    def _shrink(self) -> None:
        while len(self._memory) > self.max_sessions:
            key = next((k for k, s in self._memory.items() if not s.busy), None)
            if key is None:
                return
            del self._memory[key]  # its file holds its last completed turn
            logger.info("session %s dropped from memory (more than %d); it stays on disk", key, self.max_sessions)

    @property
    def in_memory(self) -> int:
        return len(self._memory)
