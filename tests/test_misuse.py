"""What a user meets when holding the press in an unexpected way: each case was silently
wrong or failed with an error that never named the press (issue 8); now each one either
works exactly or is refused with what to do."""

import copy
import pickle
import threading

import numpy as np
import pytest
import torch
from transformers import DynamicCache

import kvpress_lite as kvl
from kvpress_lite import registry
from kvpress_lite.copies import _inert, press_hooks
from bounds import assert_float32_close
from helpers import cache_kwarg, loop_logits
from tiny_models import tiny_model

N_SINK, CAPACITY = 4, 16


def ids_of(length, seed=0):
    return torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def test_numpy_integers_are_integers():
    model = tiny_model("llama")
    ids = ids_of(40)
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY):
        want = loop_logits(model, ids, 5)
    with kvl.apply_press(model, n_sink=np.int64(N_SINK), capacity=np.int32(CAPACITY)) as press:
        got = loop_logits(model, ids, 5)
        assert type(press.capacity) is int and press.stats.cache_length == [CAPACITY, CAPACITY]
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_the_press_alone_defaults_to_the_same_capacity_as_apply_press():
    assert kvl.StreamingLLMPress(n_sink=4).capacity == 256


def test_forcing_an_adapter_of_another_family_says_it_does_not_fit():
    with pytest.raises(kvl.UnsupportedModelError, match=r"adapter 'gpt2' .* does not fit LlamaForCausalLM"):
        kvl.apply_press(tiny_model("llama"), adapter="gpt2")


def test_an_unknown_plugin_name_in_the_environment_is_reported(monkeypatch):
    monkeypatch.setenv("KVPRESS_LITE_PLUGINS", "llama,lama2")
    try:
        with pytest.warns(RuntimeWarning, match=r"not installed: lama2; installed: .*llama"):
            reg = registry.get_registry(reload=True)
        assert "llama" in reg.adapters()
    finally:
        monkeypatch.delenv("KVPRESS_LITE_PLUGINS")
        registry.get_registry(reload=True)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_a_pressed_model_is_a_cleanly_unpressed_model(how):
    model = tiny_model("llama")
    ids = ids_of(50, 1)
    dense = loop_logits(model, ids, 5)
    press = kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY)
    pressed = loop_logits(model, ids, 5)
    twin = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    assert press_hooks(model) == 2 + model.config.num_hidden_layers  # the original stays pressed
    # a deep copy carries none of the press's hooks; a pickled one carries them inert (no code runs after unpickling)
    assert press_hooks(twin) == (0 if how == "deepcopy" else press_hooks(model))
    assert all(h is _inert for m in twin.modules() for h in m._forward_hooks.values()) or how == "deepcopy"
    inner = copy.deepcopy(model.model)  # the decoder the press hooks, copied on its own
    assert press_hooks(inner) == 0 and press_hooks(model.model) == press_hooks(model)
    torch.testing.assert_close(loop_logits(twin, ids, 5), dense, atol=0, rtol=0)  # the copy does not stream
    causal = torch.full((1, 1, 8, 8), float("-inf")).triu(1)  # and nothing of the press intercepts its calls
    with torch.no_grad():
        masked = twin(input_ids=ids[:, :8], attention_mask=causal).logits[0]
    assert_float32_close(masked, dense[:8], model, 8, runs=2)  # a 4D mask: another attention path
    with kvl.apply_press(twin, n_sink=N_SINK, capacity=CAPACITY) as second:  # and can be pressed on its own
        torch.testing.assert_close(loop_logits(twin, ids, 5), pressed, atol=0, rtol=0)
        assert second.stats.streams == 1
    assert press.stats.streams == 1  # the original press never saw the copy's calls
    press.remove()
    assert press_hooks(model) == 0 and "__deepcopy__" not in vars(model)  # removed: copies as any model
    assert press_hooks(copy.deepcopy(twin)) == 0


def test_a_second_thread_on_a_model_mid_call_is_refused_and_the_first_call_stays_exact():
    model = tiny_model("llama")
    ids = ids_of(30, 2)
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY):
        want = model(input_ids=ids, use_cache=True).logits
    inside, release, result = threading.Event(), threading.Event(), {}

    def pause(module, args):  # holds the first thread's call in flight, inside layer 0
        if threading.current_thread().name == "first":
            inside.set()
            release.wait(10)

    handle = model.model.layers[0].self_attn.register_forward_pre_hook(pause)
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY):
        worker = threading.Thread(name="first", target=lambda: result.update(
            logits=model(input_ids=ids, use_cache=True).logits))
        worker.start()
        assert inside.wait(10)
        with pytest.raises(kvl.UnsupportedGenerationError, match="another thread.*copy.deepcopy"):
            model(input_ids=ids[:, :5], use_cache=True)
        release.set()
        worker.join(10)
    handle.remove()
    torch.testing.assert_close(result["logits"], want, atol=0, rtol=0)


