"""The registered operator: opcheck, gradcheck in float64, torch.compile without graph breaks."""

import pytest
import torch

import fastadapter as fa

from .helpers import BACKEND_DEVICES, make_inputs, rel_err, require


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("residual", ("x", "tensor", "none"))
def test_opcheck(backend, device, residual):
    require(backend, device)
    x, wd, bd, wu, bu = make_inputs(10, 24, 4, device=device, seed=1)
    tensors = [t.requires_grad_() for t in (x, wd, bd, wu, bu)]
    res = torch.randn(10, 24, device=device, requires_grad=True) if residual == "tensor" else None
    args = (*tensors, res, "gelu", 0.5, residual == "x", backend)
    torch.library.opcheck(torch.ops.fastadapter.adapter_forward.default, args)
    y, z = torch.ops.fastadapter.adapter_forward(*args)
    # the backward op runs inside autograd's backward: no graph through it (no double backward)
    x, wd, bd, wu, bu, y, z = (t.detach() for t in (x, wd, bd, wu, bu, y, z))
    bargs = (torch.randn_like(y), x, z, wd, bd, wu, bu, "gelu", 0.5, residual == "x", [True] * 5, backend)
    torch.library.opcheck(torch.ops.fastadapter.adapter_backward.default, bargs)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("activation", ("relu", "gelu", "gelu_tanh", "silu", "tanh", "identity"))
def test_gradcheck_float64(backend, activation):
    if backend not in fa.available_backends():
        pytest.skip(f"no {backend} backend registered")
    require(backend, "cpu", torch.float64)
    x, wd, bd, wu, bu = (t.double().requires_grad_() for t in make_inputs(6, 10, 3, seed=2))
    res = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)

    def f(x, wd, bd, wu, bu, res):
        return fa.fused_adapter(x, wd, bd, wu, bu, activation=activation, scaling=0.7, residual=res, backend=backend)

    def g(x, wd, bd, wu, bu):
        return fa.fused_adapter(x, wd, bd, wu, bu, activation=activation, scaling=0.7, backend=backend)

    if activation == "relu":  # keep pre-activations away from the kink
        with torch.no_grad():
            bd += 0.05 * torch.sign(x @ wd.t() + bd).mean(0)
    assert torch.autograd.gradcheck(f, (x, wd, bd, wu, bu, res))
    assert torch.autograd.gradcheck(g, (x, wd, bd, wu, bu))


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_compile_fullgraph_module(backend):
    require("reference" if backend == "auto" else backend, "cpu")
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = fa.FusedAdapter(32, 8, activation="gelu", backend=None if backend == "auto" else backend)
    torch.nn.init.normal_(m.up.weight, std=0.1)
    cm = torch.compile(m, fullgraph=True)
    x = torch.randn(2, 7, 32, requires_grad=True)
    y_c = cm(x)
    y_e = m(x)
    assert rel_err(y_c, y_e) <= 1e-6
    g_c = torch.autograd.grad(y_c.square().sum(), [x, m.down.weight, m.up.bias])
    g_e = torch.autograd.grad(y_e.square().sum(), [x, m.down.weight, m.up.bias])
    for a, b in zip(g_c, g_e):
        assert rel_err(a, b) <= 1e-6
    explanation = torch._dynamo.explain(m)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
