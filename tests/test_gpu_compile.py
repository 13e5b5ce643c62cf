"""The Triton kernels compile for real GPUs (sm_80 and sm_90), checked without a GPU.

Every launch the `triton` backend makes (the gpu_launches() of tests/test_adapter.py,
tests/test_adapter_layernorm.py, tests/test_adapter_rmsnorm.py and tests/test_mixed_adapter.py: each activation, dtype,
residual mode or placement, set of needed gradients and padded bottleneck size, through
the launchers themselves) is compiled by Triton's compiler and ptxas for every
autotuning config its pruner keeps, and fails here on a compile error, a register spill
at r <= 128 (at r = 256 only where no config of a kernel fits), or a half-precision or
TF32 product without tensor-core instructions. tests/gpu_compile.py does the work in a
process of its own (the rest of the suite runs Triton through its interpreter); the
table it prints is in the captured output (pytest -s shows it)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import HANG_GUARD_S

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent
OPS = ["tests.test_adapter", "tests.test_adapter_layernorm", "tests.test_adapter_rmsnorm", "tests.test_mixed_adapter"]


def _run(modules, targets, tmp_path, timeout=HANG_GUARD_S):
    """Runs tests/gpu_compile.py, one process per target side by side; returns (rows, output)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    procs = []
    for target in targets:
        out = tmp_path / f"sm{target}.json"
        cmd = [sys.executable, "-m", "tests.gpu_compile", *modules, "--target", str(target), "--json", str(out),
               "--tables", str(out) + ".tables"]  # fmt: skip
        procs.append((out, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    rows, text, unreached = [], [], []
    for target, (out, proc) in zip(targets, procs):
        stdout, _ = proc.communicate(timeout=timeout)
        text.append(stdout)
        if not out.exists():
            raise AssertionError(f"the compile check did not finish:\n{stdout[-3000:]}")
        rows.extend(json.loads(out.read_text()))
        tables = json.loads(Path(str(out) + ".tables").read_text())
        for label, t in tables.items():  # each target's process runs every launch
            reached = {tuple(k) for k in t["reached"]}
            unreached += [f"sm_{target} {label}[{tuple(k)}]" for k in t["keys"] if tuple(k) not in reached]
    _run.unreached = unreached
    return rows, "\n".join(text)


def _failures(rows):
    from tests import gpu_compile

    bad, notes = gpu_compile.failures([gpu_compile.Row(**r) for r in rows])
    for line in notes:  # the allowed spills, with their reasons
        print("NOTE", line)
    return bad


def test_triton_kernels_compile_for_sm80_and_sm90(tmp_path):
    rows, text = _run(OPS, (80, 90), tmp_path)
    print(text)
    kernels = {(r["kernel"], r["target"]) for r in rows}
    for name in ("_adapter_fwd_kernel", "_adapter_bwd_kernel", "_site_fwd_kernel", "_site_ln_bwd_kernel", "_site_ln_rows_kernel",
                 "_rms_site_fwd_kernel", "_rms_bwd_kernel", "_mixed_fwd_kernel", "_mixed_bwd_kernel",
                 "_segment_sum_kernel"):  # fmt: skip
        assert {(name, 80), (name, 90)} <= kernels, name
    bad = _failures(rows)
    assert not bad, "\n".join(bad)
    # the launches reach every entry of every config table: a config added to a table is compiled
    assert not _run.unreached, "config table entries no launch reached:\n" + "\n".join(_run.unreached)


def test_a_config_table_entry_no_launch_reaches_is_reported(monkeypatch):
    """watch_config_tables sees each *_CONFIGS table of the kernel modules once (an alias in
    another module too), and unreached() names the entries no pruner read."""
    import types

    from tests import gpu_compile

    table = {("half", 64): [(64, 64, 4, 2)], ("ieee", 64): [(32, 32, 4, 2)]}
    for name in ("fastadapter.kernels._sample", "fastadapter.kernels._sample_alias"):
        module = types.ModuleType(name)
        module._FWD_CONFIGS = table
        monkeypatch.setitem(sys.modules, name, module)
    watched = gpu_compile.watch_config_tables(prefix="fastadapter.kernels._sample")
    assert list(watched) == ["_sample._FWD_CONFIGS"]
    assert [c for c in table[("half", 64)]] == [(64, 64, 4, 2)]  # a pruner's read
    assert gpu_compile.unreached(watched) == ["_sample._FWD_CONFIGS[('ieee', 64)]"]


def test_the_check_catches_errors_spills_and_missing_tensor_cores(tmp_path):
    rows, text = _run(["tests.gpu_compile_samples"], (90,), tmp_path)
    bad = _failures(rows)
    by_kernel = {r["kernel"]: r for r in rows}
    assert "NameError" in (by_kernel["_uses_plain_global"]["error"] or ""), text
    assert any(b.startswith("compile error: _uses_plain_global") for b in bad)
    assert by_kernel["_spills"]["stack"] > 0 and any(b.startswith("spill: _spills") for b in bad), text
    assert by_kernel["_product_off_tensor_cores"]["tensor_core"] is False
    assert any(b.startswith("no tensor-core instruction: _product_off_tensor_cores") for b in bad)
    upcast = by_kernel["_one_product_upcast"]  # HGMMA in its SASS, one of its two products off it
    assert upcast["tensor_core"] and (upcast["products"], upcast["products_mma"]) == (2, 1), text
    assert any(b.startswith("product off the tensor cores: _one_product_upcast") for b in bad)
    assert len(bad) == 4, bad
