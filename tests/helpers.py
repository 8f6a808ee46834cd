"""Small drivers shared by the tests: a plain forward loop and generate(), both through the
public API only, with the cache keyword read off the model's signature."""

import torch
from transformers import DynamicCache

from kvpress_lite.cache_access import model_cache_kwarg as cache_kwarg


@torch.no_grad()
def loop_logits(model, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Feed the prompt in one call, then every later token alone, passing the cache back and
    never passing position_ids (transformers derives them from the cache unless the press
    does). Returns logits [T - 1, vocab] predicting tokens 1..T-1."""
    cache = DynamicCache()
    name = cache_kwarg(model)
    out = model(input_ids=ids[:, :prompt_len], use_cache=True, **{name: cache})
    logits = [out.logits[0]]
    for t in range(prompt_len, ids.shape[1] - 1):
        out = model(input_ids=ids[:, t : t + 1], use_cache=True, **{name: cache})
        logits.append(out.logits[0])
    return torch.cat(logits)


@torch.no_grad()
def generate(model, prompt: torch.Tensor, new_tokens: int, **kwargs):
    """Greedy generate() returning (sequences [1, T], raw logits [new_tokens, vocab])."""
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        **kwargs,
    )
    return out.sequences, torch.stack(out.logits)[:, 0]
