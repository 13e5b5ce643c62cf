"""Adapter forward and forward+backward: eager PyTorch, torch.compile of the same code,
and every fastadapter backend that can run here, timed side by side.

    pytest benchmarks/ --benchmark-json=out.json && python benchmarks/report.py out.json

CPU: fp32, N=4096, d=768, r=64, gelu. CUDA: bf16, N=32768, d=768, r=64, gelu (DESIGN.md).
FASTADAPTER_BENCH=sweep adds the N / d / r sweep (on CUDA, torch.compile at the base shape only).
Each test times all providers of one case in rotating rounds (benchmarks/timing.py); their medians go to the JSON's extra_info,
which report.py turns into the table. GPU times come from CUDA events.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import fastadapter as fa
from fastadapter import backends

from .timing import interleaved

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
ACTIVATION = "gelu"
SCALING = 1.0


def eager_adapter(x, w_down, b_down, w_up, b_up):
    """What a user writes by hand: two Linear layers, the activation, the residual add."""
    return x + SCALING * F.linear(F.gelu(F.linear(x, w_down, b_down)), w_up, b_up)


def _providers(case) -> list[str]:
    r = case[2]
    # torch.compile costs tens of seconds per shape on a GPU: the sweep compares it at the base shape only
    names = ["eager", "compile"] if (DEVICE == "cpu" or case == BASE) else ["eager"]
    for name in backends.names():
        if name == "triton" and DEVICE == "cpu":
            continue  # only the interpreter runs it there
        if backends.get(name).check(torch.device(DEVICE), DTYPE, r) is None:
            names.append(name)
    return names


def _inputs(n, d, r, grad):
    g = torch.Generator().manual_seed(0)

    def mk(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, DTYPE).requires_grad_(grad)

    return mk(n, d), mk(r, d, scale=d**-0.5), mk(r, scale=0.1), mk(d, r, scale=r**-0.5), mk(d, scale=0.1)


def _callable(provider, inputs, mode):
    if provider == "eager":
        fwd = eager_adapter
    elif provider == "compile":
        fwd = torch.compile(eager_adapter, dynamic=False)
    elif provider == "gemms":  # the GEMMs alone into preallocated outputs: the floor fusion cannot go below
        x, wd, _, wu, _ = (t.detach() for t in inputs)
        z, y = torch.empty(x.shape[0], wd.shape[0], **_kw(x)), torch.empty_like(x)
        dy = torch.randn_like(x)

        def gemms():
            torch.mm(x, wd.t(), out=z)
            torch.mm(z, wu.t(), out=y)
            if mode != "fwd":
                torch.mm(dy.t(), z), torch.mm(dy, wu, out=z), torch.mm(z.t(), x), torch.mm(z, wd, out=y)

        return gemms
    elif provider == "copy":
        x = inputs[0].detach()
        out = torch.empty_like(x)
        return lambda: out.copy_(x)
    else:

        def fwd(*t):
            return fa.fused_adapter(*t, activation=ACTIVATION, scaling=SCALING, backend=provider)

    if mode == "fwd":
        return lambda: fwd(*inputs)
    dy = torch.randn_like(inputs[0])

    def step():
        y = fwd(*inputs)
        return torch.autograd.grad(y, inputs, dy)

    return step


def _kw(t):
    return {"dtype": t.dtype, "device": t.device}


def _bytes(n, d, r, mode):
    e = torch.finfo(DTYPE).bits // 8
    fwd = 2 * n * d * e + n * r * 4  # read x, write y, write fp32 z
    if mode == "fwd":
        return fwd
    return fwd + 3 * n * d * e + n * r * 4  # read dy and x, write dx, read z


def _iters(fn, target_s):
    import time

    fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    dt = max(time.perf_counter() - t, 1e-6)
    return max(1, min(200, int(target_s / dt)))


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "N{}-d{}-r{}".format(*c))
def test_adapter(benchmark, case, mode):
    n, d, r = case
    inputs = _inputs(n, d, r, grad=(mode == "fwdbwd"))
    providers = _providers(case) + ["gemms"] + (["copy"] if DEVICE == "cuda" and mode == "fwd" else [])
    fns = {p: _callable(p, inputs, mode) for p in providers}
    ctx = torch.no_grad() if mode == "fwd" else torch.enable_grad()
    with ctx:
        for fn in fns.values():  # compile and autotune outside the timed rounds
            fn()
        iters = _iters(fns["eager"], 0.02 if DEVICE == "cuda" else 0.1)
        rounds = 15 if DEVICE == "cuda" else 9
        results = benchmark.pedantic(interleaved, args=(fns, DEVICE, rounds, iters), rounds=1, iterations=1)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        dtype=str(DTYPE).replace("torch.", ""),
        N=n, d=d, r=r, activation=ACTIVATION, mode=mode,
        bytes=_bytes(n, d, r, mode), copy_bytes=2 * n * d * torch.finfo(DTYPE).bits // 8,
        results=results,
    )  # fmt: skip
