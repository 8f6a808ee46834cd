"""Conformance of every causal-LM type of the installed transformers.

For each model type in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` a tiny random model is built
(kvpress_lite/tiny.py). If the registry has an adapter for the type, the press is applied WITHOUT
forcing the adapter (``apply_press`` must find it) and the checks of oracle.py must pass:
(a) no-op, (b) bounded cache, (c) generate() = loop, (f) multi-layer absolute reference where
the model takes per-layer-type masks, and (d)/(e) one-layer dense references per layer kind,
under eager and sdpa attention, and for families with sliding-window layers both with windows
the layers keep themselves and with windows wider than the capacity. If no adapter lists the
type, ``apply_press`` must raise :class:`UnsupportedModelError` before any forward.

``KVPRESS_LITE_SUPPORT_TABLE=path`` writes the support table (conftest.py) at the end.

The survey that chose the adapters (which candidate makes each family exact, and why the
others are refused) is survey.py in this folder.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import kvpress_lite as kvl
from bounds import float32_bound
import kvpress_lite_adapters._rope_extra as extra
from oracle import (
    CAPACITY,
    N_SINK,
    NARROW_WINDOW,
    RECURRENT_KINDS,
    TOL,
    WIDE_WINDOW,
    CheckFailed,
    check_positions,
    run_checks,
)
from support import RESULTS
from kvpress_lite.tiny import (
    NotBuildable,
    all_model_types,
    layer_variants,
    optional_window,
    tiny_config,
    tiny_model,
    two_layer_pattern,
    windowed_variant,
)

TYPES = all_model_types()

SURVEYED_ON_5X = int(transformers.__version__.split(".")[0]) >= 5  # the survey ran on 5.x (types added since)


def registered() -> dict:
    """model_type -> AdapterInfo, from the registry's public listing."""
    out = {}
    for info in kvl.available_adapters():
        for model_type in info.model_types:
            out.setdefault(model_type, info)
    return out


def oracle_scheme(scheme) -> str:
    """Reference semantics for (e): absolute tables (learned, sinusoidal) vs relative (RoPE, NoPE)."""
    return "learned" if type(scheme).__name__ in ("AbsoluteEmbedding", "LearnedPositions") else "rope"


def scheme_text(scheme) -> str:
    text = getattr(scheme, "description", "") or type(scheme).__name__
    return text


def supports_sdpa(model_type: str, pattern) -> bool:
    try:
        tiny_model(model_type, 2, "sdpa", layer=pattern)
    except Exception:
        return False
    return True


def recurrent_variant(model_type: str, variant: int) -> bool:
    """True when layer ``variant`` of the family's default pattern is a hybrid's recurrent kind."""
    from transformers import AutoConfig

    types = getattr(AutoConfig.for_model(model_type), "layer_types", None) or []
    return variant < len(types) and types[variant] in RECURRENT_KINDS


def regimes(model_type: str, variants: list[int]) -> list[tuple[str, int, tuple, bool]]:
    """(name, window, windowed kinds skipped one-layer, sliding forced) per window regime."""
    windowed = tuple(v for v in variants if windowed_variant(model_type, v))
    attention = [v for v in variants if not recurrent_variant(model_type, v)]  # a hybrid's attention kinds
    out = [("narrow", NARROW_WINDOW, windowed, False)]
    if windowed:
        out.append(("wide", WIDE_WINDOW, (), False))
        if set(windowed) == set(attention):
            out = out[1:]  # every layer windowed: narrow windows leave the press nothing to bound
    if optional_window(model_type):
        out.append(("wide-all", WIDE_WINDOW, (), True))
    return out


def two_layer_model(model_type: str):
    """``(model, pattern)``: two eager layers, a full and a sliding one where the family has both
    (``pattern``), else the family's default two layers (``pattern`` None)."""
    pattern = two_layer_pattern(model_type)
    try:
        return tiny_model(model_type, 2, "eager", layer=pattern), pattern
    except NotBuildable:
        raise
    except Exception:
        if pattern is None:
            raise
        return tiny_model(model_type, 2, "eager"), None


