"""Conversations across ``generate()`` calls: feed only what the stream has not taken in.

transformers documents prefix reuse as: pass the previous call's cache and the *whole*
conversation so far. ``generate()`` then feeds the tokens past ``cache.get_seq_length()``,
which for a pressed cache is its capacity, not the conversation's length, so the call
starts with tokens the stream already took in. Their positions (``position_ids``, computed
by ``generate()`` from the attention mask) say which: everything before
``stream.real_seen``. This module checks that those tokens are the ones the stream saw
(the stream keeps its last ``capacity`` token ids and its sinks' ids; an edited or rewound
conversation would otherwise be continued silently) and drops them from the call.

What stays refused, with the reason: a call with nothing new in it (the conversation went
back: assisted/speculative decoding, or an earlier prefix), tokens that differ from what
the stream saw, ``inputs_embeds`` (nothing to compare), and left-padded batches.

>>> out = model.generate(ids, max_new_tokens=50, **{cache_kw: cache})              # doctest: +SKIP
>>> ids = torch.cat([out.sequences, next_user_turn], dim=-1)                       # doctest: +SKIP
>>> out = model.generate(ids, max_new_tokens=50, **{cache_kw: out.cache})          # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .errors import UnsupportedGenerationError
from .stream import Stream

_WENT_BACK = (
    "That is what assisted/speculative decoding (or a manual cache crop) does when it rejects tokens; the press "
    "serves greedy and sampling decoding. To continue a conversation, pass the previous call's cache and the "
    "previous call's `sequences` with the new turn appended."
)


def record_tokens(stream: Stream, tokens: Optional[torch.Tensor]) -> None:
    """Remember the ids of the sinks and of the last ``capacity`` tokens taken in (unpadded
    streams fed ``input_ids``); forget them when a call came as embeddings."""
    if stream.padded or tokens is None:
        stream.recent_tokens = stream.sink_tokens = None
        return
    tokens = tokens.detach().to("cpu", torch.long)
    if stream.recent_tokens is None and int(stream.real_seen) == 0:
        stream.sink_tokens = tokens[:, : stream.n_sink]
        stream.recent_tokens = tokens
    elif stream.recent_tokens is not None:
        if stream.sink_tokens.shape[1] < stream.n_sink:
            stream.sink_tokens = torch.cat([stream.sink_tokens, tokens], dim=1)[:, : stream.n_sink]
        stream.recent_tokens = torch.cat([stream.recent_tokens, tokens], dim=1)
    if stream.recent_tokens is not None:
        stream.recent_tokens = stream.recent_tokens[:, -stream.capacity :]


def given_positions(kwargs: dict) -> Optional[torch.Tensor]:
    """The absolute positions generate() handed for this call (``position_ids``, or
    ``cache_position`` on transformers 4.x), as ``[rows, q]``; None when none were given."""
    given = kwargs.get("position_ids")
    if given is None:
        given = kwargs.get("cache_position")
    if given is None or given.numel() == 0:
        return None
    return given.reshape(-1, given.shape[-1]).cpu()


def skip_seen_tokens(kwargs: dict, stream: Stream) -> None:
    """Drop from this call's ``input_ids`` the leading tokens the stream has already taken in
    (checking they are the same tokens), or refuse the call. Edits ``kwargs`` in place."""
    given = given_positions(kwargs)
    if given is None:
        return
    seen = stream.real_seen
    if stream.padded:
        if bool((given[:, 0] < seen.to(given.dtype)).any()):
            stream.broken = True
            raise UnsupportedGenerationError(
                "the stream went back: this call starts at a position the press has already taken in. " + _WENT_BACK
                + " (A left-padded batch cannot continue a conversation across generate() calls; run rows one by one.)"
            )
        return
    first, last, q = int(given[0, 0]), int(given[0, -1]), given.shape[-1]
    if first >= seen:
        return
    overlap = seen - first
    if last < seen or overlap >= q:
        raise UnsupportedGenerationError(
            f"the stream went back: this call covers positions {first}..{last}, all of which the press has already "
            f"taken in ({seen} tokens). " + _WENT_BACK
        )
    tokens = kwargs.get("input_ids")
    if tokens is None or stream.recent_tokens is None:
        raise UnsupportedGenerationError(
            f"this call repeats {overlap} tokens the press has already taken in, as embeddings it cannot compare; "
            "pass input_ids, or only the new tokens"
        )
    _check_same_tokens(tokens[:, :overlap].cpu(), first, stream)
    kwargs["input_ids"] = tokens[:, overlap:]
    kwargs.pop("position_ids", None)  # the press hands its own
    kwargs.pop("cache_position", None)


def _check_same_tokens(repeated: torch.Tensor, first: int, stream: Stream) -> None:
    """``repeated`` holds the tokens at positions first..seen-1; compare with what the stream kept."""
    seen = int(stream.real_seen)
    recent = stream.recent_tokens
    known_from = seen - recent.shape[1]
    start = max(first, known_from)
    mismatch = not torch.equal(repeated[:, start - first :], recent[:, start - known_from :])
    if first < stream.n_sink and stream.sink_tokens is not None:
        sinks = min(stream.n_sink, stream.sink_tokens.shape[1])
        mismatch = mismatch or not torch.equal(repeated[:, : sinks - first], stream.sink_tokens[:, first:sinks])
    if mismatch:
        raise UnsupportedGenerationError(
            f"this call repeats positions {first}..{seen - 1} of the stream with different tokens than the press took "
            "in there: the conversation was edited or re-tokenized. Continue from the previous call's `sequences` "
            "(append the new turn's token ids to them) rather than re-encoding the whole text, or start a new cache."
        )


def settings_of(press: Any, adapter_name: str, scheme_description: str) -> tuple:
    """What must match for a press to continue a stream another press (or an earlier `with`
    block) filled: the budget, the position treatment and the family."""
    return (press.n_sink, press.capacity, press.compression_ratio, press.position_shift, adapter_name,
            scheme_description)
