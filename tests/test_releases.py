"""The verified transformers releases: written once (kvpress_lite/releases.py), installed by the
Makefile, and a press on a newer release says so once."""

import logging
import os
import subprocess
from pathlib import Path

import pytest
import transformers

import kvpress_lite as kvl
from kvpress_lite import releases
from tiny_models import tiny_model

ROOT = Path(__file__).parent.parent


def test_the_makefile_installs_the_releases_written_in_one_place():
    def installs(target: str, **variables) -> str:
        args = ["make", "-n", "-B", target] + [f"{k}={v}" for k, v in variables.items()]
        # run from a make of its own (CI's test-oldest), the variables it was given would pass down
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "TRANSFORMERS", "VENV")}
        return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout

    assert f'"transformers=={releases.NEWEST_VERIFIED}"' in installs("setup", VENV="/nonexistent-venv")
    assert f"TRANSFORMERS={releases.OLDEST_SUPPORTED}" in installs("test-oldest")
    assert "make test\nmake test-oldest" in (ROOT / ".ci" / "run").read_text()


def test_the_suite_runs_on_a_verified_release_unless_it_is_the_canary():
    """CI's result must not move with PyPI: only `make test-latest` runs on another release."""
    if "/.venv-latest/" in transformers.__file__:
        pytest.skip("make test-latest: the canary runs on whatever transformers is newest")
    assert transformers.__version__ in (releases.OLDEST_SUPPORTED, releases.NEWEST_VERIFIED)


@pytest.mark.parametrize("installed, warns", [("99.0.0", True), (releases.NEWEST_VERIFIED, False),
                                              (releases.OLDEST_SUPPORTED, False)])
def test_a_release_newer_than_verified_is_named_once(monkeypatch, caplog, installed, warns):
    monkeypatch.setattr(releases, "installed_version", lambda: installed)
    monkeypatch.setattr(releases, "_warned", False)
    model = tiny_model("llama")
    with caplog.at_level(logging.WARNING, logger="kvpress_lite.releases"):
        kvl.apply_press(model, capacity=16).remove()
        kvl.apply_press(model, capacity=16).remove()
    said = [r.getMessage() for r in caplog.records if r.name == "kvpress_lite.releases"]
    if warns:
        assert len(said) == 1 and "99.0.0" in said[0] and "kvpress-lite verify" in said[0]
    else:
        assert not said


def test_version_strings_compare_by_release_number():
    assert releases.version_tuple("5.25.0.dev0") == (5, 25, 0)
    assert releases.newer_than_verified("5.100.0") and not releases.newer_than_verified("5.3.1")
    with pytest.raises(ValueError, match="not a release version"):
        releases.version_tuple("main")
