"""The cpp backend's accuracy on the code paths other CPUs take.

MKL and ATen pick their kernels by CPU at start-up (AVX-512 on one vendor's CPU, AVX2 on
another's, different summation orders in each), and the cpp backend has its own AVX-512
kernels. A user's CPU may take a path this machine does not take by default, so the
cpp accuracy tests run again in fresh processes with the paths forced through the
switches MKL and ATen read at start-up: MKL_CBWR (conditional numerical
reproducibility: a fixed instruction-set branch) and MKL_ENABLE_INSTRUCTIONS (the
highest instruction set MKL may use), and ATEN_CPU_CAPABILITY (ATen's vector width).
The in-process run of tests/test_cpu_kernel.py covers the default path and the
extension's own switch (AVX-512 kernels on and off)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import HANG_GUARD_S, require

ROOT = Path(__file__).resolve().parent.parent

PATHS = {
    "mkl-compatible": {"MKL_CBWR": "COMPATIBLE"},
    "mkl-avx2": {"MKL_CBWR": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "mkl-sse4_2": {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "aten-default": {"ATEN_CPU_CAPABILITY": "default"},
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
}

TESTS = [
    "tests/test_cpu_kernel.py",
    "tests/test_properties.py::test_random_problems_match_float64[cpp]",
]


def _env(extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MKL_", "ATEN_CPU"))}
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.mark.parametrize("name", list(PATHS))
def test_cpp_accuracy_on_forced_path(name):
    require("cpp", "cpu")
    env = _env(PATHS[name])
    if "ATEN_CPU_CAPABILITY" in env:  # ATen takes the capability when the CPU has it
        probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
        got = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
        want = env["ATEN_CPU_CAPABILITY"].upper()
        if got.strip() != want:
            pytest.skip(f"this CPU cannot run ATen at {want} (it runs {got.strip()})")
    if "MKL_CBWR" in env:  # MKL reports its reproducibility branch in verbose mode
        probe = "import torch; torch.randn(64, 64) @ torch.randn(64, 64)"
        out = subprocess.run([sys.executable, "-c", probe], env={**env, "MKL_VERBOSE": "1"}, capture_output=True, text=True)
        if "MKL_VERBOSE" in out.stdout and env["MKL_CBWR"] == "COMPATIBLE":
            assert "CNR:COMPATIBLE" in out.stdout, out.stdout[-500:]
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=", *TESTS]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, f"cpp accuracy with {PATHS[name]}:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert " passed" in proc.stdout
