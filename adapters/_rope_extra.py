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
"""

from __future__ import annotations

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
