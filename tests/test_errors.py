"""Bad input gets a clear error naming what was wrong and what to do; nothing half-done."""

import pytest
import torch

import kvpress_lite as kvl
from helpers import generate
from tiny_models import tiny_model


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_sink=-1, capacity=8), "n_sink must be >= 0"),
        (dict(n_sink=4, capacity=4), "capacity must be greater than n_sink"),
        (dict(n_sink=4, capacity=256, compression_ratio=0.5), "one of capacity .* or compression_ratio .*not both"),
        (dict(n_sink=4.5, capacity=256), "n_sink must be an integer, got float"),
        (dict(n_sink=4, capacity="256"), "capacity must be an integer, got str"),
        (dict(n_sink=4, capacity=256, position_shift="no"), "position_shift must be True or False, got str"),
        (dict(n_sink=4, compression_ratio=0.0), "strictly between 0 and 1"),
        (dict(n_sink=4, compression_ratio=1.0), "strictly between 0 and 1"),
        (dict(n_sink=4, compression_ratio=1.5), "strictly between 0 and 1"),
        (dict(n_sink=4, capacity=32, prefill_chunk_size=0), "prefill_chunk_size must be a positive int"),
    ],
)
def test_bad_arguments_say_which_and_why(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kvl.StreamingLLMPress(**kwargs)


def test_apply_press_defaults_to_capacity_256_and_checks_arguments():
    model = tiny_model("llama")
    with kvl.apply_press(model) as press:
        assert press.capacity == 256 and press.n_sink == 4
    with pytest.raises(ValueError, match="capacity must be greater than n_sink"):
        kvl.apply_press(model, n_sink=8, capacity=8)


def test_unsupported_model_names_class_type_adapters_and_the_way_out():
    model = tiny_model("llama")
    model.config.model_type = "my_own_llm"  # a family no plugin knows
    with pytest.raises(kvl.UnsupportedModelError) as err:
        kvl.apply_press(model, capacity=32)
    message = str(err.value)
    for part in ("LlamaForCausalLM", "model_type='my_own_llm'", "llama", "plugin", "entry-points"):
        assert part in message


def test_unknown_adapter_name_lists_the_known_ones():
    with pytest.raises(kvl.UnsupportedModelError, match="no adapter named 'mistral'.*llama"):
        kvl.apply_press(tiny_model("llama"), capacity=32, adapter="mistral")


def test_a_second_press_on_the_same_model_is_refused():
    model = tiny_model("gpt_neox")
    press = kvl.apply_press(model, capacity=32)
    with pytest.raises(kvl.PressAlreadyAppliedError, match="already carries a kvpress-lite press"):
        kvl.apply_press(model, capacity=64)
    with pytest.raises(kvl.PressAlreadyAppliedError):
        kvl.apply_press(model.base_model, capacity=64)  # the same decoder, reached another way
    with pytest.raises(kvl.PressAlreadyAppliedError, match="already registered"):
        press.register(tiny_model("llama"))
    press.remove()
    kvl.apply_press(model, capacity=64).remove()


def test_beam_search_is_refused():
    model = tiny_model("llama")
    with kvl.apply_press(model, n_sink=4, capacity=16):
        with pytest.raises(kvl.UnsupportedGenerationError, match="beam search"):
            model.generate(torch.randint(0, 128, (1, 8)), num_beams=2, max_new_tokens=30, min_new_tokens=30,
                           do_sample=False, pad_token_id=0)


def test_static_cache_is_refused():
    model = tiny_model("llama")
    with kvl.apply_press(model, n_sink=4, capacity=16):
        with pytest.raises(kvl.UnsupportedGenerationError, match="static cache"):
            model.generate(torch.randint(0, 128, (1, 8)), cache_implementation="static", max_new_tokens=20,
                           pad_token_id=0)


def test_assisted_decoding_is_refused():
    model = tiny_model("llama")
    assistant = tiny_model("llama", num_hidden_layers=1)  # a different model, so some drafts get rejected
    with kvl.apply_press(model, n_sink=4, capacity=16):
        with pytest.raises(kvl.UnsupportedGenerationError, match="assisted|went back"):
            model.generate(torch.randint(0, 128, (1, 8)), assistant_model=assistant, max_new_tokens=40,
                           min_new_tokens=40, do_sample=False, pad_token_id=0)


def test_a_4d_mask_is_refused_while_pressed():
    model = tiny_model("llama")
    mask = torch.zeros(1, 1, 5, 5)
    with kvl.apply_press(model, capacity=16):
        with pytest.raises(kvl.UnsupportedGenerationError, match="4D attention_mask"):
            model(input_ids=torch.randint(0, 128, (1, 5)), attention_mask=mask, use_cache=True)


def test_compression_ratio_too_strong_for_the_prompt():
    model = tiny_model("llama")
    with kvl.apply_press(model, n_sink=4, compression_ratio=0.9):
        with pytest.raises(ValueError, match="compression_ratio=0.9 on a prompt of 20 tokens"):
            generate(model, torch.randint(0, 128, (1, 20)), 5)
