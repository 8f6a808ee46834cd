"""kvl.verify / kvpress-lite verify: the exactness checks on a user's model, cut to its first
layers. Exact families pass; a wrong position scheme is caught."""

import dataclasses

import pytest
import torch

import kvpress_lite as kvl
from kvpress_lite.cli import main
from kvpress_lite.tiny import tiny_model


@pytest.mark.parametrize("family,layers", [("llama", 2), ("gpt2", 2), ("gpt_neox", 2), ("bloom", 2),
                                           ("gemma3_text", 6)])
def test_served_families_verify_exact(family, layers):
    model = tiny_model(family, num_layers=layers)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = kvl.verify(model)
    assert report.exact, str(report)
    assert {c.name for c in report.checks} >= {"no-op", "bounded", "shifted"}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is left as it was


V5 = int(__import__("transformers").__version__.split(".")[0]) >= 5
NEW_FAMILIES = ["bart", "whisper", "marian", "roberta"] + (["falcon_h1", "bamba", "mllama", "ergo"] if V5 else [])


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_the_new_families_verify_exact(family):
    """The decoders of encoder-decoders (positions handed at their table), RoBERTa (its table's offset,
    measured by verify itself), a parallel hybrid (Falcon-H1: its Mamba-2 part over every token in the
    reference), Bamba and Mllama (their index lists renumbered in the cut copies), Ergo."""
    report = kvl.verify(tiny_model(family, num_layers=4 if family == "ergo" else 2))  # ergo: 3 sliding, then full
    assert report.exact, str(report)
    assert any(c.name == "shifted" and c.status == "exact" for c in report.checks), str(report)


@pytest.mark.parametrize("family,blind", [("bart", {"position_module": ""}),
                                          ("roberta", {"positions": kvl.learned_positions("max_position_embeddings")})])
def test_verify_catches_positions_that_miss_the_table(family, blind):
    """Without its position module BART's decoder never sees the press's positions; the plain learned
    scheme reads RoBERTa's table from row 0: verify must not call either exact."""
    model = tiny_model(family, num_layers=2)
    good = kvl.find_adapter(model)
    blind = dataclasses.replace(good, name="blind", **blind)
    if family == "bart" and not V5:  # 4.5x's decoder takes no **kwargs either: the press refuses it, naming why
        with pytest.raises(kvl.UnsupportedModelError, match="position_module"):
            kvl.verify(model, adapter=blind)
        return
    report = kvl.verify(model, adapter=blind)
    assert not report.exact
    assert any(c.name in ("shifted", "absolute") and c.status == "FAILED" for c in report.checks), str(report)


def test_a_wrong_position_scheme_fails_the_shifted_check():
    model = tiny_model("llama")
    good = kvl.find_adapter(model)

    def wrong(m):  # the right frequencies in the wrong layout: interleaved pairs instead of rotate-half
        scheme = good.positions(m)
        return dataclasses.replace(scheme, interleaved=True, description="wrong")

    report = kvl.verify(model, adapter=dataclasses.replace(good, name="wrong", positions=wrong))
    assert not report.exact
    shifted = [c for c in report.checks if c.name == "shifted"]
    assert shifted and shifted[0].status == "FAILED" and shifted[0].error > 1e-3


def test_the_command_prints_the_verdict_and_exits_by_it(tmp_path, capsys):
    tiny_model("gpt_neox").save_pretrained(tmp_path)
    assert main(["verify", str(tmp_path)]) == 0
    assert "EXACT" in capsys.readouterr().out
    assert main(["verify", str(tmp_path), "--adapter", "gpt2"]) == 2  # an adapter that does not fit: refused
