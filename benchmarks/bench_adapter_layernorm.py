"""The adapter site (adapter + residual + LayerNorm), forward and forward+backward, side by side:

    eager         the composition a user writes: two Linear layers, the activation, the
                  residual adds and F.layer_norm
    compile       torch.compile of the same
    op+add+ln     fastadapter's adapter op (automatic backend), then the add and F.layer_norm
    <backend>     fastadapter.adapter_layernorm on each backend that runs here
    gemms         the site's GEMMs alone (2 forward, 4 more backward) into preallocated
                  outputs: the floor no fusion of the element-wise work goes below

    pytest benchmarks/bench_adapter_layernorm.py --benchmark-json=out.json && python benchmarks/report.py out.json

FASTADAPTER_BENCH_ROUNDS sets the rounds (9 on a CPU, 15 on a GPU), and
FASTADAPTER_BENCH_PROVIDERS (comma-separated, eager always kept) the providers, for more
rounds of a few of them: e.g. ``FASTADAPTER_BENCH_PROVIDERS=op+add+ln,cpp,gemms
FASTADAPTER_BENCH_ROUNDS=15 pytest benchmarks/bench_adapter_layernorm.py -k "N4096-d768 and fwdbwd"``.

Houlsby placement (LN(h + r + s*f(h))), gelu, the LayerNorm frozen as in a base model, h and
r and the adapter trainable. CPU: fp32, N = 4096 and 16384, d = 384 and 768, r = 64.

``test_adapter_layernorm_split`` (N = 4096, d = 768) times the forward and the backward
apart, for the adapter op alone, op+add+ln and the site op on each backend, and one copy
and one read of an N x d tensor: what the site costs beyond the adapter op (its extra),
what the add and the LayerNorm cost beyond it in op+add+ln, and the bandwidth floor of the
site's extra (a site moves at least one read more than the adapter op in the forward, r,
and one read and one write more in the backward, v or out and dv: a copy and a read).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import fastadapter as fa
from fastadapter import backends
from fastadapter.cli import bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
CASES = [(n, d, 64) for n in (4096, 16384) for d in (384, 768)]
EPS = 1e-12


def eager_site(h, r, wd, bd, wu, bu, lw, lb):
    return F.layer_norm(h + F.linear(F.gelu(F.linear(h, wd, bd)), wu, bu) + r, (h.shape[-1],), lw, lb, EPS)


def op_add_ln(h, r, wd, bd, wu, bu, lw, lb):
    return F.layer_norm(fa.fused_adapter(h, wd, bd, wu, bu, activation="gelu") + r, (h.shape[-1],), lw, lb, EPS)


def _inputs(n, d, rk):
    g = torch.Generator().manual_seed(0)

    def mk(*shape, scale=1.0, grad=True, shift=0.0):
        return (shift + torch.randn(*shape, generator=g) * scale).to(DEVICE, DTYPE).requires_grad_(grad)

    return (mk(n, d), mk(n, d), mk(rk, d, scale=d**-0.5), mk(rk, scale=0.1), mk(d, rk, scale=rk**-0.5), mk(d, scale=0.1),
            mk(d, scale=0.1, shift=1.0, grad=False), mk(d, scale=0.1, grad=False))  # fmt: skip


def _providers(rk):
    names = ["eager", "compile", "op+add+ln", "gemms"]
    for name in backends.names():
        if name == "triton" and DEVICE == "cpu":
            continue
        if backends.available_backends("adapter_layernorm").get(name) is None:
            if backends.get(name).check(torch.device(DEVICE), DTYPE, rk) is None:
                names.append(name)
    chosen = os.environ.get("FASTADAPTER_BENCH_PROVIDERS")
    if chosen:
        wanted = {"eager", *(p.strip() for p in chosen.split(","))}
        unknown = wanted - set(names)
        if unknown:
            raise ValueError(f"FASTADAPTER_BENCH_PROVIDERS: {sorted(unknown)} not among {names}")
        names = [n for n in names if n in wanted]
    return names


def _callable(provider, tensors, mode):
    if provider == "eager":
        fwd = eager_site
    elif provider == "compile":
        fwd = torch.compile(eager_site, dynamic=False)
    elif provider == "op+add+ln":
        fwd = op_add_ln
    elif provider == "gemms":
        return bench.callable_for("gemms", tensors[:1] + tensors[2:6], mode)
    else:

        def fwd(*t):
            return fa.adapter_layernorm(*t, placement="houlsby", eps=EPS, activation="gelu", backend=provider)

    if mode == "fwd":
        return lambda: fwd(*tensors)
    trainable = [t for t in tensors if t.requires_grad]
    dy = torch.randn_like(tensors[0])
    return lambda: torch.autograd.grad(fwd(*tensors), trainable, dy)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "N{}-d{}-r{}".format(*c))
def test_adapter_layernorm(benchmark, case, mode):
    n, d, rk = case
    tensors = _inputs(n, d, rk)
    fns = {p: _callable(p, tensors, mode) for p in _providers(rk)}

    results = benchmark.pedantic(bench.side_by_side, args=(fns, DEVICE, "eager", mode != "fwd"), rounds=1, iterations=1)
    e = torch.finfo(DTYPE).bits // 8
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", dtype=str(DTYPE).replace("torch.", ""),
        N=n, d=d, r=rk, activation="gelu (houlsby site)", mode=mode,
        bytes=(3 * n * d * e + n * rk * 4) * (1 if mode == "fwd" else 2), copy_bytes=2 * n * d * e, results=results,
    )  # fmt: skip


SPLIT_CASE = (4096, 768, 64)


def _split_callables(tensors, sites):
    """Forward and backward of each provider as separate calls; each backward runs over a
    graph built once (retain_graph), so it times the backward alone."""
    h, r, wd, bd, wu, bu = tensors[:6]
    trainable = [t for t in tensors if t.requires_grad]
    dy = torch.randn_like(h)
    fns = {}

    def add(name, fwd, wrt):
        with torch.enable_grad():
            y = fwd()
        fns[f"{name} fwd"] = fwd
        fns[f"{name} bwd"] = lambda: torch.autograd.grad(y, wrt, dy, retain_graph=True)

    add("op", lambda: fa.fused_adapter(h, wd, bd, wu, bu, activation="gelu"), [h, wd, bd, wu, bu])
    for name in ("op+add+ln", *sites):
        add(name, _callable(name, tensors, "fwd"), trainable)
    src, dst = r.detach(), torch.empty_like(r)
    fns["copy"] = lambda: dst.copy_(src)
    fns["read"] = lambda: src.sum()
    return fns


def split(results: dict, sites) -> dict:
    """ms per part from the medians: each provider's forward, backward and total; the
    extra of op+add+ln and of each site over the adapter op; the floor of a site's extra
    (one copy and one read)."""
    ms = {k: v["median_s"] * 1e3 for k, v in results.items()}
    total = {p: ms[f"{p} fwd"] + ms[f"{p} bwd"] for p in ("op", "op+add+ln", *sites)}
    out = {"fwd": {p: ms[f"{p} fwd"] for p in total}, "bwd": {p: ms[f"{p} bwd"] for p in total}, "total": total}
    out["extra_over_op"] = {p: total[p] - total["op"] for p in total if p != "op"}
    out["floor_extra"] = ms["copy"] + ms["read"]
    out["vs_op_add_ln"] = {p: total["op+add+ln"] / total[p] for p in sites}
    out["vs_op_add_ln_at_floor"] = total["op+add+ln"] / (total["op"] + out["floor_extra"])
    return out


@pytest.mark.parametrize("case", [SPLIT_CASE], ids=lambda c: "N{}-d{}-r{}".format(*c))
def test_adapter_layernorm_split(benchmark, case):
    n, d, rk = case
    tensors = _inputs(n, d, rk)
    sites = [p for p in _providers(rk) if p not in ("eager", "compile", "op+add+ln", "gemms")]
    fns = _split_callables(tensors, sites)

    results = benchmark.pedantic(bench.side_by_side, args=(fns, DEVICE, "op bwd", True), rounds=1, iterations=1)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", dtype=str(DTYPE).replace("torch.", ""),
        N=n, d=d, r=rk, activation="gelu (houlsby site)", mode="split", results=results, split=split(results, sites),
    )  # fmt: skip
