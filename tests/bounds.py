"""The suite's float tolerances, derived from float32's unit roundoff instead of tuned on one CPU.

A length-n dot product computed in float32 is within gamma_n = n*u / (1 - n*u) of the exact
value, relative to sum |a_i * b_i| (Higham, *Accuracy and Stability of Numerical Algorithms*,
Thm 3.1; u = 2**-24, the unit roundoff). That holds for any summation order, so it holds for
any kernel: AVX-512 or AVX2, a compiled graph or eager ops, one process or a tensor-parallel
all-reduce, a cache holding the same entries in other slots.

A logit is the end of a chain of such reductions. Per decoder layer: the input norm (hidden),
q/k/v projections (hidden), scores (head_dim), the softmax's normaliser and attention x values
(kv length each), the output projection (hidden), the post-attention norm (hidden), the MLP
(hidden, then intermediate); then the final norm and lm_head (hidden each). Summing the lengths
along the chain gives N, and ``gamma_N * scale`` bounds one float32 forward against exact
arithmetic, to first order (errors amplified by the weights between reductions are not counted;
the tiny models' are O(1)); ``scale`` is max(1, max |logit|), what a logit's terms add up to.
Two float32 runs of the same function are each within it of the exact value, so within twice it
of each other.

Measured against these bounds (tiny llama, 2 layers, kv length 33): float32 vs the float64
reference 1.2e-5 (bound 7.1e-5 * scale), compiled vs eager 1.5e-5 on an Intel Xeon (AVX-512) and
below 1e-5 on an AMD EPYC (AVX2); bound 1.4e-4 * scale. Wrong positions, a missing sink or a stale
slot move logits by 1e-2 to 1, far outside.

>>> assert_float32_close(got, want, model, kv_length=33, runs=2)   # doctest: +SKIP
"""

from __future__ import annotations

import torch

UNIT_ROUNDOFF = torch.finfo(torch.float32).eps / 2  # 2**-24


def _first(config, names: tuple[str, ...]):
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _dims(config) -> tuple[int, int, int, int]:
    """(layers, hidden, head_dim, intermediate) of a transformers config, whichever names it uses."""
    text = getattr(config, "text_config", None) or config
    hidden = _first(text, ("hidden_size", "n_embd", "d_model"))
    layers = _first(text, ("num_hidden_layers", "n_layer", "num_layers"))
    if hidden is None or layers is None:
        raise ValueError(f"{type(config).__name__}: no hidden size / layer count to bound a forward by")
    heads = _first(text, ("num_attention_heads", "n_head")) or 1
    head_dim = _first(text, ("head_dim",)) or hidden // heads
    # the widest MLP reduction the family has (MoE experts and shared experts included)
    inner = max(_first(text, (n,)) or 0 for n in ("intermediate_size", "n_inner", "moe_intermediate_size",
                                                   "ffn_hidden_size")) or 4 * hidden
    return layers, hidden, max(head_dim, 1), inner


def forward_roundings(config, kv_length: int) -> int:
    """N: the summed reduction lengths along the chain from the embeddings to one logit."""
    layers, hidden, head_dim, inner = _dims(config)
    per_layer = hidden + hidden + head_dim + 2 * kv_length + hidden + hidden + hidden + inner
    return layers * per_layer + 2 * hidden


def float32_bound(config, kv_length: int, runs: int = 1) -> float:
    """The bound on max |got - want| / scale for ``runs`` float32 forwards (1: against a float64
    reference; 2: two float32 computations of the same logits)."""
    n = forward_roundings(config, kv_length)
    gamma = n * UNIT_ROUNDOFF / (1 - n * UNIT_ROUNDOFF)
    return runs * gamma


def assert_float32_close(got: torch.Tensor, want: torch.Tensor, model, kv_length: int, runs: int = 2,
                         what: str = "") -> float:
    """Assert ``got`` equals ``want`` within :func:`float32_bound`, scaled by max(1, max |want|);
    returns the relative error. ``model`` (or its config) gives the reduction lengths."""
    config = getattr(model, "config", model)
    want = want.double()
    scale = float(want.abs().max().clamp(min=1.0))
    error = float((got.double() - want).abs().max()) / scale
    bound = float32_bound(config, kv_length, runs)
    assert error <= bound, (
        f"{what + ': ' if what else ''}max |got - want| / {scale:.3g} = {error:.3g} > {bound:.3g}, the float32 bound for {runs} run(s) at "
        f"kv length {kv_length} (tests/bounds.py)"
    )
    return error
