"""The decoder site (adapter + residual + the RMSNorm after it), forward and forward+backward, side by side:

    eager         the composition a user writes: two Linear layers, the activation, the
                  residual adds and Llama's RMSNorm module (the stream y and its norm both
                  reach the loss)
    compile       torch.compile of the same
    op+add+rms    fastadapter's adapter op (automatic backend) with x + F as its residual,
                  then F.rms_norm
    <backend>     fastadapter.adapter_rmsnorm on each backend that runs it fused here
    gemms         the site's GEMMs alone (2 forward, 4 more backward) into preallocated
                  outputs: the floor no fusion of the element-wise work goes below

    pytest benchmarks/bench_adapter_rmsnorm.py --benchmark-json=out.json && python benchmarks/report.py out.json

FASTADAPTER_BENCH_ROUNDS sets the rounds (9 on a CPU, 15 on a GPU). Houlsby placement
(y = x + F + s*f(F)), gelu, the norm weight frozen as in a base model, F, x and the adapter
trainable. CPU: fp32, N = 4096 and 16384, d = 576 (SmolLM2's width), r = 64; GPU: bf16,
and d = 4096 too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import fastadapter as fa
from fastadapter import backends
from fastadapter.cli import bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
CASES = [(n, d, 64) for n in (4096, 16384) for d in ((576, 4096) if DEVICE == "cuda" else (576,))]
EPS = 1e-5


def eager_site(norm):
    def site(f, x, wd, bd, wu, bu):
        y = x + f + F.linear(F.gelu(F.linear(f, wd, bd)), wu, bu)
        return y, norm(y)

    return site


def op_add_rms(f, x, wd, bd, wu, bu, w):
    y = fa.fused_adapter(f, wd, bd, wu, bu, activation="gelu", residual=x + f)
    return y, F.rms_norm(y, (y.shape[-1],), w, EPS)


def _inputs(n, d, rk):
    g = torch.Generator().manual_seed(0)

    def mk(*shape, scale=1.0, grad=True, shift=0.0):
        return (shift + torch.randn(*shape, generator=g) * scale).to(DEVICE, DTYPE).requires_grad_(grad)

    return (mk(n, d), mk(n, d), mk(rk, d, scale=d**-0.5), mk(rk, scale=0.1), mk(d, rk, scale=rk**-0.5), mk(d, scale=0.1),
            mk(d, scale=0.1, shift=1.0, grad=False))  # fmt: skip


def _providers(rk):
    names = ["eager", "compile", "op+add+rms", "gemms"]
    for name in backends.names():
        if name == "triton" and DEVICE == "cpu":
            continue
        if backends.available_backends("adapter_rmsnorm").get(name) is None:
            if backends.get(name).check(torch.device(DEVICE), DTYPE, rk) is None:
                names.append(name)
    return names


def _callable(provider, tensors, mode):
    if provider in ("eager", "compile"):
        norm = LlamaRMSNorm(tensors[0].shape[-1], eps=EPS).to(DEVICE, DTYPE).requires_grad_(False)
        with torch.no_grad():
            norm.weight.copy_(tensors[6])
        site = eager_site(norm)
        site = torch.compile(site, dynamic=False) if provider == "compile" else site

        def fwd(*t):
            return site(*t[:6])
    elif provider == "op+add+rms":
        fwd = op_add_rms
    elif provider == "gemms":
        return bench.callable_for("gemms", tensors[:1] + tensors[2:6], mode)
    else:

        def fwd(*t):
            return fa.adapter_rmsnorm(*t, placement="houlsby", eps=EPS, activation="gelu", backend=provider)

    if mode == "fwd":
        return lambda: fwd(*tensors)
    trainable = [t for t in tensors if t.requires_grad]
    dy, dn = torch.randn_like(tensors[0]), torch.randn_like(tensors[0])
    return lambda: torch.autograd.grad(fwd(*tensors), trainable, (dy, dn))


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "N{}-d{}-r{}".format(*c))
def test_adapter_rmsnorm(benchmark, case, mode):
    n, d, rk = case
    tensors = _inputs(n, d, rk)
    fns = {p: _callable(p, tensors, mode) for p in _providers(rk)}

    results = benchmark.pedantic(bench.side_by_side, args=(fns, DEVICE, "eager", mode != "fwd"), rounds=1, iterations=1)
    e = torch.finfo(DTYPE).bits // 8
    # forward: F and x read, y and y_normed written; backward: dy, dn, y and the adapter's
    # input read, dF and dx written; z [N, r] fp32 written and read
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", dtype=str(DTYPE).replace("torch.", ""),
        N=n, d=d, r=rk, activation="gelu (houlsby decoder site)", mode=mode,
        bytes=(4 * n * d * e + n * rk * 4) if mode == "fwd" else (10 * n * d * e + 2 * n * rk * 4),
        copy_bytes=2 * n * d * e, results=results,
    )  # fmt: skip
