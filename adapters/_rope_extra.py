"""Position-scheme factories for RoPE families whose rotary module does not fit
:func:`kvpress_lite.rope_positions` as it is. Each is a small function ``model -> scheme``
built from kvpress_lite's public position classes; no adapter is registered here.

* :func:`sincos_table_positions`: GPT-J and CodeGen keep no ``inv_freq``, only a table of
  ``sin | cos`` rows per position; the frequencies are read back off row 1 of that table.
* :func:`nope_layers_positions`: RoPE on some layers only (SmolLM3's ``no_rope_layers``): the
  NoPE layers get zero rotary dimensions, so their sinks are left alone.
* :func:`reversed_rope_positions`: a ``rotate_half`` written as ``cat(x2, -x1)`` (NanoChat),
  i.e. a rotation by minus the angle: the frequencies are negated.
* :func:`layer_types_rope_positions`: RoPE on some layer types only (Cohere 2's sliding layers;
  its global layers are NoPE).
* :func:`rope_parameters_layer_positions`: a base per layer type, read from
  ``<layer_type>_inv_freq``, and NoPE where ``config.rope_parameters`` has no entry for the
  type (Ergo: interleaved RoPE on its sliding layers, none on its global ones).
* :func:`chunked_nope_layers_positions`: Llama 4: interleaved RoPE on its chunked-attention layers,
  NoPE with temperature tuning on the others (see :class:`ChunkedRotary`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch
from torch import nn

import kvpress_lite as kvl
from kvpress_lite import UnsupportedModelError
from kvpress_lite.adapter import base_model as _base
from kvpress_lite.positions import rope_type


def _rotary(model: nn.Module, inv_freq, interleaved: bool, position_table: Optional[int] = None):
    """The library's RoPE scheme for these frequencies."""
    return kvl.Rotary(inv_freq=inv_freq, interleaved=interleaved, rope_type=rope_type(model.config),
                      position_table=position_table)


def sincos_table_positions(rotary_attr: str = "rotary_emb", table: str = "embed_positions",
                           interleaved: bool = True) -> Callable[[nn.Module], object]:
    """RoPE read off a ``[max_positions, rotary_dims]`` table of ``sin | cos`` rows (GPT-J, CodeGen).

    Row 1 holds ``sin(inv_freq) | cos(inv_freq)``; ``atan2`` gives the frequencies back (all
    below pi). The table has ``max_positions`` rows: the scheme keeps the positions it hands
    inside it (``Rotary.position_table``).
    """

    def positions(model: nn.Module):
        rotary = getattr(_base(model), rotary_attr, None)
        values = getattr(rotary, table, None)
        if not isinstance(values, torch.Tensor) or values.dim() != 2 or values.shape[0] < 2 or values.shape[1] % 2:
            raise UnsupportedModelError(
                f"{type(model).__name__}: no sin|cos position table at base_model.{rotary_attr}.{table}; the adapter "
                "needs updating for this model or transformers release"
            )
        half = values.shape[1] // 2
        row = values[1].detach().to(torch.float64)
        inv_freq = torch.atan2(row[:half], row[half:])
        return _rotary(model, inv_freq, interleaved, position_table=values.shape[0])

    return positions


def nope_layers_positions(rotary_attr: str = "rotary_emb", flags_attr: str = "no_rope_layers",
                          interleaved: bool = False) -> Callable[[nn.Module], object]:
    """RoPE on the layers whose ``config.<flags_attr>[i]`` is true (1: uses RoPE), none on the others."""

    def positions(model: nn.Module):
        rotary = getattr(_base(model), rotary_attr, None)
        inv_freq = getattr(rotary, "inv_freq", None)
        flags = getattr(model.config, flags_attr, None)
        if not isinstance(inv_freq, torch.Tensor) or not flags:
            raise UnsupportedModelError(
                f"{type(model).__name__}: expected base_model.{rotary_attr}.inv_freq and config.{flags_attr}; the "
                "adapter needs updating for this model or transformers release"
            )
        freq = inv_freq.detach().to(torch.float64).flatten()
        empty = freq[:0]
        return _rotary(model, [freq if flag else empty for flag in flags], interleaved)

    return positions


def reversed_rope_positions(rotary_attr: str = "rotary_emb") -> Callable[[nn.Module], object]:
    """RoPE whose ``rotate_half`` is ``cat(x2, -x1)``: a rotation by ``-angle``."""

    def positions(model: nn.Module):
        rotary = getattr(_base(model), rotary_attr, None)
        inv_freq = getattr(rotary, "inv_freq", None)
        if not isinstance(inv_freq, torch.Tensor):
            raise UnsupportedModelError(
                f"{type(model).__name__}: no rotary module with `inv_freq` at base_model.{rotary_attr}"
            )
        return _rotary(model, -inv_freq.detach().to(torch.float64).flatten(), interleaved=False)

    return positions


