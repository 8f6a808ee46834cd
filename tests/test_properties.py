"""Property tests over call sequences: hypothesis draws a random sequence of things a user
does with one pressed model (model() calls of any length, single tokens, generate() turns
that continue the conversation, a call interrupted part-way) and every logit the model
returns is checked against the independent float64 reference of the stream it saw. A failing
sequence shrinks to a minimal one."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

import kvpress_lite as kvl
from bounds import assert_float32_close
from helpers import cache_kwarg
from kvpress_lite.cache_access import output_cache
from reference import reference_logits, streaming_visible
from tiny_models import tiny_model

N_SINK, CAPACITY = 2, 12
WINDOW = CAPACITY - N_SINK
MODEL = tiny_model("llama", "sdpa", num_hidden_layers=2)
KV = CAPACITY + 30  # the longest call (30 tokens) attends to the cache and itself

calls = st.one_of(
    st.tuples(st.just("call"), st.integers(1, 30)),  # model() with this many new tokens
    st.tuples(st.just("token"), st.integers(1, 8)),  # this many single-token calls
    st.tuples(st.just("generate"), st.integers(1, 12), st.integers(1, 10)),  # a turn: user tokens, new tokens
    st.tuples(st.just("interrupt"), st.integers(1, 30)),  # a call that dies inside the model
)


class Stream:
    """One stream under the press, and what the reference needs to know about it."""

    def __init__(self, seed):
        self.gen = torch.Generator().manual_seed(seed)
        self.cache, self.ids = DynamicCache(), torch.zeros(1, 0, dtype=torch.long)
        self.starts, self.checks = [], []  # step starts; (position, logits) the model returned
        self.fed = 0  # tokens the press took in

    def tokens(self, n):
        return torch.randint(0, 128, (1, n), generator=self.gen)

    def steps_of_call(self, q):
        """Where the press starts each step of a call of q tokens: chunks of WINDOW when it overflows."""
        stored = min(self.fed, CAPACITY)
        if stored + q > CAPACITY and q > WINDOW:
            return [self.fed + s for s in range(0, q, WINDOW)]
        return [self.fed]

    def call(self, new):
        self.ids = torch.cat([self.ids, new], dim=1)
        feed = self.ids[:, self.fed :]  # with a previous turn's last generated token, never fed
        self.starts += self.steps_of_call(feed.shape[1])
        out = MODEL(input_ids=feed, use_cache=True, **{cache_kwarg(MODEL): self.cache})
        for k in range(feed.shape[1]):
            self.checks.append((self.fed + k, out.logits[0, k]))
        self.fed += feed.shape[1]

    def generate(self, user, new_tokens):
        conversation = torch.cat([self.ids, user], dim=1)
        q = conversation.shape[1] - self.fed
        self.starts += self.steps_of_call(q) + list(range(conversation.shape[1], conversation.shape[1] + new_tokens - 1))
        out = MODEL.generate(conversation, attention_mask=torch.ones_like(conversation), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0, **{cache_kwarg(MODEL): self.cache})
        for k, logits in enumerate(out.logits):
            self.checks.append((conversation.shape[1] - 1 + k, logits[0]))
        self.ids, self.cache = out.sequences, output_cache(out)
        self.fed = self.ids.shape[1] - 1

    def verify(self):
        if not self.checks:
            return
        starts = self.starts + ([self.fed] if self.ids.shape[1] > self.fed else [])
        visible = streaming_visible(N_SINK, CAPACITY, chunk_starts=sorted(set(starts)))
        ref = reference_logits(MODEL, self.ids[0], visible, rope_positions="cache").float()
        for position, logits in self.checks:
            assert_float32_close(logits, ref[position], MODEL, KV, runs=1, what=f"position {position}")


def interrupted_call(stream, n):
    """A call that raises KeyboardInterrupt inside the last layer: the press must refuse the broken
    cache afterwards and leave nothing behind for the next stream."""
    def boom(module, args):
        raise KeyboardInterrupt

    handle = MODEL.model.layers[-1].register_forward_pre_hook(boom)
    try:
        MODEL(input_ids=stream.tokens(n), use_cache=True, **{cache_kwarg(MODEL): stream.cache})
    except KeyboardInterrupt:
        pass
    finally:
        handle.remove()
    try:
        MODEL(input_ids=stream.tokens(1), use_cache=True, **{cache_kwarg(MODEL): stream.cache})
    except kvl.UnsupportedGenerationError as exc:
        assert "failed part-way" in str(exc)
    else:
        raise AssertionError("a cache broken by an interrupted call was used again")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(calls, min_size=1, max_size=7), st.integers(0, 2**16))
def test_every_call_sequence_matches_the_reference(sequence, seed):
    with torch.no_grad(), kvl.apply_press(MODEL, n_sink=N_SINK, capacity=CAPACITY) as press:
        stream = Stream(seed)
        for op, *args in sequence:
            if op == "call":
                stream.call(stream.tokens(args[0]))
            elif op == "token":
                for _ in range(args[0]):
                    stream.call(stream.tokens(1))
            elif op == "generate":
                stream.generate(stream.tokens(args[0]), args[1])
            else:  # the broken stream is checked up to here, then a new one starts
                stream.verify()
                interrupted_call(stream, args[0])
                stream = Stream(seed + 1)
            assert max(press.stats.cache_length or [0]) <= CAPACITY
        stream.verify()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(1, 40), min_size=2, max_size=3), st.integers(1, 15), st.integers(0, 2**16))
def test_every_padded_row_matches_its_reference(lengths, new_tokens, seed):
    """A left-padded batch of random prompt lengths through generate(): each row's logits equal the
    reference of that row alone, with the steps the press took (chunks of the padded batch, in the
    row's own token coordinates)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    rows = [torch.randint(0, 128, (n,), generator=gen) for n in lengths]
    batch = torch.stack([torch.cat([torch.zeros(width - n, dtype=torch.long), r]) for n, r in zip(lengths, rows)])
    mask = torch.stack([torch.arange(width) >= width - n for n in lengths]).long()
    with torch.no_grad(), kvl.apply_press(MODEL, n_sink=N_SINK, capacity=CAPACITY):
        out = MODEL.generate(batch, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    columns = list(range(0, width, WINDOW)) if width > CAPACITY else [0]  # the press's chunks of the prompt
    for b, n in enumerate(lengths):
        pad = width - n
        starts = sorted({max(0, c - pad) for c in columns if c + WINDOW > pad or c == 0})
        starts += list(range(n, n + new_tokens))
        ids = out.sequences[b, pad:]
        ref = reference_logits(MODEL, ids, streaming_visible(N_SINK, CAPACITY, chunk_starts=starts),
                               rope_positions="cache").float()
        got = torch.stack(out.logits)[:, b]
        assert_float32_close(got, ref[n - 1 : n - 1 + new_tokens], MODEL, KV, runs=1,
                                 what=f"row {b} (length {n} of {lengths})")
