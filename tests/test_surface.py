"""The open surface: a plugin's own position scheme is called through the protocol, refusals
(declared by a plugin, raised by a scheme, or from the cache layout) happen at apply_press,
before any forward, and name what to change."""

import pytest
import torch

import kvpress_lite as kvl
from kvpress_lite import registry
from helpers import loop_logits
from tiny_models import tiny_model


class CountingRotary(kvl.Rotary):
    """A plugin-defined scheme: RoPE as the built-in one, counting what the press asks of it."""

    calls: dict

    def position_ids(self, stream_positions, *, capacity, position_shift):
        self.calls["position_ids"] = self.calls.get("position_ids", 0) + 1
        return super().position_ids(stream_positions, capacity=capacity, position_shift=position_shift)

    def after_trim(self, keys, trim):
        self.calls["after_trim"] = self.calls.get("after_trim", 0) + 1
        super().after_trim(keys, trim)


class RefusingScheme(kvl.PositionScheme):
    description = "refuses everything"

    def check(self, model, *, capacity, position_shift):
        raise kvl.UnsupportedModelError("config.frobnicate=True is not supported; set it to False")


@pytest.fixture
def plugin_registry():
    """A registry with the built-ins plus one hand-registered plugin, restored afterwards."""
    reg = registry.get_registry(reload=True)
    yield reg
    registry.get_registry(reload=True)


def test_a_plugin_scheme_is_driven_through_the_protocol(plugin_registry):
    model = tiny_model("llama")
    calls: dict = {}

    def positions(m):
        scheme = CountingRotary(inv_freq=m.model.rotary_emb.inv_freq.double())
        scheme.calls = calls
        return scheme

    adapter = kvl.Adapter(name="counting", model_types=("none",), attention_path="layers.*.self_attn",
                          positions=positions)
    ids = torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(0))
    with kvl.apply_press(model, n_sink=4, capacity=16, adapter="llama"):
        builtin = loop_logits(model, ids, 8)
    with kvl.apply_press(model, n_sink=4, capacity=16, adapter=adapter) as press:
        custom = loop_logits(model, ids, 8)
        assert press.positions.description.startswith("RoPE")
    assert calls["position_ids"] == 59 - 8 + 1  # one prompt call, then one per token
    assert calls["after_trim"] == (59 - 16) * 2  # every call that evicted, in each of 2 layers
    torch.testing.assert_close(custom, builtin, atol=0, rtol=0)


def test_a_scheme_refusal_happens_at_apply_press(plugin_registry):
    model = tiny_model("llama")
    adapter = kvl.Adapter(name="refusing", model_types=("none",), attention_path="layers.*.self_attn",
                          positions=lambda m: RefusingScheme())
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with pytest.raises(kvl.UnsupportedModelError, match="config.frobnicate"):
        kvl.apply_press(model, adapter=adapter)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    kvl.apply_press(model).remove()  # nothing was left registered


class RefusalPlugin:
    @kvl.hookimpl
    def kvpress_lite_register_adapters(self, register):
        register(kvl.Refusal(model_types=("llama",), reason="this test says llama is out"))


def test_a_declared_refusal_is_the_message_when_no_adapter_serves(plugin_registry, monkeypatch):
    monkeypatch.setenv("KVPRESS_LITE_PLUGINS", "gpt2")  # built-in llama adapter not loaded
    reg = registry.get_registry(reload=True)
    reg.register_plugin(RefusalPlugin(), "refusal-test")
    assert registry.support_for("llama").status == "refused"
    with pytest.raises(kvl.UnsupportedModelError, match="this test says llama is out.*refusal-test"):
        kvl.apply_press(tiny_model("llama"))


def test_register_rejects_other_objects(plugin_registry):
    class Bad:
        @kvl.hookimpl
        def kvpress_lite_register_adapters(self, register):
            register("llama")

    plugin_registry.register_plugin(Bad(), "bad")
    with pytest.warns(RuntimeWarning, match="Adapter, Refusal or Wrapper"):
        plugin_registry.adapters()


def test_dynamic_rope_is_refused_at_apply_press_only_with_the_shift():
    model = tiny_model("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(kvl.UnsupportedModelError, match="'dynamic'.*position_shift=False"):
        kvl.apply_press(model, capacity=16)
    kvl.apply_press(model, capacity=16, position_shift=False).remove()