def layer_types_rope_positions(rotary_attr: str = "rotary_emb", rope_layer_types=("sliding_attention",),
                               interleaved: bool = False) -> Callable[[nn.Module], object]:
    """RoPE (one ``inv_freq``) on the layers whose ``config.layer_types[i]`` is in ``rope_layer_types``,
    none on the others (Cohere 2, EXAONE 4: sliding layers rotate, global layers are NoPE)."""

    def positions(model: nn.Module):
        rotary = getattr(_base(model), rotary_attr, None)
        inv_freq = getattr(rotary, "inv_freq", None)
        types = getattr(model.config, "layer_types", None)
        if not isinstance(inv_freq, torch.Tensor) or not types:
            raise UnsupportedModelError(
                f"{type(model).__name__}: expected base_model.{rotary_attr}.inv_freq and config.layer_types; the "
                "adapter needs updating for this model or transformers release"
            )
        freq = inv_freq.detach().to(torch.float64).flatten()
        return _rotary(model, [freq if kind in rope_layer_types else freq[:0] for kind in types], interleaved)

    return positions


def rope_parameters_layer_positions(rotary_attr: str = "rotary_emb", interleaved: bool = False
                                    ) -> Callable[[nn.Module], object]:
    """RoPE with ``base.<rotary_attr>.<layer_type>_inv_freq`` on the layer types that
    ``config.rope_parameters`` gives parameters, NoPE on the types it maps to None."""

    def positions(model: nn.Module):
        config = model.config
        rotary = getattr(_base(model), rotary_attr, None)
        types = list(getattr(config, "layer_types", None) or [])
        params = getattr(config, "rope_parameters", None)
        if rotary is None or not types or not isinstance(params, dict):
            raise UnsupportedModelError(
                f"{type(model).__name__}: expected base_model.{rotary_attr}, config.layer_types and per-layer-type "
                "config.rope_parameters; the adapter needs updating for this model or transformers release"
            )
        freqs = []
        for kind in types:
            if params.get(kind) is None:  # a NoPE layer type
                freqs.append(torch.zeros(0, dtype=torch.float64))
                continue
            freq = getattr(rotary, f"{kind}_inv_freq", None)
            if not isinstance(freq, torch.Tensor):
                raise UnsupportedModelError(
                    f"{type(model).__name__}: config.rope_parameters has {kind!r}, but base_model.{rotary_attr} holds "
                    f"no `{kind}_inv_freq`; the adapter needs updating for this model or transformers release"
                )
            freqs.append(freq.detach().to(torch.float64).flatten())
        return _rotary(model, freqs, interleaved)

    return positions


@dataclass
class ChunkedRotary(kvl.Rotary):
    """RoPE for a model with chunked-attention layers (Llama 4: each query sees only the keys of its
    own ``attention_chunk_size`` block) whose NoPE layers scale queries by their index in the cache
    (temperature tuning, read off ``cache.get_seq_length()``).

    Both follow the cache, not the stream: chunk blocks are cut by cache index, and the tuning counts
    cache entries. So with ``capacity <= attention_chunk_size`` every cache index lies in the first
    block, the chunked layers see sinks + window like the full ones, and the model sees the cache as
    a sequence of at most ``capacity`` tokens: positions within the cache, as the paper prescribes.
    A larger capacity would cut the cache into blocks, and a query past the first block would not
    see the sinks in its chunked layers (what makes the stream stable), and absolute
    positions (``position_shift=False``) would hand RoPE stream positions while the tuning counts
    cache entries: both are refused."""

    chunk_size: int = 0
    temperature_tuning: bool = False

    def check(self, model: nn.Module, *, capacity: Optional[int], position_shift: bool) -> None:
        super().check(model, capacity=capacity, position_shift=position_shift)
        name = type(model).__name__
        if capacity is None or capacity > self.chunk_size:
            raise UnsupportedModelError(
                f"{name} has chunked-attention layers (attention_chunk_size={self.chunk_size}), whose blocks are cut by "
                f"cache index: past the first block a query would not see the sinks there. The press serves it with "
                f"capacity <= {self.chunk_size} (every cached entry in one block), got {'compression_ratio' if capacity is None else f'capacity={capacity}'}. Pass "
                f"capacity=<= {self.chunk_size}."
            )
        if not position_shift and self.temperature_tuning:
            raise UnsupportedModelError(
                f"{name} scales the queries of its NoPE layers by their index in the cache (attn_temperature_tuning), "
                "which counts cache entries whatever positions RoPE is handed: position_shift=False would mix stream "
                "and cache positions. Use position_shift=True (the default)."
            )

    def static_unsupported(self) -> Optional[str]:
        return ("chunked-attention layers and cache-index temperature tuning are served by the eager press only")


def chunked_nope_layers_positions(rotary_attr: str = "rotary_emb", flags_attr: str = "no_rope_layers",
                                  interleaved: bool = True) -> Callable[[nn.Module], object]:
    """:func:`nope_layers_positions` for a family with chunked-attention layers (Llama 4)."""
    plain = nope_layers_positions(rotary_attr, flags_attr, interleaved)

    def positions(model: nn.Module):
        scheme = plain(model)
        config = model.config
        return ChunkedRotary(**{f.name: getattr(scheme, f.name) for f in fields(scheme)},
                             chunk_size=int(getattr(config, "attention_chunk_size", 0) or 0),
                             temperature_tuning=bool(getattr(config, "attn_temperature_tuning", False)))

    return positions
