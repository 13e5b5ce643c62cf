"""The C++/CUDA extension: CUDA sources compile, names agree across layers, and a broken
toolchain falls back cleanly."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastadapter.activations import ACTIVATIONS
from fastadapter.backends import extension

from .helpers import HANG_GUARD_S

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def _nvcc():
    path = shutil.which("nvcc")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("nvcc is needed in CI to compile the CUDA sources")
        pytest.skip("nvcc not found")
    return path


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cu")))
def test_cuda_source_compiles_without_spills(source, arch, tmp_path):
    """Compile only: nothing CUDA runs without a GPU, but a broken .cu never lands, and
    ptxas (-Xptxas -v) reports no stack frame and no spill for any kernel instance."""
    cmd = [_nvcc(), "-c", f"-arch={arch}", "-std=c++17", "-O3", "-Xptxas", "-v", f"-I{CSRC}", str(CSRC / source)]
    proc = subprocess.run([*cmd, "-o", str(tmp_path / "k.o")], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = proc.stdout + proc.stderr
    kernels = re.findall(r"Compiling entry function '(\w+)'", report)
    usage = re.findall(r"Used (\d+) registers", report)
    frames = [int(v) for v in re.findall(r"(\d+) bytes stack frame", report)]
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
    assert kernels and len(usage) == len(kernels), report[-3000:]
    print(f"{source} {arch}: {len(kernels)} kernel instances, {min(map(int, usage))}-{max(map(int, usage))} registers")
    assert not any(frames) and not any(spills), report[-3000:]


def test_activation_ids_agree_across_layers():
    from fastadapter.backends.cpp import ACT_INDEX

    assert list(ACT_INDEX) == list(ACTIVATIONS)
    text = (CSRC / "adapter_cpu.h").read_text()
    names = text.split("kActivationNames[] = {")[1].split("}")[0]
    assert [n.strip().strip('"') for n in names.split(",")] == list(ACTIVATIONS)
    module, reason = extension.load()
    if module is not None:
        assert list(module.activation_names()) == list(ACTIVATIONS)
    from fastadapter.kernels.adapter import ACT_IDS

    assert ACT_IDS == {name: i for i, name in enumerate(ACTIVATIONS)}


def test_cpp_builds_in_ci():
    reason = extension.load()[1]
    if reason is not None and os.environ.get("CI"):
        pytest.fail(f"the C++ extension must build in CI: {reason}")
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize(
    "source", ["cpu_residual_gemm.cpp", "cpu_activation.cpp", "cpu_weight_grad.cpp", "adapter_layernorm_cpu.cpp"]
)
def test_cpu_kernels_compile_for_any_x86_target(source, tmp_path):
    """setup.py's prebuilt extension has no -march=native: the AVX-512 and AVX2 kernels must still
    compile (by function attribute, chosen at run time) for a plain x86-64 target."""
    import platform

    from torch.utils.cpp_extension import include_paths

    if platform.machine() != "x86_64":
        pytest.skip("x86-64 only")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler ({cxx})")
    cmd = [cxx, "-std=c++17", "-O2", "-march=x86-64", "-fPIC", "-fopenmp", f"-I{CSRC}"]
    cmd += [f"-isystem{p}" for p in include_paths()] + ["-c", str(CSRC / source), "-o", str(tmp_path / "k.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_broken_toolchain_falls_back_cleanly(tmp_path):
    """No working compiler and no cached build: auto falls back to reference with one log
    line naming the reason; an explicit backend='cpp' raises it."""
    script = textwrap.dedent(
        """
        import json, logging, torch, fastadapter as fa
        records = []
        class H(logging.Handler):
            def emit(self, rec): records.append(rec.getMessage())
        logging.getLogger("fastadapter").addHandler(H())
        x, w = torch.randn(4, 8), torch.randn(2, 8)
        out = {"available": fa.available_backends()["cpp"]}
        for _ in range(3):
            y = fa.fused_adapter(x, w, None, w.t().contiguous(), None)
        out["finite"] = bool(torch.isfinite(y).all())
        out["logs"] = [m for m in records if "cpp" in m]
        try:
            fa.fused_adapter(x, w, None, w.t().contiguous(), None, backend="cpp")
            out["explicit"] = None
        except RuntimeError as e:
            out["explicit"] = str(e)
        print(json.dumps(out))
        """
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), FASTADAPTER_EXT_DIR=str(tmp_path / "ext"))
    env.pop("FASTADAPTER_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["available"] and "could not be built" in out["available"]
    assert out["finite"]
    assert len(out["logs"]) == 1 and "'reference'" in out["logs"][0] and "could not be built" in out["logs"][0]
    assert out["explicit"] and "backend 'cpp' (from backend) cannot run on cpu" in out["explicit"]


def test_stale_lock_of_a_killed_build_is_removed(tmp_path):
    """A build killed mid-way leaves torch's `lock` file in the build directory; the next
    load must not wait on it forever. (A broken compiler keeps the build short: the load
    reaches it and fails with its reason.)"""
    script = textwrap.dedent(
        """
        import json
        from fastadapter.backends import extension
        d = extension.plan(extension.csrc_dir())[3]
        (d / "lock").write_text("")
        module, reason = extension.load()
        print(json.dumps({"reason": reason, "lock": (d / "lock").exists()}))
        """
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), FASTADAPTER_EXT_DIR=str(tmp_path / "ext"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["reason"] and "could not be built" in out["reason"]
    assert not out["lock"]
    assert "left by an interrupted build" in proc.stderr


def test_concurrent_builds_share_one_cache(tmp_path):
    """Two processes building into one empty cache directory at once both get a working module."""
    script = textwrap.dedent(
        """
        import torch
        from fastadapter.backends import extension
        m, reason = extension.load()
        assert m is not None, reason
        torch.manual_seed(0)
        x = torch.randn(3, 8); w = torch.randn(2, 8)
        y, z = m.adapter_forward_cpu(x, w, None, w.t().contiguous(), None, None, 0, 1.0, True)
        print("ok", float(y.sum()))
        """
    )
    env = dict(os.environ, FASTADAPTER_EXT_DIR=str(tmp_path / "ext"))
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=HANG_GUARD_S) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-3000:]
        assert stdout.startswith("ok")
    assert outs[0][0] == outs[1][0]
    # a build says so on stderr, and how long it took; a load from the cache says nothing
    assert any("fastadapter: building the C++ extension" in err and "fastadapter: built" in err for _, err in outs)
    again = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=HANG_GUARD_S)
    assert again.returncode == 0 and again.stdout == outs[0][0] and "fastadapter: build" not in again.stderr


def test_the_build_cache_is_keyed_by_the_sources(tmp_path, monkeypatch):
    """Two checkouts with the same sources share a build; a changed source or header gets its own."""
    monkeypatch.setenv("FASTADAPTER_EXT_DIR", str(tmp_path / "ext"))
    src = extension.csrc_dir()
    copies = [tmp_path / name for name in ("a", "b", "c")]
    for c in copies:
        shutil.copytree(src, c)
    header = next(p for p in sorted(copies[2].iterdir()) if p.suffix == ".h")
    header.write_text(header.read_text() + "\n// changed\n")
    dirs = [extension.plan(c)[3] for c in copies]
    assert dirs[0] == dirs[1] == extension.plan(src)[3] and dirs[2] != dirs[0]
