"""Conversations that never end, through generate(): each turn passes the previous call's cache
and the whole conversation so far (the previous `sequences` with the new turn appended), as
transformers documents prefix reuse. The press feeds only what its stream has not taken in,
and every logit equals the independent float64 reference of the whole token stream under
sink+window attention with positions within the cache."""

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

import kvpress_lite as kvl
from bounds import assert_float32_close
from helpers import cache_kwarg
from kvpress_lite.cache_access import output_cache
from reference import reference_logits, streaming_visible
from test_press_reference import gpt2_positions
from tiny_models import FAMILIES, tiny_model

N_SINK, CAPACITY = 4, 32  # the same budget as test_press_reference (gpt2_positions reads it)


def user_turn(length, seed):
    return torch.randint(1, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def turn(model, ids, cache=None, new_tokens=30, **kwargs):
    """One generate() call over the whole conversation `ids`, continuing `cache`."""
    extra = {} if cache is None else {cache_kwarg(model): cache}
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0, **extra, **kwargs)
    return out, torch.stack(out.logits)[:, 0]


def reference(model, ids, steps):
    """Float64 logits of the whole stream, given where each processing step starts."""
    steps = steps + [ids.shape[1] - 1]  # the last token (never fed) alone, so the step before it is one token
    visible = streaming_visible(N_SINK, CAPACITY, chunk_starts=steps)
    if model.config.model_type == "gpt2":
        return reference_logits(model, ids[0], visible, token_positions=gpt2_positions(steps, ids.shape[1])).float()
    return reference_logits(model, ids[0], visible, rope_positions="cache").float()


def converse(model, turns, new_tokens, press_per_turn=False, **kwargs):
    """Play `turns` (user token tensors) through generate(); return the final sequences, the raw
    logits of every generated token, where each step started, and where each logit belongs."""
    ids, cache, steps, logits, at = None, None, [], [], []
    press = None if press_per_turn else kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY)
    try:
        for k, user in enumerate(turns):
            if press_per_turn:
                press = kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY)
            fed_from = 0 if ids is None else ids.shape[1] - 1  # the last generated token was never fed
            ids = user if ids is None else torch.cat([ids, user], dim=1)
            steps += [fed_from] + list(range(ids.shape[1], ids.shape[1] + new_tokens - 1))
            out, raw = turn(model, ids, cache, new_tokens, **kwargs)
            at += list(range(ids.shape[1] - 1, ids.shape[1] - 1 + new_tokens))
            ids, cache = out.sequences, output_cache(out)
            logits.append(raw)
            if press_per_turn:
                press.remove()
    finally:
        if press is not None:
            press.remove()
    return ids, torch.cat(logits), steps, at


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_continues_a_conversation_exactly(family):
    model = tiny_model(family, "sdpa", **({"n_positions": 128} if family == "gpt2" else {}))
    turns = [user_turn(10, 1), user_turn(8, 2), user_turn(20, 3), user_turn(5, 4)]
    ids, logits, steps, at = converse(model, turns, new_tokens=40)
    assert ids.shape[1] == 10 + 8 + 20 + 5 + 4 * 40  # 203 tokens, 6x the capacity, past gpt2's 128 positions
    ref = reference(model, ids, steps)
    assert_float32_close(logits, ref[at], model, CAPACITY + 1, runs=1)
    generated = torch.cat([ids[0, a + 1 : a + 2] for a in at])
    assert torch.equal(generated, ref[at].argmax(-1))  # greedy picked what the reference would


def test_one_press_per_turn_continues_the_same_stream():
    """The natural way to write it: a `with apply_press(...)` block per turn on the same cache."""
    model = tiny_model("llama", "sdpa")
    turns = [user_turn(12, 5), user_turn(9, 6), user_turn(9, 7)]
    one = converse(model, turns, new_tokens=25)
    per_turn = converse(model, turns, new_tokens=25, press_per_turn=True)
    assert torch.equal(one[0], per_turn[0])
    torch.testing.assert_close(per_turn[1], one[1], atol=0, rtol=0)


def test_repetition_penalty_streamer_and_stopping_criteria_work_across_turns(capsys):
    class StopAfter(StoppingCriteria):
        def __init__(self, length):
            self.length = length

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)

    class Tok:  # the smallest tokenizer TextStreamer needs
        def decode(self, ids, **kwargs):
            return " ".join(f"t{int(i)}" for i in ids)

    model = tiny_model("llama", "sdpa")
    turns = [user_turn(10, 8), user_turn(6, 9)]
    ids, cache, steps, logits, at = None, None, [], [], []
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY):
        for user in turns:
            fed_from = 0 if ids is None else ids.shape[1] - 1
            ids = user if ids is None else torch.cat([ids, user], dim=1)
            stop_at = ids.shape[1] + 25  # the criterion ends the turn after 25 of the 60 allowed tokens
            extra = {} if cache is None else {cache_kwarg(model): cache}
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=60, do_sample=False,
                                 repetition_penalty=1.3, streamer=TextStreamer(Tok()), output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=0,
                                 stopping_criteria=StoppingCriteriaList([StopAfter(stop_at)]), **extra)
            assert out.sequences.shape[1] == stop_at
            steps += [fed_from] + list(range(ids.shape[1], stop_at - 1))
            at += list(range(ids.shape[1] - 1, stop_at - 1))
            logits.append(torch.stack(out.logits)[:, 0])
            ids, cache = out.sequences, output_cache(out)
    ref = reference(model, ids, steps)
    assert_float32_close(torch.cat(logits), ref[at], model, CAPACITY + 1, runs=1)  # raw logits, before the penalty
    assert f"t{int(ids[0, -1])}" in capsys.readouterr().out  # the streamer printed the tokens as they came


def test_sampling_continues_across_turns_within_the_capacity():
    model = tiny_model("llama", "sdpa")
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY) as press:
        torch.manual_seed(0)
        ids = user_turn(10, 10)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=50,
                             min_new_tokens=50, return_dict_in_generate=True, pad_token_id=0)
        ids = torch.cat([out.sequences, user_turn(7, 11)], dim=1)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=50,
                             min_new_tokens=50, return_dict_in_generate=True, pad_token_id=0,
                             **{cache_kwarg(model): output_cache(out)})
        assert out.sequences.shape[1] == 10 + 50 + 7 + 50
        assert press.stats.cache_length == [CAPACITY, CAPACITY] and press.stats.seen_tokens == 116


def test_an_edited_conversation_is_refused_and_the_stream_stays_usable():
    model = tiny_model("llama", "sdpa")
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY):
        out, _ = turn(model, user_turn(10, 12), new_tokens=40)
        edited = out.sequences.clone()
        edited[0, -5] = (edited[0, -5] + 1) % 128  # a token still in the cache's window
        with pytest.raises(kvl.UnsupportedGenerationError, match="different tokens.*append the new turn"):
            turn(model, torch.cat([edited, user_turn(5, 13)], dim=1), output_cache(out), new_tokens=5)
        ids = torch.cat([out.sequences, user_turn(5, 13)], dim=1)
        turn(model, ids, output_cache(out), new_tokens=5)  # the untouched conversation still continues


def test_a_cache_compacted_under_other_settings_is_refused():
    model = tiny_model("llama", "sdpa")
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY):
        out, _ = turn(model, user_turn(10, 14), new_tokens=40)
    ids = torch.cat([out.sequences, user_turn(5, 15)], dim=1)
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY * 2):
        with pytest.raises(kvl.UnsupportedGenerationError, match=r"other settings.*capacity=32.*capacity=64"):
            turn(model, ids, output_cache(out), new_tokens=5)
