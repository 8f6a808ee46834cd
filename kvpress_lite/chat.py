"""The chat loop people write, under a press: send the whole ``messages`` list every turn.

The loop in transformers' docs re-renders the conversation with ``apply_chat_template``
each turn. Under a press that cannot work by re-tokenizing: a reply, decoded and encoded
again, need not give back the tokens the model generated, and the press checks that the
tokens repeated in a call are those it took in. :class:`Chat` keeps the loop and does the
bookkeeping instead: it holds the messages it has seen with the token ids it fed and
generated for them, and when the next ``messages`` list starts with the ones it holds, it
renders and feeds only the new messages (see :class:`ChatTemplate`), continuing the same
cache. A list that edits, drops or rewinds an earlier message (a regenerated reply, a
branch) starts a new stream from the whole list (logged; ``on_edit="raise"`` refuses it
instead), so an edited conversation is never continued silently.

>>> import kvpress_lite as kvl                                               # doctest: +SKIP
>>> chat = kvl.Chat(model, tokenizer, n_sink=4, capacity=256)                 # doctest: +SKIP
>>> messages = [{"role": "user", "content": "Hello!"}]                       # doctest: +SKIP
>>> reply = chat.reply(messages, max_new_tokens=100)                         # doctest: +SKIP
>>> messages += [{"role": "assistant", "content": reply},
...              {"role": "user", "content": "Tell me more."}]              # doctest: +SKIP
>>> reply = chat.reply(messages, max_new_tokens=100)   # feeds only the new turn  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from .errors import KVPressLiteError

logger = logging.getLogger(__name__)

# stands in for the last reply while the template renders; no template alters it
_MARK = "KVPRESSLITEREPLYMARKER7Q"


class ChatError(KVPressLiteError, ValueError):
    """A chat cannot start or go on: a tokenizer without a chat template, messages that do
    not end with a turn to answer, an edited conversation under ``on_edit="raise"``."""


class ChatTemplate:
    """Token ids of each new turn, rendered by ``tokenizer``'s chat template.

    ``first_turn(message)`` gives the ids of the (optional) system prompt, the first user
    message and the generation prompt; ``next_turn(history, message, last_token)`` the ids to
    append after a reply whose last generated token was ``last_token`` (``message``: one user
    message, or a list of new message dicts). ``end_of_turn_id`` is the token the template
    closes a reply with (None when it writes none or plain text).

    The text of a new turn is what the template writes after a marker standing in for the
    last reply: for ChatML, ``<|im_end|>\\n<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n``.
    When the reply ended with the end-of-turn token (generation stops on it, so it was
    generated), its text is dropped from the front; a reply cut at ``max_new_tokens`` gets
    it from the template. Special tokens split the text, so each piece tokenizes as it
    would in the whole conversation.

    >>> template = ChatTemplate(tokenizer)                                   # doctest: +SKIP
    >>> ids = template.first_turn("Hi")                                      # doctest: +SKIP
    """

    def __init__(self, tokenizer: Any, system: Optional[str] = None):
        if not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ChatError(
                f"the tokenizer of {name!r} has no chat template, so a conversation cannot be rendered. Use an "
                "instruct/chat model whose tokenizer_config.json (or chat_template.jinja) carries one, or set "
                "tokenizer.chat_template before starting the chat."
            )
        self.tokenizer = tokenizer
        self.system = system
        self._base = [{"role": "system", "content": system}] if system else []
        probe = [{"role": "user", "content": "Hi"}]
        self.after_reply = self._after_mark(self._render(probe + [{"role": "assistant", "content": _MARK}], False))
        ids = self.encode(self.after_reply)
        self.end_of_turn_id = ids[0] if ids and self._is_special(ids[0]) else None
        self._check_append_only()

    def _render(self, messages: list, add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(self._base + messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # jinja's TemplateError (raise_exception in templates) and the like
            raise ChatError(f"the chat template refused the conversation: {exc}") from exc

    @staticmethod
    def _after_mark(text: str) -> str:
        at = text.rfind(_MARK)
        if at < 0:
            raise ChatError("the chat template drops assistant replies from the conversation, so a turn cannot be "
                            "rendered on its own after a reply")
        return text[at + len(_MARK):]

    def _is_special(self, token_id: int) -> bool:
        return self.tokenizer.decode([token_id], skip_special_tokens=True) == ""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without added BOS/EOS (as ``apply_chat_template`` tokenizes)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def first_turn(self, message: str | Sequence[dict]) -> list[int]:
        """Ids of the whole conversation ``message`` (one user message or a list of messages)
        opens, with the generation prompt."""
        messages = [{"role": "user", "content": message}] if isinstance(message, str) else list(message)
        return self.encode(self._render(messages, True))

    def next_turn(self, history: Sequence[dict], message: str | Sequence[dict], last_token: Optional[int]) -> list[int]:
        """Ids to append after a reply: the template's text after the reply, less the
        end-of-turn token when the reply already ends with it, then the new messages and the
        generation prompt. ``history`` holds the messages before that reply."""
        new = [{"role": "user", "content": message}] if isinstance(message, str) else list(message)
        text = self._after_mark(self._render(list(history) + [{"role": "assistant", "content": _MARK}] + new, True))
        if last_token is not None and self._is_special(last_token):
            closing = self.tokenizer.decode([last_token], skip_special_tokens=False)
            if closing and text.startswith(closing):
                text = text[len(closing):]
        return self.encode(text)

    def _check_append_only(self) -> None:
        """Warn when the template re-renders earlier turns once later ones exist (the chat
        still appends, as the press requires, so it then differs from a whole-conversation render)."""
        first = self._render([{"role": "user", "content": "Hi"}], True)
        later = self._render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _MARK},
                              {"role": "user", "content": "Bye"}], True)
        if not later.startswith(first):
            logger.warning("the chat template renders earlier turns differently once later turns exist; each turn is "
                           "appended as first rendered")


def stop_token_ids(model: Any, tokenizer: Any, template: ChatTemplate) -> list[int]:
    """The model's EOS ids (its generation config, else the tokenizer's) and the template's end-of-turn token."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    if template.end_of_turn_id is not None and template.end_of_turn_id not in ids:
        ids.append(int(template.end_of_turn_id))
    if not ids:
        raise ChatError("neither the model, the tokenizer nor the chat template names an end-of-turn token, so a "
                        "reply could not end before max_new_tokens")
    return ids


