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
from helpers import loop_logits
from reference import reference_logits, streaming_visible
from tiny_models import tiny_model

PLUGINS = Path(__file__).resolve().parent.parent / "plugins"


@pytest.fixture(scope="module")
def installed_plugins(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    for name in ("kvpress-lite-qwen2", "kvpress-lite-broken"):
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
    for module in ("kvpress_lite_qwen2", "kvpress_lite_broken_hook", "kvpress_lite_broken_import"):
        sys.modules.pop(module, None)
    registry.get_registry(reload=True)


def test_builtin_adapters_come_through_entry_points():
    infos = {a.name: a for a in kvl.available_adapters()}
    assert {"gpt_neox", "llama", "gpt2"} <= set(infos)
    for name in ("gpt_neox", "llama", "gpt2"):
        assert infos[name].distribution == "kvpress-lite"
        assert infos[name].plugin == name  # registered under its entry-point name, like any plugin


def test_third_party_plugin_is_found_listed_and_used(installed_plugins):
    infos = {a.name: a for a in kvl.available_adapters()}
    assert infos["qwen2"].distribution == "kvpress-lite-qwen2" and infos["qwen2"].version == "0.1.0"
    model = tiny_model("qwen2")
    ids = torch.randint(0, 128, (1, 120), generator=torch.Generator().manual_seed(11))
    with kvl.apply_press(model, n_sink=4, capacity=32) as press:
        assert press.adapter.name == "qwen2"
        got = loop_logits(model, ids, 10)
        assert press.stats.cache_length == [32, 32]
    want = reference_logits(model, ids[0], streaming_visible(4, 32), rope_positions="cache").float()
    torch.testing.assert_close(got, want[:-1], atol=1e-4, rtol=0)


def test_broken_plugins_are_reported_by_name_and_skipped(installed_plugins):
    reg, messages = installed_plugins
    assert any("broken_import" in m and "failed to import" in m for m in messages), messages
    assert any("broken_hook" in m and "raised" in m for m in messages), messages
    assert {"gpt_neox", "llama", "gpt2", "qwen2"} <= set(reg.adapters())
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