def test_a_loop_without_no_grad_streams_exactly():
    model = tiny_model("llama")
    ids = ids_of(60, 3)
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY):
        want = loop_logits(model, ids, 5)  # under torch.no_grad()
        cache, name, logits = DynamicCache(), cache_kwarg(model), []
        out = model(input_ids=ids[:, :5], use_cache=True, **{name: cache})  # grad mode, as a user writes it
        logits.append(out.logits[0])
        for t in range(5, 59):
            logits.append(model(input_ids=ids[:, t : t + 1], use_cache=True, **{name: cache}).logits[0])
    assert not cache.layers[0].keys.requires_grad  # no autograd graph chained through an endless stream
    torch.testing.assert_close(torch.cat(logits).detach(), want, atol=0, rtol=0)


def test_right_padding_is_refused_with_the_tokenizer_setting_to_change():
    model = tiny_model("llama")
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY):
        with pytest.raises(kvl.UnsupportedGenerationError, match="padding_side = 'left'"):
            model(input_ids=torch.randint(0, 128, (2, 5)), attention_mask=mask, use_cache=True)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_use_cache_false_is_refused_not_silently_dense(family):
    model = tiny_model(family)
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY):
        with pytest.raises(kvl.UnsupportedGenerationError, match="use_cache=False under a press"):
            model(input_ids=ids_of(20), use_cache=False)


def test_an_interrupted_chunked_prefill_leaves_no_state_behind():
    model = tiny_model("llama")
    ids = ids_of(60, 4)
    calls = []

    def interrupt_last_chunk(module, args, kwargs):
        calls.append((args[0] if args else kwargs["hidden_states"]).shape[1])
        if len(calls) == 5:  # 60 tokens in chunks of 12: the fifth chunk is the last
            raise KeyboardInterrupt

    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY) as press:
        fresh = model(input_ids=ids[:, :5], use_cache=True).logits
        handle = model.model.layers[1].register_forward_pre_hook(interrupt_last_chunk, with_kwargs=True)
        with pytest.raises(KeyboardInterrupt):
            model(input_ids=ids, use_cache=True)
        handle.remove()
        assert calls == [12, 12, 12, 12, 12]
        after = model(input_ids=ids[:, :5], use_cache=True)  # a new stream: nothing of the old call in it
        assert after.logits.shape[1] == 5
        torch.testing.assert_close(after.logits, fresh, atol=0, rtol=0)
        assert press.stats.cache_length == [5, 5]


def test_a_batched_pipeline_gives_each_prompt_its_solo_output():
    """pipeline(..., batch_size=3) left-pads a batch whose longest prompt overflows the cache and whose
    short rows hold fewer real tokens than n_sink at the first eviction (issue 8): each row must read
    exactly as when it runs alone."""
    from transformers import pipeline

    from test_chat import tiny_chat_model, tiny_tokenizer

    model, tok = tiny_chat_model(), tiny_tokenizer()
    tok.padding_side = "left"
    prompts = ["a long prompt that overflows the sixteen-entry cache by far", "hi", "ok!"]
    generate = pipeline("text-generation", model=model, tokenizer=tok)
    kwargs = dict(max_new_tokens=40, min_new_tokens=40, do_sample=False, return_full_text=False, pad_token_id=0)
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY):
        solo = [generate(p, **kwargs)[0]["generated_text"] for p in prompts]
        batched = [out[0]["generated_text"] for out in generate(prompts, batch_size=3, **kwargs)]
    assert batched == solo


@pytest.mark.parametrize("what", ["forward", "module"])
def test_compiling_a_model_under_the_eager_press_is_refused_naming_the_compiled_path(what):
    """torch.compile(model.forward) under apply_press used to recompile at every step (12 steps:
    22.7 s of dynamo warnings); now the first call says what to use instead."""
    model = tiny_model("llama", "sdpa")
    ids = ids_of(3, 9)
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY):
        compiled = torch.compile(model.forward if what == "forward" else model)
        with pytest.raises(kvl.UnsupportedGenerationError, match=r"kvpress_lite\.StreamingCache"):
            with torch.no_grad():
                compiled(input_ids=ids, use_cache=True)
        with torch.no_grad():  # the eager model under the press is untouched by the refusal
            assert model(input_ids=ids, use_cache=True).logits.shape == (1, 3, 128)
    torch._dynamo.reset()



