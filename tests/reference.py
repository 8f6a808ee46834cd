"""An independent plain-torch forward pass, for checking the library against.

`reference_logits(model, input_ids, visible, ...)` recomputes the logits of a
Hugging Face causal LM in float64 from its parameters alone: no HF module forward
is called and nothing from kvpress_lite is imported. Which keys each query may see
is given by a `visible(i)` function, so the same code gives dense attention,
StreamingLLM (sinks + recent window, see `streaming_visible`) or any other pattern.

Teacher forcing: every token's hidden state at every layer is computed exactly
once; at each layer query i attends only to the keys/values of visible(i).

Families: llama, qwen2 (llama + q/k/v biases), gpt_neox (fused per-head qkv,
partial rotary, parallel residual), gpt2 (Conv1D weights, learned wpe).

RoPE position modes (`rope_positions`):
  "absolute": key j is rotated at position j and query i at position i.
  "cache":    keys are stored before rotation; for query i with V = visible(i),
              key V[r] is rotated at r (its rank in V) and the query at len(V) - 1.
              This is the paper's "positions within the cache".
GPT-2 has no RoPE; its positions are the wpe ids `token_positions`.
"""

import math
from typing import Callable, Sequence

import torch

Visible = Callable[[int], Sequence[int]]


# ----------------------------------------------------------------------------
# visibility patterns


def dense_visible(i: int) -> range:
    """Plain causal attention: query i sees keys 0..i."""
    return range(i + 1)


def streaming_visible(n_sink: int, capacity: int, chunk_starts=None) -> Visible:
    """StreamingLLM visibility with a cache of `capacity` = n_sink + W entries.

    A token i processed in a step (chunk) starting at s sees keys j <= i with
    j < n_sink or j >= s - W. Token-by-token decoding is s = i, so a query sees
    the sinks plus its W predecessors and itself (capacity + 1 keys).

    chunk_starts: None (token by token, s = i), a callable i -> s, a dict i -> s,
    or a sorted sequence of chunk start indices, e.g. [0, 64, 96] for chunks
    [0, 64), [64, 96), [96, ...).
    """
    if not 0 <= n_sink <= capacity:
        raise ValueError(f"need 0 <= n_sink <= capacity, got {n_sink}, {capacity}")
    window = capacity - n_sink

    if chunk_starts is None:
        start_of = lambda i: i
    elif callable(chunk_starts):
        start_of = chunk_starts
    elif isinstance(chunk_starts, dict):
        start_of = chunk_starts.__getitem__
    else:
        bounds = sorted(int(b) for b in chunk_starts)
        if not bounds or bounds[0] != 0:
            raise ValueError("chunk_starts as a sequence must start with 0")

        def start_of(i):
            return max(b for b in bounds if b <= i)

    def visible(i: int) -> list[int]:
        s = start_of(i)
        if not 0 <= s <= i:
            raise ValueError(f"chunk start {s} of token {i} is out of range")
        lo = max(s - window, 0)
        return [j for j in range(i + 1) if j < n_sink or j >= lo]

    return visible


# ----------------------------------------------------------------------------
# small building blocks (all float64)


