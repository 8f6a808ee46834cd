"""The pressed model against an independent reference, for every family, both attention
implementations, both drivers, prompts shorter and longer than the capacity.

position_shift=False: the reference attends to exactly the kept tokens with absolute
positions. position_shift=True (the paper): RoPE keys are kept un-rotated and rotated at
their rank within the cache at every step; GPT-2 gets bounded positions (the slot each
token lands in, never above capacity - 1) and runs past n_positions.
"""

import pytest
import torch

import kvpress_lite as kvl
from bounds import assert_float32_close
from helpers import generate, loop_logits
from reference import reference_logits, streaming_visible
from tiny_models import FAMILIES, tiny_model

N_SINK, CAPACITY, NEW_TOKENS = 4, 32, 300
WINDOW = CAPACITY - N_SINK


def step_starts(prompt_len: int, total: int) -> list[int]:
    """Where each processing step starts: the prompt in chunks of WINDOW when it overflows the
    cache (the press's default chunk), then one token per step."""
    prompt_steps = list(range(0, prompt_len, WINDOW)) if prompt_len > CAPACITY else [0]
    return prompt_steps + list(range(prompt_len, total))


def gpt2_positions(starts: list[int], total: int) -> list[int]:
    """Bounded learned positions: a token at offset o of a step of q tokens gets
    min(its index, CAPACITY - q + o), never below 0."""
    bounds = starts + [total]
    positions = []
    for s, e in zip(bounds, bounds[1:]):
        q = e - s
        positions += [max(0, min(i, CAPACITY - q + (i - s))) for i in range(s, e)]
    return positions


def reference_for(model, ids, prompt_len, shift):
    total = ids.shape[1]
    starts = step_starts(prompt_len, total)
    visible = streaming_visible(N_SINK, CAPACITY, chunk_starts=starts)
    if model.config.model_type == "gpt2":
        positions = gpt2_positions(starts, total) if shift else None
        return reference_logits(model, ids[0], visible, token_positions=positions)
    return reference_logits(model, ids[0], visible, rope_positions="cache" if shift else "absolute")


@pytest.mark.parametrize("prompt_len", [10, 3 * CAPACITY + 5], ids=["short-prompt", "long-prompt"])
@pytest.mark.parametrize("shift", [False, True], ids=["absolute", "shifted"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_press_matches_reference_in_both_drivers(family, attn, shift, prompt_len):
    # GPT-2 with absolute positions cannot pass n_positions; with the shift it must
    n_positions = {"n_positions": 128} if family == "gpt2" and shift else {}
    model = tiny_model(family, attn, **n_positions)
    prompt = torch.randint(0, 128, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))

    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY, position_shift=shift) as press:
        ids, gen_logits = generate(model, prompt, NEW_TOKENS)
        assert press.stats.cache_length == [CAPACITY] * 2
        assert press.stats.evicted_tokens == ids.shape[1] - 1 - CAPACITY  # the last token is never fed
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY, position_shift=shift) as press:
        loop = loop_logits(model, ids, prompt_len)
        assert press.stats.cache_length == [CAPACITY] * 2

    ref = reference_for(model, ids, prompt_len, shift).float()
    assert ids.shape[1] == prompt_len + NEW_TOKENS
    assert_float32_close(gen_logits, ref[prompt_len - 1 : -1], model, CAPACITY + 1, runs=1)
    assert_float32_close(loop, ref[:-1], model, CAPACITY + WINDOW, runs=1)  # a chunk of WINDOW sees up to C + W
    # and the semantics matter: dense attention would give other logits
    dense = reference_logits(model, ids[0, :200]) if family != "gpt2" or not shift else None
    if dense is not None:
        assert (dense[100:199].float() - ref[100:199]).abs().max() > 1e-2
