"""Adapter forward and forward+backward: eager PyTorch, torch.compile of the same code,
and every fastadapter backend that can run here, timed side by side.

    pytest benchmarks/ --benchmark-json=out.json && python benchmarks/report.py out.json

CPU: fp32, N=4096, d=768, r=64, gelu. CUDA: bf16, N=32768, d=768, r=64, gelu (DESIGN.md).
FASTADAPTER_BENCH=sweep adds the N / d / r sweep (on CUDA, torch.compile at the base shape only).
Each test times all providers of one case in rotating rounds (fastadapter/cli/bench.py); their
medians go to the JSON's extra_info, which report.py turns into the table. GPU times come
from CUDA events. `fastadapter bench` runs the same timing without pytest.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastadapter.cli import bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SWEEP = os.environ.get("FASTADAPTER_BENCH", "") == "sweep"

if DEVICE == "cuda":
    DTYPE = torch.bfloat16
    BASE = (32768, 768, 64)
    SWEEP_CASES = [(n, 768, 64) for n in (1024, 8192, 131072, 262144)]
    SWEEP_CASES += [(32768, d, 64) for d in (384, 1024, 4096)]
    SWEEP_CASES += [(32768, 768, r) for r in (16, 128, 256)]
else:
    DTYPE = torch.float32
    BASE = (4096, 768, 64)
    SWEEP_CASES = [(n, 768, 64) for n in (512, 16384, 65536)] + [(4096, d, 64) for d in (384, 1024)]

CASES = [BASE] + (SWEEP_CASES if SWEEP else [])


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "N{}-d{}-r{}".format(*c))
def test_adapter(benchmark, case, mode):
    n, d, r = case
    # torch.compile costs tens of seconds per shape on a GPU: the sweep compares it at the base shape only
    names = bench.providers_for(DEVICE, DTYPE, r, compile=DEVICE == "cpu" or case == BASE)
    rounds = 15 if DEVICE == "cuda" else 9
    target_s = 0.02 if DEVICE == "cuda" else 0.1
    info = benchmark.pedantic(
        bench.time_case, args=(n, d, r, DTYPE, DEVICE, mode, rounds, target_s, names), rounds=1, iterations=1
    )
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("r", [64, 256])
@pytest.mark.parametrize("form", ["dW_down", "dW_up"])
def test_weight_grad_products(benchmark, form, r):
    """The backward's two weight-gradient products alone (N = 4096, d = 768, fp32, CPU): the
    cpp backend's kernel at each width this CPU runs (csrc/cpu_weight_grad.cpp, through its
    test hook) against the GEMM an eager backward calls (MKL's). dW_down = dz^T x [r, d],
    dW_up = dy^T a [d, r]; r = 256 is a merged Average of four adapters."""
    if DEVICE != "cpu":
        pytest.skip("a CPU kernel")
    from fastadapter.backends import extension

    module = extension.load()[0]
    if module is None or not module.avx2_kernels()[0]:
        pytest.skip("the cpp kernels do not run here")
    n, d = 4096, 768
    g = torch.Generator().manual_seed(0)
    thin, wide = torch.randn(n, r, generator=g), torch.randn(n, d, generator=g)
    transposed = form == "dW_up"

    def kernel(avx512):
        def run():
            previous = module.set_avx512_kernels_enabled(avx512)
            try:
                return module.weight_grad_cpu(thin, wide, 1.0, transposed)
            finally:
                module.set_avx512_kernels_enabled(previous)

        return run

    fns = {"mkl": (lambda: wide.t() @ thin) if transposed else (lambda: thin.t() @ wide)}
    if module.avx512_kernels()[0]:
        fns["avx512"] = kernel(True)
    fns["avx2"] = kernel(False)
    want = fns["mkl"]().double()
    for name, fn in fns.items():  # each provider computes the same product before anything is timed
        torch.testing.assert_close(fn().double(), want, rtol=1e-4, atol=1e-3, msg=name)
    results = benchmark.pedantic(bench.side_by_side, args=(fns, DEVICE, "mkl", False), rounds=1, iterations=1)
    benchmark.extra_info.update(weight_grad={"form": form, "N": n, "r": r, "d": d, "results": results})
