"""The float checks under every CPU kernel choice, on whatever machine runs the suite.

PyTorch picks its CPU kernels (and inductor its vector ISA) by the processor: AVX-512 on an
Intel Xeon, AVX2 on most AMD EPYCs, plain C++ loops under ``ATEN_CPU_CAPABILITY=default``. Each
rounds differently, and a bound chosen on one of them once failed on another. Here the checks
whose bounds are float bounds (tests/bounds.py: compiled vs eager, float32 vs the float64
reference, the conformance oracle) run again in a subprocess per capability, so one machine
exercises them all. A capability the processor lacks cannot be forced (PyTorch falls back to the
best it has): that one is skipped, naming the processor's own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent
CHECKS = [
    "tests/test_static_long.py",
    "tests/test_reference.py",
    "tests/test_static.py::test_the_static_cache_gives_the_eager_press_logits",
    "tests/test_static.py::test_compiled_streaming_compiles_once_and_never_recompiles",
    "tests/test_press_reference.py",
]
FAMILIES = ["tests/conformance/test_conformance.py::test_family[" + t + "]"  # every kind of positions
            for t in ("llama", "gpt_neox", "gpt2", "cohere", "gemma3_text", "phi", "gptj", "opt")]
ORDER = ["default", "avx2", "avx512"]  # PyTorch's CPU capabilities, weakest first (x86)
TIMEOUT_S = 900


def capability_in(env: dict) -> str:
    """The capability PyTorch actually uses in a fresh process with this environment."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip().lower()


@pytest.mark.parametrize("capability", ORDER)
def test_float_checks_pass_under_each_cpu_capability(capability, tmp_path):
    native = torch.backends.cpu.get_cpu_capability().lower()
    if native not in ORDER:
        pytest.skip(f"not an x86 capability: {native}")
    # inductor's compiled-code cache is keyed without the capability: a kernel built for AVX-512
    # fails to compile against the headers of another, so each capability gets its own cache
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, OMP_NUM_THREADS="1",
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    used = capability_in(env)
    if used != capability:
        assert ORDER.index(capability) > ORDER.index(native), f"asked for {capability}, PyTorch used {used}"
        pytest.skip(f"this processor's best is {native}: {capability} cannot be forced here")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CHECKS, *FAMILIES]
    run = subprocess.run(command, cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    tail = "\n".join((run.stdout + run.stderr).splitlines()[-30:])
    assert run.returncode == 0, f"ATEN_CPU_CAPABILITY={capability}:\n{tail}"
    assert " passed" in tail and " failed" not in tail, tail