@pytest.mark.parametrize("model_type", TYPES)
def test_family(model_type):
    record = RESULTS.setdefault(model_type, {"type": model_type})
    try:
        model, pattern = two_layer_model(model_type)
    except NotBuildable as exc:
        record.update(status=f"not built: {exc.category}")
        pytest.skip(f"{model_type} not built tiny: {exc}")
    except Exception as exc:
        record.update(status=f"not built: {type(exc).__name__}")
        pytest.skip(f"{model_type} not built tiny: {exc!r}"[:300])

    # the model_type the press sees (4.5x builds "code_llama" as a "llama" config, say)
    info = registered().get(model.config.model_type)
    if info is None and model.config.model_type in kvl.registry.get_registry().wrappers():
        text = model.config.get_text_config()
        info = registered().get(text.model_type)  # a multimodal wrapper, served through its text model
        if info is not None:
            record.update(wrapper_of=text.model_type)
    if info is None:
        calls = []
        handle = model.register_forward_pre_hook(lambda *a, **k: calls.append(1))
        try:
            with pytest.raises(kvl.UnsupportedModelError) as caught:
                kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY)
        finally:
            handle.remove()
        assert not calls, "apply_press ran a forward before refusing"
        record.update(status="refused", reason=str(caught.value).splitlines()[0][:300])
        return
    try:  # an adapter may decline a model on this release (a version it was not verified on): a clean refusal
        info.adapter.positions(_subject(model))
    except kvl.UnsupportedModelError as exc:
        with pytest.raises(kvl.UnsupportedModelError):
            kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY)
        record.update(status="refused", adapter=info.name, reason=str(exc).splitlines()[0][:300])
        return
    # accepted: every check must pass, on every transformers release the suite runs on
    _check_registered(model_type, model, info, pattern, record)


def _subject(model):
    """What an adapter reads: the model, or a wrapper's text model (kvpress_lite.wrappers.text_view)."""
    from kvpress_lite.wrappers import text_view

    view = text_view(model)
    wrapper = model.config.model_type in kvl.registry.get_registry().wrappers()
    return view if view is not None and wrapper else model


def cache_kinds(model) -> str:
    """The kinds of cache layer the model's own cache has: full, sliding-window, or both."""
    from kvpress_lite.cache_access import new_dynamic_cache

    layers = getattr(new_dynamic_cache(model), "layers", None) or []

    def kind(layer) -> str:
        attention = "sliding" if getattr(layer, "is_sliding", False) else "full"
        if hasattr(layer, "conv_states"):  # a hybrid's state layer, or one holding both
            return "recurrent" if not hasattr(layer, "keys") else f"recurrent & {attention}"
        return attention

    kinds = sorted({kind(layer) for layer in layers})
    return " + ".join(kinds) or "full"


def _check_registered(model_type, model, info, pattern, record):
    record.update(adapter=info.name, plugin=info.plugin, cache=cache_kinds(model))
    scheme = info.adapter.positions(_subject(model))
    record.update(positions=scheme_text(scheme))
    variants = layer_variants(model_type)
    attns = ["eager"] + (["sdpa"] if supports_sdpa(model_type, pattern) else [])
    done = []
    plan = regimes(model_type, variants)
    for regime, window, skip, sliding in plan:
        models: dict = {}
        if regime == "narrow" and len(plan) > 1 and (refusal := _refuses_regime(model_type, pattern, window)):
            # windows narrower than the capacity that the adapter refuses cleanly at apply_press (Llama 4's
            # chunks must hold the whole cache); the wider regimes below must pass every check
            done.append(f"narrow windows refused: {refusal}"[:120])
            continue

        def build(num_layers, attn, variant, window=window, sliding=sliding, models=models):
            key = (num_layers, attn, variant)
            if key not in models:
                layer = pattern if (num_layers == 2 and variant is None) else variant
                models[key] = tiny_model(model_type, num_layers, attn, layer=layer, window=window, sliding=sliding)
            return models[key]

        for attn in attns:
            try:
                run_checks(build, None, oracle_scheme(scheme), attn, tuple(variants), skip)
            except CheckFailed as exc:
                record.update(status=f"FAILED ({attn}, {regime} windows): {exc}"[:300])
                raise
            except Exception as exc:
                record.update(status=f"ERROR ({attn}, {regime} windows): {type(exc).__name__}: {exc}"[:300])
                raise
            done.append(attn if regime == "narrow" else f"{attn} {regime}")
    record.update(status="exact (" + ", ".join(done) + ")")


def _refuses_regime(model_type, pattern, window) -> str:
    """The first line of apply_press's refusal on the 2-layer model of this window regime, or ''."""
    model = tiny_model(model_type, 2, "eager", layer=pattern, window=window)
    try:
        kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY).remove()
    except kvl.UnsupportedModelError as exc:
        return str(exc).splitlines()[0]
    return ""


# -- the checks can fail --------------------------------------------------------------------


def _one_layer(model_type, **kwargs):
    return tiny_model(model_type, 1, "eager", **kwargs)


def test_rotate_half_on_an_interleaved_family_fails_the_shifted_check():
    wrong = kvl.Adapter(name="wrong", model_types=("cohere",), attention_path="layers.*.self_attn",
                        positions=kvl.rope_positions("rotary_emb", interleaved=False))
    model = _one_layer("cohere")
    assert check_positions(model, wrong, False, "rope") <= TOL  # absolute positions cannot tell
    with pytest.raises(CheckFailed, match=r"^\(e\)"):
        check_positions(model, wrong, True, "rope")


