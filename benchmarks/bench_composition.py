"""Composition blocks at one site, forward and forward+backward, side by side:

    adapterhub    AdapterHub's op sequence for the block, written out in eager PyTorch on the
                  same weights: per adapter Linear, act, Linear, times s, + residual
                  (adapters' Adapter.forward); Average: stack, times w, mean; Fuse: BertFusion's
                  query / key / value Linears over the stacked branch outputs, scores, softmax
    single        one adapter (fastadapter.fused_adapter, automatic backend) over the same rows:
                  the floor a composition is measured against
    fastadapter   the block as a model with adapters runs it (fastadapter.hf.compose.apply):
                  Average one op of the merged bottleneck, Fuse without branch outputs, Stack one
                  op per adapter

    pytest benchmarks/bench_composition.py --benchmark-json=out.json && python benchmarks/report.py out.json

Average of 4 and Fuse of 3 adapters, N = 4096 rows, d = 768, r = 64, relu, the houlsby site
(each adapter reads F; F is the residual); CPU fp32 (bf16 on a GPU). F trains; under Average
the adapters train, under Fuse the fusion layer does and the adapters are frozen, as
AdapterFusion trains.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastadapter as fa
from fastadapter.cli import bench
from fastadapter.hf import compose

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
N, D, R = 4096, 768, 64


def _site(names, fuse: bool):
    """A stand-in site owner: adapters named ``names`` (and a fusion layer over them)."""
    torch.manual_seed(0)
    owner = nn.Module()
    owner.adapters = nn.ModuleDict({n: fa.FusedAdapter(D, R, activation="relu", device=DEVICE, dtype=DTYPE) for n in names})
    with torch.no_grad():
        for p in owner.adapters.parameters():
            p.normal_(std=0.05)
    owner.__dict__["_fastadapter_placement"] = {n: "houlsby" for n in names}
    if fuse:
        owner.adapter_fusion_layer = nn.ModuleDict({",".join(names): fa.AdapterFusion(D, device=DEVICE, dtype=DTYPE)})
        owner.adapters.requires_grad_(False)
    return owner


def _hub_branch(a, h):
    """adapters' Adapter.forward: (output, up) with output = up + residual."""
    up = a.up(torch.relu(a.down(h))) * a.scaling
    return up + h, up


def _hub_average(owner, block, h):
    outs = [_hub_branch(owner.adapters[n], h)[0] for n in block]
    w = torch.tensor(block.weights, device=h.device, dtype=h.dtype)[:, None, None]
    return torch.mean(torch.stack(outs, 0) * w, dim=0)


def _hub_fuse(owner, block, h):
    fusion = owner.adapter_fusion_layer[block.name]
    ups = torch.stack([_hub_branch(owner.adapters[n], h)[1] for n in block]).permute(1, 0, 2)  # [N, n, d]
    query, key, value = fusion.query(h), fusion.key(ups), fusion.value(ups)
    scores = torch.squeeze(torch.matmul(query.unsqueeze(1), key.transpose(-2, -1)), dim=1)
    probs = torch.softmax(scores, dim=-1)
    return torch.squeeze(torch.matmul(probs.unsqueeze(1), value), dim=1) + h


BLOCKS = {
    "average4": lambda: fa.Average("a", "b", "c", "d"),
    "fuse3": lambda: fa.Fuse("a", "b", "c"),
    "stack2": lambda: fa.Stack("a", "b"),
}


