"""FusedAdapter, dispatch and autocast."""

import logging

import pytest
import torch

import fastadapter as fa
from fastadapter import backends

from .helpers import float64_math, rel_err


def test_state_dict_reads_like_a_plain_adapter():
    m = fa.FusedAdapter(32, 4)
    assert list(m.state_dict()) == ["down.weight", "down.bias", "up.weight", "up.bias"]
    assert m.down.weight.shape == (4, 32) and m.up.weight.shape == (32, 4)
    assert "hidden_size=32, bottleneck_size=4, activation='relu', scaling=1.0, bias=True" in repr(m)
    assert list(fa.FusedAdapter(32, 4, bias=False).state_dict()) == ["down.weight", "up.weight"]


def test_forward_is_the_design_formula():
    torch.manual_seed(0)
    m = fa.FusedAdapter(24, 6, activation="swish", scaling=0.5, init="bert")
    torch.nn.init.normal_(m.down.bias)
    torch.nn.init.normal_(m.up.bias)
    x = torch.randn(3, 4, 24)
    p = [t.double() for t in (x, m.down.weight, m.down.bias, m.up.weight, m.up.bias)]
    assert rel_err(m(x), float64_math(*p, "silu", 0.5, True)) <= 1e-6
    assert rel_err(m(x, residual=False), float64_math(*p, "silu", 0.5, False)) <= 1e-6
    t = torch.randn_like(x)
    assert rel_err(m(x, residual=t), float64_math(*p, "silu", 0.5, t.double())) <= 1e-6


def test_init_schemes():
    torch.manual_seed(0)
    bert = fa.FusedAdapter(768, 64, init="bert")
    assert abs(bert.down.weight.std().item() - 0.02) < 1e-3 and abs(bert.up.weight.std().item() - 0.02) < 1e-3
    houlsby = fa.FusedAdapter(768, 64, init="houlsby")
    assert houlsby.down.weight.abs().max() <= 2e-2 and 0.004 < houlsby.down.weight.std() < 0.01
    mam = fa.FusedAdapter(768, 64, init="mam")
    assert torch.count_nonzero(mam.up.weight) == 0 and mam.down.weight.std() > 0.01
    x = torch.randn(5, 768)
    assert torch.equal(mam(x), x)  # starts as the identity map
    for m in (bert, houlsby, mam):
        assert torch.count_nonzero(m.down.bias) == 0 and torch.count_nonzero(m.up.bias) == 0


def test_from_linear_shares_weights():
    down, up = torch.nn.Linear(16, 4), torch.nn.Linear(4, 16)
    m = fa.FusedAdapter.from_linear(down, up, activation="gelu_new", scaling=2.0)
    assert m.down is down and m.up is up and m.activation == "gelu_tanh"
    x = torch.randn(2, 16, requires_grad=True)
    want = x + 2.0 * up(torch.nn.functional.gelu(down(x), approximate="tanh"))
    assert rel_err(m(x), want) <= 1e-6
    m(x).sum().backward()
    assert down.weight.grad is not None and up.bias.grad is not None


def test_dtype_and_device_arguments():
    m = fa.FusedAdapter(16, 4, dtype=torch.float64, device="cpu")
    assert m.down.weight.dtype == torch.float64
    y = m(torch.randn(3, 16, dtype=torch.float64))
    assert y.dtype == torch.float64


def test_available_backends_reports_every_backend():
    av = fa.available_backends()
    assert av["reference"] is None
    assert "triton" in av
    for name, reason in av.items():
        assert reason is None or (isinstance(reason, str) and reason), name


def test_env_override_and_auto(monkeypatch):
    x, w = torch.randn(3, 8), torch.randn(2, 8)
    monkeypatch.setenv("FASTADAPTER_BACKEND", "reference")
    assert backends.resolve(None, x.device, x.dtype, 2) == "reference"
    assert backends.resolve("auto", x.device, x.dtype, 2) == "reference"
    monkeypatch.setenv("FASTADAPTER_BACKEND", "auto")
    assert backends.resolve(None, x.device, x.dtype, 2) in backends.AUTO_ORDER["cpu"]
    monkeypatch.delenv("FASTADAPTER_BACKEND")
    # an explicit name wins over the environment
    monkeypatch.setenv("FASTADAPTER_BACKEND", "nonsense")
    assert backends.resolve("reference", x.device, x.dtype, 2) == "reference"
    del w


def test_auto_fallback_logs_once(monkeypatch, caplog):
    def never(device, dtype, r):
        return "switched off for this test"

    fake = backends.Backend("fake_fast", None, None, check=never, status=lambda: "switched off for this test")
    monkeypatch.setitem(backends._REGISTRY, "fake_fast", fake)
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ("fake_fast", "reference"))
    monkeypatch.setattr(backends, "_RESOLVED", {})
    monkeypatch.setattr(backends, "_LOGGED", set())
    monkeypatch.delenv("FASTADAPTER_BACKEND", raising=False)
    with caplog.at_level(logging.WARNING, logger="fastadapter"):
        for _ in range(3):
            fa.fused_adapter(torch.randn(2, 8), torch.randn(2, 8), None, torch.randn(8, 2), None)
    msgs = [r.getMessage() for r in caplog.records if "fake_fast" in r.getMessage()]
    assert len(msgs) == 1 and "switched off for this test" in msgs[0] and "'reference'" in msgs[0]


@pytest.mark.parametrize("dtype", (torch.bfloat16,))
def test_autocast_casts_x_keeps_fp32_weights(dtype):
    m = fa.FusedAdapter(16, 4, activation="gelu")
    x = torch.randn(3, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        y = m(x)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert m.down.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    want = m(x.detach().to(dtype))
    assert torch.equal(y, want)