def test_a_seq2seq_decoder_refuses_padded_batches_and_encoder_states():
    """BART's decoder numbers positions for the whole batch at once, so rows with their own padding
    cannot get their own positions; a call with encoder states is a seq2seq call, whose
    cross-attention would write the encoder's keys into the pressed cache. Both are refused at the
    call, and an unpadded batch streams each row as that row streams alone."""
    from kvpress_lite.tiny import tiny_model as tiny

    model = tiny("bart", 2)
    ids = torch.randint(5, 128, (2, 30), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :3] = 0

    def rows(batch):
        cache, out = DynamicCache(), []
        for t in range(batch.shape[1]):
            out.append(model(input_ids=batch[:, t:t + 1], use_cache=True, **{cache_kwarg(model): cache}).logits[:, 0])
        return torch.stack(out, dim=1)

    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY), torch.no_grad():
        with pytest.raises(kvl.UnsupportedGenerationError, match=r"padded batch .* \(one row of position ids\)"):
            model(input_ids=ids, attention_mask=mask)
        with pytest.raises(kvl.UnsupportedGenerationError, match="encoder_hidden_states"):
            model(input_ids=ids, encoder_hidden_states=torch.zeros(2, 5, model.config.d_model))
        both, alone = rows(ids), rows(ids[1:])
    assert_float32_close(both[1], alone[0], model, CAPACITY + 1)


@pytest.mark.skipif(int(__import__("transformers").__version__.split(".")[0]) < 5,
                    reason="Mllama's text model is built tiny (and served) on transformers >= 5 only")
def test_mllama_streams_text_past_its_cross_attention_layer_and_refuses_image_states():
    """Mllama's text model holds cross-attention layers (to image states) that run only when a call
    carries cross_attention_states: a text stream presses the self-attention layers and leaves the
    cross-attention layer's cache empty; a call with image states is refused before it runs."""
    from kvpress_lite.tiny import tiny_model as tiny

    model = tiny("mllama", 2)
    kinds = [type(layer).__name__ for layer in model.model.layers]
    assert kinds == ["MllamaSelfAttentionDecoderLayer", "MllamaCrossAttentionDecoderLayer"], kinds
    ids = torch.randint(5, 100, (1, 40), generator=torch.Generator().manual_seed(4))
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY) as press, torch.no_grad():
        loop_logits(model, ids, 5)
        assert press.stats.cache_length == [CAPACITY]  # the one self-attention layer
        with pytest.raises(kvl.UnsupportedGenerationError, match="cross_attention_states"):
            model(input_ids=ids[:, :3], cross_attention_states=torch.zeros(1, 4, model.config.hidden_size))


@pytest.mark.skipif(int(__import__("transformers").__version__.split(".")[0]) < 5,
                    reason="Llama 4 is built tiny (and served) on transformers >= 5 only")
def test_llama4_refuses_a_capacity_past_its_chunk_and_absolute_positions():
    """Llama 4's chunked layers cut blocks by cache index and its NoPE layers' temperature tuning counts
    cache entries: a capacity past the chunk would hide the sinks from later queries, and absolute
    positions would mix stream and cache positions. Both are refused at apply_press, naming the fix."""
    from kvpress_lite.tiny import tiny_model as tiny

    model = tiny("llama4_text", 2, window=16)  # attention_chunk_size=16
    with pytest.raises(kvl.UnsupportedModelError, match="capacity <= 16"):
        kvl.apply_press(model, n_sink=N_SINK, capacity=32)
    with pytest.raises(kvl.UnsupportedModelError, match="capacity <= 16"):
        kvl.apply_press(model, n_sink=N_SINK, capacity=None, compression_ratio=0.5)
    with pytest.raises(kvl.UnsupportedModelError, match="position_shift=True"):
        kvl.apply_press(model, n_sink=N_SINK, capacity=8, position_shift=False)
    with kvl.apply_press(model, n_sink=N_SINK, capacity=8) as press:  # the conformance suite proves it exact
        cache = DynamicCache(config=model.config)  # its chunked layers are windowed cache layers
        for token in torch.randint(0, 100, (40, 1, 1), generator=torch.Generator().manual_seed(5)):
            model(input_ids=token, use_cache=True, **{cache_kwarg(model): cache})
        assert press.stats.cache_length == [8, 8]
