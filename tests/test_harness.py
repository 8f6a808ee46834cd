"""The harness's structure holds: the library needs none of it, nothing imports in a circle, and
every method name means one thing everywhere."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"kvpress_lite": ROOT / "kvpress_lite", "kvpress_lite_harness": ROOT / "benchmarks" / "kvpress_lite_harness"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.glob("*.py"):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of ours that ``name`` imports anywhere in its body (function-level imports included)."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    out = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def test_no_module_imports_itself_through_others():
    modules = _modules()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return trail + [start]
                if nxt not in seen and not nxt.endswith("__init__"):
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
        return None

    # a package's __init__ re-exporting its modules is not a cycle of the code
    cycles = [c for c in map(cycle_from, [m for m in graph if "." in m]) if c and not any("." not in n for n in c[1:-1])]
    assert not cycles, cycles[0]


def test_the_library_never_imports_the_harness():
    modules = _modules()
    for name, path in modules.items():
        if name.startswith("kvpress_lite_harness"):
            continue
        imported = _imports(name, path, set(modules))
        assert not any(m.startswith("kvpress_lite_harness") for m in imported), name
        text = path.read_text()
        for dist in ("matplotlib", "psutil", "tqdm", "gguf", "kvpress_lite_harness"):
            assert f"import {dist}" not in text and f"from {dist}" not in text, (name, dist)


def test_the_library_installs_with_torch_transformers_and_pluggy_alone():
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = sorted(dep.split(">")[0].split("=")[0].split("<")[0].strip() for dep in project["dependencies"])
    assert names == ["pluggy", "torch", "transformers"]
    assert project["optional-dependencies"].keys() == {"test"}


# None in sys.modules: `import x` fails and importlib.util.find_spec("x") says "not installed"
BLOCKER = """
import sys
for name in ("matplotlib", "psutil", "gguf", "kvpress_lite_harness"):
    sys.modules[name] = None
from kvpress_lite.cli import main
"""


def test_without_the_harness_the_core_commands_work_and_the_others_say_how_to_get_them():
    script = BLOCKER + (
        "assert main(['demo', '--tokens', '40', '--capacity', '16']) == 0\n"
        "assert main(['adapters']) == 0\n"
        "assert main(['perplexity', '--tokens', '10']) == 2\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the cache never held more than 16" in proc.stdout
    assert "kvpress-lite perplexity: this command comes with kvpress-lite's measuring harness" in proc.stderr
    assert "pip install -e benchmarks/" in proc.stderr


def test_every_method_name_is_in_the_one_vocabulary():
    from kvpress_lite_harness import compiled, latency, perplexity
    from kvpress_lite_harness.latency_report import METHOD_ORDER
    from kvpress_lite_harness.methods import VOCABULARY

    for names in (latency.ALL_METHODS, perplexity.ALL_METHODS, METHOD_ORDER, ("compiled_sinks", "compiled_dense")):
        assert set(names) <= set(VOCABULARY), set(names) - set(VOCABULARY)
    assert perplexity.DESCRIPTIONS == {m: VOCABULARY[m] for m in perplexity.ALL_METHODS}
    assert "compiled_sinks" in compiled.__doc__ and "compiled_dense" in compiled.__doc__


def test_latency_methods_name_themselves_as_the_vocabulary_says():
    """A method asked for by name measures that method: the decoder built for it carries the same name,
    and 'window' is the press without sinks in the latency runs as in the perplexity runs."""
    import torch

    from kvpress_lite_harness import models
    from kvpress_lite_harness.latency import ALL_METHODS, BenchConfig, _make_methods
    from kvpress_lite_harness.methods import ModelContext, Press

    model = models.build_model(models.resolve("tiny-llama"))
    with torch.no_grad():
        ctx = ModelContext(model, "cpu", stream_tokens=64)
        cfg = BenchConfig.from_preset("tiny", methods=list(ALL_METHODS))
        notes: list = []
        built = _make_methods(ctx, cfg, notes)
    try:
        assert [m.name for m in built] == list(ALL_METHODS) and not notes
        window = next(m for m in built if m.name == "window")
        assert isinstance(window, Press) and window.press.n_sink == 0 and window.press.position_shift
    finally:
        for m in built:
            m.close()


def test_one_registry_names_shapes_tiny_families_embedded_models_and_local_folders(tmp_path, capsys):
    from kvpress_lite.cli import main
    from kvpress_lite_harness import models
    from tiny_models import tiny_model

    assert models.resolve("default") is models.MODELS["smollm2-135m"]
    assert models.resolve("gemma3").name == "gemma3-270m"
    assert models.resolve("tiny:olmo2").loader == "tiny"
    tiny_model("llama").save_pretrained(tmp_path / "mine")
    spec = models.resolve(str(tmp_path / "mine"))
    assert spec.loader == "embedded" and spec.family == "local"
    assert models.build_model(spec).config.model_type == "llama"  # what bench builds from a user's folder
    with pytest.raises(ValueError, match="local Hugging Face model folder"):
        models.resolve(str(tmp_path / "missing"))
    # a random-weight shape has no tokenizer: perplexity says so instead of failing inside
    with pytest.raises(SystemExit, match="no tokenizer"):
        main(["perplexity", "--model", "tiny-llama", "--out", str(tmp_path)])


def _documented_commands() -> list[str]:
    """Every `kvpress-lite ...` command line the README, the benchmarks README and the Makefile show."""
    import re

    found = []
    for doc in (ROOT / "README.md", ROOT / "benchmarks" / "README.md", ROOT / "Makefile"):
        text = doc.read_text().replace("\\\n", " ").replace("$(BIN)/", "")
        for line in text.splitlines():
            match = re.match(r"\s*(kvpress-lite \S.*)", line)
            if match:
                found.append(match.group(1).split(" #")[0].strip())
    return found


def test_every_documented_command_line_parses():
    import shlex

    from kvpress_lite.cli import build_parser

    commands = _documented_commands()
    assert len(commands) >= 15
    for command in commands:
        argv = shlex.split(command)[1:]
        if "--help" in argv:
            continue
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:
            raise AssertionError(f"documented command does not parse: {command}") from exc
