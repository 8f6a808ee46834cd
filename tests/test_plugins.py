"""Plugin discovery end to end: the example distributions under plugins/ are really
installed (pip, into a temporary folder put on sys.path), found through their entry points,
listed with their distribution, and used; broken plugins are reported and skipped."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import kvpress_lite as kvl
from kvpress_lite import registry
from bounds import assert_float32_close
from helpers import loop_logits
from tiny_models import tiny_model

PLUGINS = Path(__file__).resolve().parent.parent / "plugins"


@pytest.fixture(scope="module")
def installed_plugins(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    for name in ("kvpress-lite-roberta", "kvpress-lite-broken"):
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
             "--target", str(target), str(PLUGINS / name)],
            check=True,
        )
    sys.path.insert(0, str(target))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = registry.get_registry(reload=True)
        reg.adapters()
    yield reg, [str(w.message) for w in caught]
    sys.path.remove(str(target))
    for module in ("kvpress_lite_roberta", "kvpress_lite_broken_hook", "kvpress_lite_broken_import"):
        sys.modules.pop(module, None)
    registry.get_registry(reload=True)


def test_builtin_adapters_come_through_entry_points():
    infos = {a.name: a for a in kvl.available_adapters()}
    assert {"gpt_neox", "llama", "gpt2"} <= set(infos)
    for name in ("gpt_neox", "llama", "gpt2"):
        assert infos[name].distribution == "kvpress-lite"
        assert infos[name].plugin == name  # registered under its entry-point name, like any plugin


def roberta_decoder(num_layers):
    """A tiny random RoBERTa used as a causal LM (is_decoder), weights seeded like tiny_models."""
    from transformers import RobertaConfig, RobertaForCausalLM

    config = RobertaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=66, is_decoder=True, pad_token_id=1)
    model = RobertaForCausalLM(config)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for name, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * (0.2 if p.ndim >= 2 else 0.1) + (1.0 if "LayerNorm.weight" in name else 0.0))
    return model.eval()


@pytest.mark.parametrize("shift", [True, False])
def test_third_party_plugin_with_its_own_position_scheme_streams_exactly(installed_plugins, shift):
    """The example plugin serves RoBERTa, whose positions start at padding_idx + 1, through its own
    scheme. Reference (one layer, so keys depend only on token and position): token t's logits equal a
    dense forward over the kept tokens at the positions the paper's semantics gives them, plus 2."""
    infos = {a.name: a for a in kvl.available_adapters()}
    assert infos["roberta"].distribution == "kvpress-lite-roberta" and infos["roberta"].version == "0.1.0"
    model, n_sink, capacity = roberta_decoder(1), 2, 8
    length = 120 if shift else 60  # shifted, the stream runs past the table's 64 positions; absolute, it cannot
    ids = torch.randint(2, 128, (1, length), generator=torch.Generator().manual_seed(11))  # no padding id (1)
    # kvpress-lite serves RoBERTa built in (roberta_decoder); the example plugin's own scheme is chosen by name
    with kvl.apply_press(model, n_sink=n_sink, capacity=capacity, position_shift=shift, adapter="roberta") as press:
        assert press.adapter.name == "roberta" and "row 2" in press.positions.description
        got = loop_logits(model, ids, 4)
        assert press.stats.cache_length == [capacity]
    for t in range(3, length - 1):
        kept = [j for j in range(t + 1) if j < n_sink or j >= t - (capacity - n_sink)]
        positions = [min(j, capacity - 1) for j in kept] if shift else kept  # slots, or absolute
        with torch.no_grad():
            want = model(input_ids=ids[:, kept], position_ids=torch.tensor([[p + 2 for p in positions]]),
                         attention_mask=torch.ones(1, len(kept), dtype=torch.long)).logits[0, -1]
        assert_float32_close(got[t], want, model, capacity + 1, runs=2)
    with pytest.raises(ValueError, match="exceeds the 64 learned positions"):  # 66 rows, from row 2
        kvl.apply_press(model, capacity=65, adapter="roberta")


def test_broken_plugins_are_reported_by_name_and_skipped(installed_plugins):
    reg, messages = installed_plugins
    assert any("broken_import" in m and "failed to import" in m for m in messages), messages
    assert any("broken_hook" in m and "raised" in m for m in messages), messages
    assert {"gpt_neox", "llama", "gpt2", "roberta"} <= set(reg.adapters())
    assert len(reg.problems) == 2


@pytest.mark.filterwarnings("ignore:kvpress-lite plugin")
def test_plugin_selection_by_environment(monkeypatch):
    monkeypatch.setenv(registry.PLUGINS_ENV, "llama")
    try:
        assert [a.name for a in registry.get_registry(reload=True).adapters().values()] == ["llama"]
        with pytest.raises(kvl.UnsupportedModelError, match="Adapters found: llama"):
            kvl.apply_press(tiny_model("gpt2"), capacity=32)
    finally:
        monkeypatch.delenv(registry.PLUGINS_ENV)
        registry.get_registry(reload=True)
