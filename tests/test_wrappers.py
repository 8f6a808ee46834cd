"""Multimodal wrappers (Gemma 3 4B+ loads as Gemma3ForConditionalGeneration, Gemma 4 as
Gemma4ForConditionalGeneration, ...): the press serves the language model inside.

The claim: under the press, a text stream through the wrapper gives the same logits as the
same stream through the stand-alone text model with the same weights under the same press
(which the conformance suite ties to the dense references), through plain calls and
generate(); image inputs are refused at the call.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import kvpress_lite as kvl
from bounds import float32_bound
from kvpress_lite.registry import support_for
from kvpress_lite.tiny import tiny_model, two_layer_pattern

V5 = int(transformers.__version__.split(".")[0]) >= 5
pytestmark = pytest.mark.skipif(not V5, reason="the wrappers' tiny builds need transformers 5 (gemma4 and the "
                                "current gemma3 layout); on 4.x test_family records them")
N_SINK, CAPACITY, STREAM = 2, 8, 40


def wrapper_and_text_model(model_type: str):
    """A tiny wrapper and the text causal LM holding the same weights (its language model and head)."""
    from transformers import AutoModelForCausalLM

    wrapper = tiny_model(model_type, 2, "eager", layer=two_layer_pattern(model_type))
    text = AutoModelForCausalLM.from_config(wrapper.config.get_text_config(), attn_implementation="eager").eval()
    state = {}
    for name, tensor in wrapper.state_dict().items():
        if name.startswith("model.language_model."):
            state["model." + name[len("model.language_model."):]] = tensor
        elif name.startswith("lm_head."):
            state[name] = tensor
    missing, unexpected = text.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    if missing:  # tied head
        text.tie_weights()
    return wrapper, text


@torch.no_grad()
def stream(model, ids):
    out = model(input_ids=ids[:, :4], use_cache=True)
    cache, logits = out.past_key_values, [out.logits[0, -1]]
    for t in range(4, ids.shape[1]):
        out = model(input_ids=ids[:, t : t + 1], use_cache=True, past_key_values=cache)
        logits.append(out.logits[0, -1])
    return torch.stack(logits), cache


@pytest.mark.parametrize("model_type", ["gemma3", "gemma4", "got_ocr2"])
def test_a_wrapper_streams_text_as_its_text_model(model_type):
    wrapper, text = wrapper_and_text_model(model_type)
    ids = torch.randint(3, 99, (1, STREAM), generator=torch.Generator().manual_seed(7))  # no media placeholder ids
    with kvl.apply_press(wrapper, n_sink=N_SINK, capacity=CAPACITY):
        got, cache = stream(wrapper, ids)
    with kvl.apply_press(text, n_sink=N_SINK, capacity=CAPACITY):
        want, _ = stream(text, ids)
    assert max(layer.keys.shape[-2] for layer in cache.layers) <= CAPACITY
    scale = want.abs().max().clamp(min=1.0)
    assert float((got - want).abs().max() / scale) <= float32_bound(text.config, CAPACITY + 1, runs=2)


def test_generate_through_a_wrapper_matches_the_text_model():
    wrapper, text = wrapper_and_text_model("gemma3")
    prompt = torch.randint(3, 99, (1, 6), generator=torch.Generator().manual_seed(8))
    outs = []
    for model in (wrapper, text):
        with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY):
            outs.append(model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24,
                                       min_new_tokens=24, do_sample=False, pad_token_id=0))
    assert outs[0].shape[1] == 30 and torch.equal(outs[0], outs[1])


def test_image_inputs_are_refused_at_the_call():
    wrapper, _ = wrapper_and_text_model("gemma3")
    ids = torch.randint(3, 99, (1, 6), generator=torch.Generator().manual_seed(9))
    size = wrapper.config.vision_config.image_size
    with kvl.apply_press(wrapper, n_sink=N_SINK, capacity=CAPACITY):
        with pytest.raises(kvl.UnsupportedGenerationError, match="pixel_values"):
            wrapper(input_ids=ids, pixel_values=torch.zeros(1, 3, size, size))
        types = torch.zeros_like(ids)
        types[0, 2:4] = 1  # an image block in the token types
        with pytest.raises(kvl.UnsupportedGenerationError, match="token_type_ids"):
            wrapper(input_ids=ids, token_type_ids=types)
        wrapper(input_ids=ids, token_type_ids=torch.zeros_like(ids))  # all text: served


def test_the_registry_names_what_serves_a_wrapper():
    assert support_for("gemma3").status == "accepted" and "gemma3_text" in support_for("gemma3").detail
    assert support_for("gemma3n").status == "refused"  # its timm vision tower is not built by the suite
    assert support_for("llama4").status == "accepted"  # built as its text model, llama4_text
    assert support_for("qwen4_exp").status == "refused"  # through its text model's refusal


def test_verify_runs_its_checks_on_a_wrappers_text_layers():
    wrapper, _ = wrapper_and_text_model("gemma3")  # a sliding and a full layer
    report = kvl.verify(wrapper)
    assert report.exact, str(report)
    checked = {c.layers for c in report.checks if c.name == "shifted" and c.status == "exact"}
    assert checked == {"full_attention (layer 1)"}


def test_the_static_cache_refuses_a_wrapper_naming_the_eager_press():
    from kvpress_lite.static import StreamingCache

    wrapper, _ = wrapper_and_text_model("gemma3")
    with pytest.raises(kvl.UnsupportedModelError, match="multimodal wrapper .*apply_press"):
        StreamingCache(wrapper, n_sink=N_SINK, capacity=CAPACITY)


def one_image(model, model_type):
    """(placeholder id, pixel_values) of one image that fills one placeholder token."""
    gen = torch.Generator().manual_seed(2)
    if model_type == "fuyu":  # patches, flattened: [batch, patches, patch_size**2 * channels]
        return model.config.image_token_id, torch.randn(1, 1, model.model.vision_embed_tokens.in_features, generator=gen)
    return model.config.image_token_index, torch.randn(1, 3, 32, 32, generator=gen)


@pytest.mark.parametrize("model_type", ["got_ocr2", "fuyu"])
@torch.no_grad()
def test_an_image_in_a_causal_wrappers_stream_is_an_ordinary_cache_entry(model_type):
    """GOT-OCR2's and Fuyu's image tokens enter their language model as causal entries (no block of their
    own), so a call carrying an image is served: the image token sits in the cache like a text token and is evicted
    like one. Reference (one text layer, so keys depend only on token and position): token t's logits
    equal one dense forward of the wrapper over the kept tokens at positions 0..L-1, with the image while
    its placeholder is kept. The image matters (another image moves the logits), and a media call too
    long for the cache in one piece is refused."""
    from kvpress_lite.tiny import tiny_model

    model = tiny_model(model_type, 1)
    (image_id, pixels), at, length = one_image(model, model_type), 5, 30
    ids = torch.randint(3, 99, (1, length), generator=torch.Generator().manual_seed(1))
    ids[0, at] = image_id
    got = []
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY):
        out = model(input_ids=ids[:, : at + 2], pixel_values=pixels, use_cache=True)
        cache = out.past_key_values
        got.append(out.logits[0, -1])
        for t in range(at + 2, length):
            got.append(model(input_ids=ids[:, t : t + 1], use_cache=True, past_key_values=cache).logits[0, -1])
        with pytest.raises(kvl.UnsupportedGenerationError, match="in one piece"):
            model(input_ids=ids[:, : CAPACITY + 4], pixel_values=pixels, use_cache=True)
    bound = float32_bound(model.config.get_text_config(), CAPACITY + 1, runs=2)
    evicted = 0
    for row, t in enumerate(range(at + 1, length)):
        kept = [j for j in range(t + 1) if j < N_SINK or j >= t - (CAPACITY - N_SINK)]
        media = {"pixel_values": pixels} if at in kept else {}
        want = model(input_ids=ids[:, kept], attention_mask=torch.ones(1, len(kept), dtype=torch.long),
                     position_ids=torch.arange(len(kept)).view(1, -1), use_cache=False, **media).logits[0, -1]
        assert float((got[row] - want).abs().max() / want.abs().max().clamp(min=1.0)) <= bound, t
        evicted += at not in kept
    assert evicted > 10  # the image left the cache, and the stream went on exactly
    other = model(input_ids=ids[:, : at + 2], pixel_values=pixels.flip(-1), use_cache=False).logits[0, -1]
    assert float((other - got[0]).abs().max()) > 1e-2
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY):  # generate() with the image: as the plain loop
        prompt = ids[:, : at + 2]
        seq = model.generate(prompt, pixel_values=pixels, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                             do_sample=False, pad_token_id=0)
        out = model(input_ids=seq[:, : at + 2], pixel_values=pixels, use_cache=True)
        cache, picks = out.past_key_values, [out.logits[0, -1].argmax()]
        for t in range(at + 2, seq.shape[1] - 1):
            picks.append(model(input_ids=seq[:, t : t + 1], use_cache=True, past_key_values=cache).logits[0, -1].argmax())
    assert torch.equal(torch.stack(picks), seq[0, at + 2 :])