def _callables(key, mode):
    block = BLOCKS[key]()
    owner = _site(block.names(), isinstance(block, fa.Fuse))
    g = torch.Generator().manual_seed(1)
    h = torch.randn(N, D, generator=g).to(DEVICE, DTYPE).requires_grad_()
    first = owner.adapters[block.names()[0]]
    single = fa.FusedAdapter(D, R, activation="relu", device=DEVICE, dtype=DTYPE)
    single.load_state_dict(first.state_dict())

    def hub_stack():
        y = h
        for n in block:
            y = _hub_branch(owner.adapters[n], y)[0]
        return y

    hub = {"average4": lambda: _hub_average(owner, block, h), "fuse3": lambda: _hub_fuse(owner, block, h), "stack2": hub_stack}
    fns = {"adapterhub": hub[key], "single": lambda: single(h), "fastadapter": lambda: compose.apply(owner, block, h, None)}
    with torch.no_grad():  # the block as written out and as run agree before anything is timed
        if key != "average4":  # AdapterHub's Average also scales F by sum(w) / n = 1/4
            tol = 1e-3 if DTYPE == torch.float32 else 3e-2
            torch.testing.assert_close(fns["fastadapter"](), fns["adapterhub"](), rtol=tol, atol=tol)
    if mode == "fwd":
        return fns
    dy = torch.randn(N, D, generator=g).to(DEVICE, DTYPE)
    trained = [h] + [p for p in owner.parameters() if p.requires_grad]
    out = {}
    for name, fn in fns.items():
        params = [h, *single.parameters()] if name == "single" else trained
        out[name] = lambda fn=fn, params=params: torch.autograd.grad(fn(), params, dy, allow_unused=True)  # W_k's bias: unused
    return out


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("key", list(BLOCKS))
def test_composition(benchmark, key, mode):
    fns = _callables(key, mode)

    results = benchmark.pedantic(bench.side_by_side, args=(fns, DEVICE, "single", mode != "fwd"), rounds=1, iterations=1)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", dtype=str(DTYPE).replace("torch.", ""),
        N=N, d=D, r=R, activation=f"relu, {BLOCKS[key]()!r}", mode=mode, results=results,
    )  # fmt: skip
    base = results["single"]["median_s"]
    for name, r in results.items():
        print(f"{key} {mode} {name}: {r['median_s'] * 1e3:.2f} ms ({r['median_s'] / base:.2f}x single)")


def ops_and_bytes(fn, trained, dy) -> dict:
    """ATen (and fastadapter) ops that touch an N-row tensor, and the bytes all ops move, in
    the forward and the backward (fastadapter.cli.traffic's eager model: every op reads its
    inputs and writes its outputs once; a fastadapter op counts as one)."""
    from fastadapter.cli.traffic import EagerCounter, _tensors

    class Rows(EagerCounter):
        def __init__(self):
            super().__init__()
            self.rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            before = len(self.ops)
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if len(self.ops) > before and any(t.dim() and t.shape[0] == N for t in _tensors((args, kwargs, out))):
                self.rows += 1
            return out

    fwd, bwd = Rows(), Rows()
    with fwd:
        y = fn()
    with bwd:
        torch.autograd.grad(y, trained, dy, allow_unused=True)
    pass_bytes = N * D * torch.finfo(DTYPE).bits // 8
    return {"fwd_ops": fwd.rows, "bwd_ops": bwd.rows, "fwd_passes": fwd.bytes / pass_bytes, "bwd_passes": bwd.bytes / pass_bytes}


@pytest.mark.parametrize("key", list(BLOCKS))
def test_composition_ops_and_bytes(benchmark, key):
    """Not timed: how many ops over the N rows each provider runs, and the bytes they move in
    passes over an N x d tensor (forward; backward)."""
    block = BLOCKS[key]()
    owner = _site(block.names(), isinstance(block, fa.Fuse))
    h = torch.randn(N, D).to(DEVICE, DTYPE).requires_grad_()
    trained = [h] + [p for p in owner.parameters() if p.requires_grad]
    dy = torch.randn(N, D).to(DEVICE, DTYPE)

    def hub():
        if key == "average4":
            return _hub_average(owner, block, h)
        if key == "fuse3":
            return _hub_fuse(owner, block, h)
        y = h
        for n in block:
            y = _hub_branch(owner.adapters[n], y)[0]
        return y

    counts = benchmark.pedantic(
        lambda: {"adapterhub": ops_and_bytes(hub, trained, dy), "fastadapter": ops_and_bytes(
            lambda: compose.apply(owner, block, h, None), trained, dy)}, rounds=1, iterations=1)  # fmt: skip
    benchmark.extra_info.update(block=repr(block), N=N, d=D, r=R, counts=counts)
    for name, c in counts.items():
        print(f"{key} {name}: {c['fwd_ops']} + {c['bwd_ops']} ops over the N rows, "
              f"{c['fwd_passes']:.1f} + {c['bwd_passes']:.1f} passes of N x d")  # fmt: skip
