"""Chunked prefill: a call whose tokens would overflow the cache, run as several calls.

A prompt longer than the cache cannot go in at once without holding all of its keys
(peak memory = the whole prompt). :class:`ChunkedPrefill` runs all but the last chunk as
separate calls of the base model (each one planned and trimmed by the press like any
call), lets the last chunk continue through the original call, and prepends the earlier
chunks' hidden states to its output, so the caller sees one call's worth of output.
Peak KV memory is then ``capacity + chunk`` entries per layer.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .errors import UnsupportedGenerationError

logger = logging.getLogger(__name__)

# arguments that describe the whole call and cannot be split along the tokens
_NOT_SPLITTABLE = ("labels", "output_attentions")


class ChunkedPrefill:
    """One long call split into chunks of at most ``chunk`` tokens.

    >>> prefill = ChunkedPrefill(kwargs, q=1000, chunk=252)       # doctest: +SKIP
    >>> last_kwargs = prefill.run_prefix(base_model)              # doctest: +SKIP
    >>> output = prefill.stitch(output_of_last_chunk)             # doctest: +SKIP
    """

    def __init__(self, kwargs: dict, q: int, chunk: int) -> None:
        for banned in _NOT_SPLITTABLE:
            if kwargs.get(banned):
                raise UnsupportedGenerationError(
                    f"{banned} is not supported when the press splits a long input into chunks; compute it from the "
                    "logits, or pass a prompt of at most the capacity"
                )
        self.kwargs = kwargs
        self.key = "input_ids" if kwargs.get("input_ids") is not None else "inputs_embeds"
        self.starts = list(range(0, q, chunk))
        self.chunk = chunk
        self.outputs: list = []

    def _part(self, start: int, stop: int | None) -> dict:
        tokens, mask = self.kwargs[self.key], self.kwargs.get("attention_mask")
        part = dict(self.kwargs, **{self.key: tokens[:, start:stop]})
        part.pop("position_ids", None)  # the press supplies them per chunk
        part.pop("cache_position", None)
        if mask is not None and mask.dim() == 2:
            part["attention_mask"] = mask[:, :stop]
        return part

    def run_prefix(self, module: nn.Module) -> dict:
        """Run every chunk but the last through ``module``; return the last chunk's kwargs."""
        logger.info(
            "kvpress-lite: %d tokens overflow the cache; prefilling in %d chunks of <= %d",
            self.kwargs[self.key].shape[1], len(self.starts), self.chunk,
        )
        for start in self.starts[:-1]:
            self.outputs.append(module(**self._part(start, start + self.chunk)))
        return self._part(self.starts[-1], None)

    def stitch(self, output: Any) -> Any:
        """Prepend the hidden states of the earlier chunks to the last chunk's ``output``."""
        earlier = self.outputs
        if isinstance(output, tuple):
            return (torch.cat([o[0] for o in earlier] + [output[0]], dim=1),) + output[1:]
        output["last_hidden_state"] = torch.cat(
            [o["last_hidden_state"] for o in earlier] + [output["last_hidden_state"]], dim=1
        )
        hidden = output.get("hidden_states") if hasattr(output, "get") else None
        if hidden is not None:
            output["hidden_states"] = tuple(
                torch.cat([o["hidden_states"][i] for o in earlier] + [h], dim=1) for i, h in enumerate(hidden)
            )
        return output
