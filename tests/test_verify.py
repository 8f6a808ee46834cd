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