@dataclass
class Reply:
    """One answer of :meth:`Chat.reply`: its text and token ids, why it ended (``"stop"``: an
    end-of-turn token or a stop string; ``"length"``: ``max_new_tokens``), the conversation's
    length before it (``prompt_tokens``), the ids fed for it (``fed_tokens``: the new messages
    only, unless a new stream started) and, when asked, per token ``(id, logprob, [(id,
    logprob), ...])``."""

    text: str
    ids: list[int]
    finish_reason: str
    prompt_tokens: int
    fed_tokens: int
    logprobs: Optional[list] = None


def _logprobs(logits: Sequence[torch.Tensor], ids: list[int], top: int) -> list:
    out = []
    for step, token in zip(logits, ids):
        lp = torch.log_softmax(step[0].float(), dim=-1)
        best = lp.topk(top) if top else None
        out.append((token, float(lp[token]),
                    [] if best is None else [(int(i), float(v)) for v, i in zip(best.values, best.indices)]))
    return out


def messages_key(messages: Sequence[dict]) -> str:
    """A stable digest of ``messages`` (role, stripped content, other fields)."""
    return hashlib.sha256(json.dumps([_key(m) for m in messages]).encode()).hexdigest()[:32]


def _key(message: Any) -> tuple:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ChatError(f"each message must be a dict with a 'role' and a 'content', got {message!r}")
    content = message.get("content")
    return (message["role"], content.strip() if isinstance(content, str) else repr(content),
            tuple(sorted((k, repr(v)) for k, v in message.items() if k not in ("role", "content"))))