def _layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _rms_norm(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def _act(name: str, x):
    if name == "gelu":  # exact erf gelu
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if name == "silu":
        return x * torch.sigmoid(x)
    if name == "relu":
        return torch.relu(x)
    raise NotImplementedError(f"activation {name!r}")


def _linear(x, weight, bias=None):
    """nn.Linear: weight is [out, in]."""
    y = x @ weight.T
    return y if bias is None else y + bias


def _conv1d(x, weight, bias):
    """GPT-2 Conv1D: weight is [in, out]."""
    return x @ weight + bias


def _p(t):
    return None if t is None else t.detach().to("cpu", torch.float64)


class _Plan:
    """Who sees whom, and at which RoPE positions, evaluated once from visible().
    Row i lists the keys of query i, padded to the longest row N.

    idx[i, r]:     index of the r-th key visible to query i           [T, N] long
    valid[i, r]:   False on padding                                   [T, N] bool
    key_pos[i, r]: position that key is rotated at for query i        [T, N] long
    query_pos[i]:  position query i is rotated at                     [T] long
    """

    def __init__(self, T: int, visible: Visible, mode: str):
        rows = []
        for i in range(T):
            idx = [int(j) for j in visible(i)]
            if not idx or idx[0] < 0 or idx[-1] != i or any(a >= b for a, b in zip(idx, idx[1:])):
                raise ValueError(f"visible({i}) must be sorted, unique, >= 0 and end with {i}: {idx}")
            rows.append(idx)
        N = max(len(r) for r in rows)
        self.idx = torch.zeros(T, N, dtype=torch.long)
        self.valid = torch.zeros(T, N, dtype=torch.bool)
        for i, r in enumerate(rows):
            self.idx[i, : len(r)] = torch.tensor(r)
            self.valid[i, : len(r)] = True
        if mode == "absolute":  # key j at j, query i at i
            self.key_pos = self.idx
            self.query_pos = torch.arange(T)
        else:  # "cache": key of rank r at r, query at len(V_i) - 1
            self.key_pos = torch.arange(N).expand(T, N)
            self.query_pos = self.valid.sum(-1) - 1


def _rotate(x, pos, inv_freq):
    """rotate_half RoPE at positions `pos` on the first 2*len(inv_freq) dims of each head.
    x: [..., heads, head_dim]; pos: [...] (x.shape without the last two axes)."""
    rd = 2 * inv_freq.shape[0]
    angles = pos.to(torch.float64)[..., None] * inv_freq  # [..., rd/2]
    emb = torch.cat([angles, angles], dim=-1)[..., None, :]  # [..., 1, rd] (broadcast over heads)
    cos, sin = emb.cos(), emb.sin()
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    x1, x2 = x_rot[..., : rd // 2], x_rot[..., rd // 2 :]
    rotated_half = torch.cat([-x2, x1], dim=-1)
    return torch.cat([x_rot * cos + rotated_half * sin, x_pass], dim=-1)


def _attention(q, k, v, plan, scale, inv_freq=None, block=64):
    """Attention of every query over its visible keys.

    q: [T, H, D] and k, v: [T, Hkv, D], all *before* any rotation.
    inv_freq: None (no RoPE) or [rotary_dim / 2]. Returns [T, H, D].
    """
    T, H, D = q.shape
    group = H // k.shape[1]  # query head h uses kv head h // group
    k = k.repeat_interleave(group, dim=1)  # [T, H, D]
    v = v.repeat_interleave(group, dim=1)  # [T, H, D]
    if inv_freq is not None:
        q = _rotate(q, plan.query_pos, inv_freq)

    out = torch.empty_like(q)
    for i0 in range(0, T, block):  # blocks of queries bound the memory
        rows = slice(i0, min(i0 + block, T))
        idx = plan.idx[rows]  # [B, N]
        kb, vb = k[idx], v[idx]  # [B, N, H, D]: each query's own copy of its keys
        if inv_freq is not None:
            kb = _rotate(kb, plan.key_pos[rows], inv_freq)
        scores = torch.einsum("ihd,inhd->hin", q[rows], kb) * scale  # [H, B, N]
        scores = scores.masked_fill(~plan.valid[rows], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[rows] = torch.einsum("hin,inhd->ihd", probs, vb)
    return out


# ----------------------------------------------------------------------------
# config reading (4.56 flat attributes vs 5.x rope_parameters)


def _rope_settings(config):
    """(rope_theta, partial_rotary_factor) from either transformers generation."""
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict) and rp:  # transformers 5.x
        rope_type = rp.get("rope_type", rp.get("type", "default"))
        if rope_type != "default":
            raise NotImplementedError(f"rope_type {rope_type!r}")
        return float(rp["rope_theta"]), float(rp.get("partial_rotary_factor", 1.0))
    scaling = getattr(config, "rope_scaling", None)  # transformers 4.x
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise NotImplementedError(f"rope_scaling {scaling!r}")
    if config.model_type == "gpt_neox":  # the attention module reads rotary_pct in 4.x
        return float(config.rotary_emb_base), float(config.rotary_pct)
    return float(config.rope_theta), float(getattr(config, "partial_rotary_factor", None) or 1.0)


def _inv_freq(config, head_dim):
    theta, partial = _rope_settings(config)
    rotary_dim = int(head_dim * partial)
    return 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)


# ----------------------------------------------------------------------------
# per-family forward passes. x is [T, E] float64 throughout.


def _forward_llama(model, ids, plan):
    cfg = model.config
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    base = model.model
    first = base.layers[0].self_attn
    D = first.q_proj.weight.shape[0] // H  # head_dim, read off the weights
    T = ids.shape[0]
    inv_freq = _inv_freq(cfg, D)  # [rotary_dim / 2]
    eps = cfg.rms_norm_eps

    x = _p(base.embed_tokens.weight)[ids]  # [T, E]
    for layer in base.layers:
        a = layer.self_attn
        h = _rms_norm(x, _p(layer.input_layernorm.weight), eps)
        q = _linear(h, _p(a.q_proj.weight), _p(a.q_proj.bias)).view(T, H, D)
        k = _linear(h, _p(a.k_proj.weight), _p(a.k_proj.bias)).view(T, Hkv, D)
        v = _linear(h, _p(a.v_proj.weight), _p(a.v_proj.bias)).view(T, Hkv, D)
        y = _attention(q, k, v, plan, D**-0.5, inv_freq).reshape(T, H * D)
        x = x + _linear(y, _p(a.o_proj.weight), _p(a.o_proj.bias))

        m = layer.mlp
        h = _rms_norm(x, _p(layer.post_attention_layernorm.weight), eps)
        gate = _act(cfg.hidden_act, _linear(h, _p(m.gate_proj.weight), _p(m.gate_proj.bias)))
        up = _linear(h, _p(m.up_proj.weight), _p(m.up_proj.bias))
        x = x + _linear(gate * up, _p(m.down_proj.weight), _p(m.down_proj.bias))

    x = _rms_norm(x, _p(base.norm.weight), eps)
    return _linear(x, _p(model.lm_head.weight), _p(getattr(model.lm_head, "bias", None)))


def _forward_gpt_neox(model, ids, plan):
    cfg = model.config
    H = cfg.num_attention_heads
    D = cfg.hidden_size // H
    T = ids.shape[0]
    inv_freq = _inv_freq(cfg, D)  # [rotary_dim / 2]
    eps = cfg.layer_norm_eps
    base = model.gpt_neox

    x = _p(base.embed_in.weight)[ids]  # [T, E]
    for layer in base.layers:
        a = layer.attention
        h = _layer_norm(x, _p(layer.input_layernorm.weight), _p(layer.input_layernorm.bias), eps)
        qkv = _linear(h, _p(a.query_key_value.weight), _p(a.query_key_value.bias))
        qkv = qkv.view(T, H, 3 * D)  # per head: [q | k | v]
        q, k, v = qkv[..., :D], qkv[..., D : 2 * D], qkv[..., 2 * D :]
        y = _attention(q, k, v, plan, D**-0.5, inv_freq).reshape(T, H * D)
        attn_out = _linear(y, _p(a.dense.weight), _p(a.dense.bias))

        def mlp(z):
            m = layer.mlp
            z = _act(cfg.hidden_act, _linear(z, _p(m.dense_h_to_4h.weight), _p(m.dense_h_to_4h.bias)))
            return _linear(z, _p(m.dense_4h_to_h.weight), _p(m.dense_4h_to_h.bias))

        ln2 = layer.post_attention_layernorm
        if cfg.use_parallel_residual:  # x + attn(ln1(x)) + mlp(ln2(x))
            x = x + attn_out + mlp(_layer_norm(x, _p(ln2.weight), _p(ln2.bias), eps))
        else:
            x = x + attn_out
            x = x + mlp(_layer_norm(x, _p(ln2.weight), _p(ln2.bias), eps))

    fln = base.final_layer_norm
    x = _layer_norm(x, _p(fln.weight), _p(fln.bias), eps)
    head = model.embed_out if hasattr(model, "embed_out") else model.lm_head  # 4.x / 5.x name
    return _linear(x, _p(head.weight), _p(getattr(head, "bias", None)))


def _forward_gpt2(model, ids, plan, token_positions):
    cfg = model.config
    H = cfg.n_head
    E = cfg.n_embd
    D = E // H
    T = ids.shape[0]
    eps = cfg.layer_norm_epsilon
    base = model.transformer

    pos = torch.arange(T) if token_positions is None else torch.as_tensor(list(token_positions))
    if pos.shape != (T,):
        raise ValueError(f"token_positions must have {T} entries")
    x = _p(base.wte.weight)[ids] + _p(base.wpe.weight)[pos]  # [T, E]; IndexError past n_positions
    for layer_idx, block in enumerate(base.h):
        a = block.attn
        h = _layer_norm(x, _p(block.ln_1.weight), _p(block.ln_1.bias), eps)
        qkv = _conv1d(h, _p(a.c_attn.weight), _p(a.c_attn.bias))  # [T, 3E]
        q, k, v = (t.reshape(T, H, D) for t in qkv.split(E, dim=-1))
        scale = D**-0.5 if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        y = _attention(q, k, v, plan, scale).reshape(T, E)
        x = x + _conv1d(y, _p(a.c_proj.weight), _p(a.c_proj.bias))

        m = block.mlp
        h = _layer_norm(x, _p(block.ln_2.weight), _p(block.ln_2.bias), eps)
        h = _act(cfg.activation_function, _conv1d(h, _p(m.c_fc.weight), _p(m.c_fc.bias)))
        x = x + _conv1d(h, _p(m.c_proj.weight), _p(m.c_proj.bias))

    x = _layer_norm(x, _p(base.ln_f.weight), _p(base.ln_f.bias), eps)
    return _linear(x, _p(model.lm_head.weight))


# ----------------------------------------------------------------------------
# public entry point


@torch.no_grad()
def reference_logits(
    model,
    input_ids: torch.Tensor,
    visible: Visible = dense_visible,
    rope_positions: str = "absolute",
    token_positions: Sequence[int] | None = None,
) -> torch.Tensor:
    """Float64 logits [T, vocab] of one sequence `input_ids` ([T] or [1, T]).

    visible(i): sorted key indices query i may attend to (must end with i).
    rope_positions: "absolute" or "cache" (see the module docstring); RoPE only.
    token_positions: GPT-2 only, the wpe position id of each token (default i).
    """
    if rope_positions not in ("absolute", "cache"):
        raise ValueError(f"rope_positions must be 'absolute' or 'cache', got {rope_positions!r}")
    ids = torch.as_tensor(input_ids).reshape(-1).cpu()
    model_type = model.config.model_type
    if token_positions is not None and model_type != "gpt2":
        raise ValueError("token_positions is only meaningful for gpt2")
    plan = _Plan(ids.shape[0], visible, rope_positions)  # visible() is called once per query
    if model_type in ("llama", "qwen2"):
        if getattr(model.config, "use_sliding_window", False):
            raise NotImplementedError("qwen2 with a sliding window")
        return _forward_llama(model, ids, plan)
    if model_type == "gpt_neox":
        return _forward_gpt_neox(model, ids, plan)
    if model_type == "gpt2":
        return _forward_gpt2(model, ids, plan, token_positions)
    raise NotImplementedError(f"no reference forward for model_type {model_type!r}")