def test_rope_on_nope_layers_fails_the_shifted_check():
    wrong = kvl.Adapter(name="wrong", model_types=("smollm3",), attention_path="layers.*.self_attn",
                        positions=kvl.rope_positions("rotary_emb"))
    nope_kind = [k for k in layer_variants("smollm3") if k][0]
    with pytest.raises(CheckFailed, match=r"^\(e\)"):
        check_positions(_one_layer("smollm3", layer=nope_kind), wrong, True, "rope")
    right = kvl.Adapter(name="right", model_types=("smollm3",), attention_path="layers.*.self_attn",
                        positions=extra.nope_layers_positions("rotary_emb"))
    assert check_positions(_one_layer("smollm3", layer=nope_kind), right, True, "rope") <= TOL


def test_learned_positions_reference_is_not_the_rope_one():
    """GPT-2 under the shift keeps each key at the slot it was inserted in: a reference at
    positions 0..L-1 (the RoPE semantics) must disagree, the slot reference must agree."""
    model = _one_layer("gpt2")
    assert check_positions(model, None, True, "learned") <= TOL
    with pytest.raises(CheckFailed, match=r"^\(e\)"):
        check_positions(model, None, True, "rope")


@pytest.mark.parametrize("model_type", ["bart", "marian"])
def test_a_decoder_counting_its_own_positions_needs_them_at_its_table(model_type):
    """BART's and Marian's decoders take no position_ids and count positions from the cache
    length: without the adapter's position_module the press's positions never arrive, and both
    position checks see it (the absolute one and the shifted one)."""
    import dataclasses

    served = registered()[model_type].adapter
    model = _one_layer(model_type)
    assert check_positions(model, served, True, "learned") <= TOL
    blind = dataclasses.replace(served, name="blind", position_module="")
    if not SURVEYED_ON_5X:  # 4.5x's decoders take no **kwargs: the press cannot hand positions, and says so
        with pytest.raises(kvl.UnsupportedModelError, match="position_module"):
            kvl.apply_press(model, adapter=blind)
        return
    for shift, check in ((True, "e"), (False, "d")):
        with pytest.raises(CheckFailed, match=rf"^\({check}\)"):
            check_positions(model, blind, shift, "learned")


def test_roberta_positions_without_the_padding_offset_fail_both_position_checks():
    """RoBERTa reads position p at row padding_idx + 1 + p; the plain learned scheme (row p) is
    caught by the absolute and the shifted checks, whose reference measures the model's own offset."""
    model = _one_layer("roberta")
    assert check_positions(model, registered()["roberta"].adapter, True, "learned") <= TOL
    plain = kvl.Adapter(name="plain", model_types=("roberta",), attention_path="encoder.layer.*.attention",
                        positions=kvl.learned_positions("max_position_embeddings"))
    for shift, check in ((True, "e"), (False, "d")):
        with pytest.raises(CheckFailed, match=rf"^\({check}\)"):
            check_positions(model, plain, shift, "learned")


@pytest.mark.skipif(not SURVEYED_ON_5X, reason="Falcon-H1 is served on transformers >= 5")
def test_a_parallel_hybrid_is_checked_against_its_mamba_over_every_token():
    """Falcon-H1 runs Mamba-2 beside attention in every layer; under the press the Mamba part sees every
    token, so the one-layer reference is a forward over the whole prefix with the attention masked to the
    kept tokens. It must differ from a forward over the kept tokens alone (else the Mamba part would be
    untested), and RoPE-less positions must fail against it."""
    from oracle import dense_logits, kept_indices, prefix_logits, recurrent_beside_attention, stream_ids

    model = _one_layer("falcon_h1")
    assert recurrent_beside_attention(model)
    ids, t = stream_ids(), 15
    kept = kept_indices(t)
    whole = prefix_logits(model, ids[0, : t + 1], kept, list(range(len(kept))))
    alone = dense_logits(model, ids[0, kept], list(range(len(kept))))
    assert float((whole - alone).abs().max() / whole.abs().max()) > 100 * TOL
    assert check_positions(model, None, True, "rope") <= TOL
    blind = kvl.Adapter(name="blind", model_types=("falcon_h1",), attention_path="layers.*.self_attn",
                        positions=kvl.no_positions())
    with pytest.raises(CheckFailed, match=r"^\(e\)"):
        check_positions(model, blind, True, "rope")


def test_unbounded_cache_fails_the_bounded_check():
    """OPT's causal-LM wrapper calls model.decoder directly: the press's hooks on the base model
    never run, and only the bounded check notices."""
    from oracle import check_bounded, check_noop

    sneaky = kvl.Adapter(name="sneaky", model_types=("opt",), attention_path="decoder.layers.*.self_attn",
                         positions=kvl.learned_positions("max_position_embeddings"))
    model = tiny_model("opt", 2)
    assert check_noop(model, sneaky) == 0.0
    with pytest.raises(CheckFailed, match=r"^\(b\)"):
        check_bounded(model, sneaky)