class Chat:
    """One conversation with ``model`` through ``generate()`` under a StreamingLLM press,
    driven by the whole ``messages`` list each turn (see the module docstring).

    ``press``: an existing press on ``model`` to share (several chats, one press: each chat
    is its own stream); without it the chat applies one (``n_sink``, ``capacity``) and
    :meth:`close` removes it; ``press=False``: no press (the dense model, the baseline a
    measurement sets beside the press). ``on_edit``: ``"restart"`` (default: a list that does not
    extend the held conversation starts a new stream from the whole list) or ``"raise"``.

    >>> with Chat(model, tokenizer, capacity=256) as chat:                # doctest: +SKIP
    ...     reply = chat.reply([{"role": "user", "content": "Hi"}])
    """

    def __init__(self, model: Any, tokenizer: Any, *, n_sink: int = 4, capacity: int = 256, press: Any = None,
                 on_edit: str = "restart") -> None:
        from .cache_access import model_cache_kwarg

        if on_edit not in ("restart", "raise"):
            raise ChatError(f"on_edit must be 'restart' or 'raise', got {on_edit!r}")
        self.model, self.tokenizer, self.on_edit = model, tokenizer, on_edit
        self.template = ChatTemplate(tokenizer)
        self.stop_ids = stop_token_ids(model, tokenizer, self.template)
        pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else self.stop_ids[0]
        self.cache_kwarg = model_cache_kwarg(model)
        self._own_press, self.closed = press is None, False
        if press is None:
            from . import apply_press

            press = apply_press(model, n_sink=n_sink, capacity=capacity)
        self.press = press or None
        self.reset()

    def reset(self) -> None:
        """Forget the conversation: the next :meth:`reply` starts a new stream."""
        self.held: list[tuple] = []  # keys of the messages the stream has taken in, the last reply included
        self.history: list[dict] = []
        self.sequences: Optional[torch.Tensor] = None
        self.cache: Any = None
        self.restarts = 0
        self.last: Optional[Reply] = None
        self.fed_tokens = 0  # ids fed by the last reply() call (the new turn, or the whole list after an edit)

    def _new_ids(self, messages: list) -> list[int]:
        keys = [_key(m) for m in messages]
        if messages[-1].get("role") == "assistant":
            raise ChatError("the last message is the assistant's: end the list with the turn to answer (a user "
                            "message, or a tool result)")
        if self.held and keys[: len(self.held)] == self.held and len(keys) > len(self.held):
            return self.template.next_turn(self.history[:-1], messages[len(self.held):], int(self.sequences[0, -1]))
        if self.held:
            at = next((i for i, (a, b) in enumerate(zip(keys, self.held)) if a != b), min(len(keys), len(self.held)))
            why = (f"message {at} ({messages[at].get('role') if at < len(messages) else 'none'}) differs from the one "
                   f"this chat answered" if at < len(keys) else "the list ends before the last reply")
            if self.on_edit == "raise":
                raise ChatError(f"the messages do not continue this chat: {why}. Append the reply and the new turn "
                                "to the list, or start a new Chat (on_edit='restart' starts a new stream itself)")
            logger.info("the messages do not continue the held chat (%s): starting a new stream", why)
            self.restarts += 1
            self.sequences = self.cache = None
        return self.template.first_turn(messages)

    def reply(self, messages: Sequence[dict], max_new_tokens: int = 256, *, stop: Optional[Sequence[str]] = None,
              logprobs: Optional[int] = None, **generate_kwargs: Any) -> str:
        """Answer the last message of ``messages``; returns the reply's text (append it to
        ``messages`` as the assistant's message, as any chat loop does). ``stop``: strings that
        end the reply (cut before them). ``logprobs``: note each reply token's log-probability
        and the ``logprobs`` likeliest alternatives (in :attr:`last`). ``generate_kwargs`` go
        to ``model.generate`` (``do_sample``, ``temperature``, ``top_p``, ``streamer``, ...).
        :attr:`last` describes the turn (:class:`Reply`)."""
        from .cache_access import output_cache

        messages = list(messages)
        if not messages:
            raise ChatError("messages is empty: give at least one user message")
        if self.closed:
            raise ChatError("the chat is closed")
        new = torch.tensor([self._new_ids(messages)], dtype=torch.long)
        inputs = new if self.sequences is None else torch.cat([self.sequences, new], dim=1)
        extra = {} if self.cache is None else {self.cache_kwarg: self.cache}
        # until the call returns: an interrupted turn leaves nothing to continue (the next call starts anew)
        self.held, self.history, self.sequences, self.cache = [], [], None, None
        generate_kwargs.setdefault("eos_token_id", self.stop_ids)
        generate_kwargs.setdefault("pad_token_id", self.pad_token_id)
        if stop:
            generate_kwargs.update(stop_strings=list(stop), tokenizer=self.tokenizer)
        if logprobs is not None:
            generate_kwargs["output_logits"] = True
        with torch.no_grad():
            out = self.model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                                      return_dict_in_generate=True, **extra, **generate_kwargs)
        self.sequences, self.cache, self.fed_tokens = out.sequences, output_cache(out), int(new.shape[1])
        ids = out.sequences[0, inputs.shape[1]:].tolist()
        self.last_reply_ids = ids
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((at for at in (text.find(s) for s in stop or ()) if at >= 0), default=-1)
        finish = "stop" if cut >= 0 or (ids and ids[-1] in self.stop_ids) else "length"
        text = (text[:cut] if cut >= 0 else text).strip()
        self.last = Reply(text=text, ids=ids, finish_reason=finish, prompt_tokens=int(inputs.shape[1]),
                          fed_tokens=self.fed_tokens,
                          logprobs=_logprobs(out.logits, ids, logprobs) if logprobs is not None else None)
        self.history = messages + [{"role": "assistant", "content": text}]
        self.held = [_key(m) for m in self.history]
        return text

    @property
    def key(self) -> Optional[str]:
        """A digest of the messages this chat holds (None before the first reply): what a
        server files the conversation under, to find it from the next request's messages."""
        return messages_key(self.history) if self.held else None

    def save(self, path: Any) -> Any:
        """Write the conversation (messages, token ids, the pressed cache) to ``path``, atomically."""
        from .persist import save_cache

        if not self.held:
            raise ChatError("nothing to save: the chat has not answered yet (or its last turn was interrupted)")
        return save_cache(self.cache, path, extra={"history": self.history, "sequences": self.sequences})

    def restore(self, path: Any) -> None:
        """Continue the conversation :meth:`save` wrote to ``path`` (same model and press settings)."""
        from .persist import load_cache

        cache, extra = load_cache(path, self.model)
        self.cache, self.sequences, self.history = cache, extra["sequences"], list(extra["history"])
        self.held = [_key(m) for m in self.history]

    def close(self) -> None:
        """Remove the press this chat applied (a shared press stays)."""
        if self.press is not None and self._own_press:
            self.press.remove()
        self.press, self.closed = None, True

    def __enter__(self) -> "Chat":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