@pytest.mark.skipif(not SURVEYED_ON_5X, reason="older releases lack types the adapters list")
def test_every_registered_type_is_a_causal_lm_type():
    """A typo in an adapter's model_types would silently serve nothing. (A composite type that
    AutoModelForCausalLM builds as its text model, Emu3's or Mllama's, is served under that text type.)"""
    from kvpress_lite.tiny import text_type_of

    unknown = sorted(set(registered()) - set(TYPES) - {text_type_of(t) for t in TYPES} - {"qwen2"})
    assert not unknown, unknown


@pytest.mark.parametrize("model_type", ["llama"])
def test_the_config_is_tiny(model_type):
    config = tiny_config(model_type, 2)
    assert config.hidden_size == 64 and config.vocab_size == 128
    assert torch.finfo(tiny_model(model_type, 2).dtype).bits == 32


@pytest.mark.parametrize("model_type", TYPES)
def test_static_cache_matches_the_press(model_type):
    """Every family the static (compiled) cache accepts streams exactly as under the eager press,
    which the checks above tie to the dense references; the others are refused with a reason."""
    from transformers import DynamicCache

    from kvpress_lite.cache_access import model_cache_kwarg
    from kvpress_lite.static import StreamingCache

    try:
        model, _ = two_layer_model(model_type)  # a full and a sliding layer where the family has both
    except Exception as exc:  # not buildable tiny: test_family records why
        pytest.skip(f"{model_type} not built tiny: {exc}"[:200])
    wrapper = model.config.model_type in kvl.registry.get_registry().wrappers()
    if registered().get(model.config.model_type) is None and not wrapper:
        return  # refused by the registry: test_family checks that
    try:
        cache = StreamingCache(model, n_sink=N_SINK, capacity=CAPACITY)
    except kvl.UnsupportedModelError as exc:
        RESULTS.setdefault(model_type, {})["static"] = "refused: " + str(exc)[:120]
        return
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(5))
    name = model_cache_kwarg(model)

    @torch.no_grad()
    def stream(cache):
        out = [model(input_ids=ids[:, :4], use_cache=True, **{name: cache}).logits[0, -1]]
        for t in range(4, 30):
            out.append(model(input_ids=ids[:, t : t + 1], use_cache=True, **{name: cache}).logits[0, -1])
        return torch.stack(out)

    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY):
        want = stream(DynamicCache(config=model.config))
    got = stream(cache)
    # the same logits computed through two caches: the float32 bound for two runs (tests/bounds.py)
    scale = want.abs().max().clamp(min=1.0)
    assert float((got - want).abs().max() / scale) <= float32_bound(model.config, CAPACITY + 4, runs=2)
    RESULTS.setdefault(model_type, {})["static"] = "exact"


def test_every_type_of_this_release_has_been_triaged():
    """A transformers release brings new causal-LM types: each must be served by an adapter or
    refused by a declared reason (adapters/refusals.py) before it ships here. An unknown one is
    refused at apply_press too, but nobody has looked at it: this test names them all."""
    from kvpress_lite.registry import support_for

    def config_type(model_type: str) -> str:  # 4.5x's code_llama is a LlamaConfig: the press sees "llama"
        try:
            return transformers.AutoConfig.for_model(model_type).model_type
        except Exception:
            return model_type

    untriaged = [t for t in TYPES if support_for(t).status == "unknown" and support_for(config_type(t)).status == "unknown"]
    assert not untriaged, (
        f"transformers {transformers.__version__} has causal-LM types nobody has triaged: {', '.join(untriaged)}. "
        "Run tests/conformance/survey.py on them, then add each to an adapter or to adapters/refusals.py."
    )


@pytest.mark.skipif(not SURVEYED_ON_5X, reason="latent attention caches its latent and rotary part on transformers 5 only")
def test_latent_attention_rotated_in_the_key_slot_fails_the_shifted_check():
    """DeepSeek V3 keeps its rotary key part in the cache's value slot: a scheme that re-rotates
    the key slot (the position-free latent) must fail (e); the value slot must pass."""
    def adapter(slot):
        return kvl.Adapter(name=f"mla-{slot}", model_types=("deepseek_v3",), attention_path="layers.*.self_attn",
                           positions=kvl.rope_positions("rotary_emb", rotary_slot=slot))

    model = _one_layer("deepseek_v3")
    with pytest.raises((CheckFailed, RuntimeError)):
        check_positions(model, adapter("keys"), True, "rope")
    assert check_positions(model, adapter("values"), True, "rope") <= TOL
