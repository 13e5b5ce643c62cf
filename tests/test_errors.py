"""Bad input is refused with an error that names the argument and the shapes or dtypes."""

import pytest
import torch

import fastadapter as fa

from .helpers import make_inputs


def _call(**over):
    x, wd, bd, wu, bu = make_inputs(4, 16, 3, seed=1)
    kw = dict(x=x, w_down=wd, b_down=bd, w_up=wu, b_up=bu)
    kw.update(over)
    return fa.fused_adapter(**kw)


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(x=torch.randn(4, 15)), ValueError, r"w_down must have shape \[r, d\] with d = x.shape\[-1\] = 15"),
        (dict(w_down=torch.randn(3, 16, 1)), ValueError, r"w_down must be 2-D"),
        (dict(w_up=torch.randn(16, 4)), ValueError, r"w_up must have shape \[d, r\] = \[16, 3\], got \[16, 4\]"),
        (dict(w_up=torch.randn(3, 16)), ValueError, r"w_up must have shape"),
        (dict(b_down=torch.randn(4)), ValueError, r"b_down must have shape \[3\], got \[4\]"),
        (dict(b_up=torch.randn(16, 1)), ValueError, r"b_up must have shape \[16\]"),
        (dict(x=torch.randint(0, 3, (4, 16))), TypeError, r"x must be a float32.*got torch.int64"),
        (dict(x=torch.randn(4, 16, dtype=torch.complex64)), TypeError, r"x must be .*complex64"),
        (dict(x=torch.tensor(1.0)), ValueError, r"at least one dimension"),
        (
            dict(x=torch.randn(4, 16, dtype=torch.bfloat16), w_down=torch.randn(3, 16, dtype=torch.float16)),
            TypeError,
            r"w_down must have x's dtype \(torch.bfloat16\) or float32, got torch.float16",
        ),
        (dict(w_up=torch.randn(16, 3, dtype=torch.float64)), TypeError, r"w_up must have x's dtype \(torch.float32\)"),
        (dict(x=torch.randn(4, 16, device="meta")), ValueError, r"w_down is on cpu but x is on meta"),
        (dict(b_up="zeros"), TypeError, r"b_up must be a torch.Tensor or None, got str"),
        (dict(x=[1.0]), TypeError, r"x must be a torch.Tensor, got list"),
        (dict(activation="gelu_fast"), ValueError, r"unknown activation 'gelu_fast'; expected one of: relu, gelu"),
        (dict(backend="mkl"), ValueError, r"unknown backend 'mkl'; known backends: .*reference"),
        (dict(scaling=float("nan")), ValueError, r"scaling must be finite, got nan"),
        (dict(scaling=float("inf")), ValueError, r"scaling must be finite"),
        (dict(scaling=torch.tensor(2.0)), TypeError, r"scaling must be a Python float, got Tensor"),
        (dict(residual=torch.randn(4, 15)), ValueError, r"residual must have x's shape \[4, 16\], got \[4, 15\]"),
        (dict(residual=torch.ones(4, 16, dtype=torch.int32)), TypeError, r"residual must be a floating-point"),
        (dict(residual="x"), TypeError, r"residual must be True, False or a tensor, got str"),
        (dict(w_down=torch.randn(0, 16), w_up=torch.randn(16, 0), b_down=None), ValueError, r"must be positive"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_input(over, exc, match):
    with pytest.raises(exc, match=match):
        _call(**over)


def test_explicit_backend_that_cannot_run_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("triton can run here")
    with pytest.raises(RuntimeError, match=r"backend 'triton' \(from backend\) cannot run on cpu"):
        _call(backend="triton")


def test_env_backend_that_cannot_run_names_the_variable(monkeypatch):
    monkeypatch.setenv("FASTADAPTER_BACKEND", "nonsense")
    with pytest.raises(ValueError, match=r"unknown backend 'nonsense' \(from FASTADAPTER_BACKEND\)"):
        _call()


def test_triton_refuses_float64_with_reason(monkeypatch):
    x, wd, bd, wu, bu = (t.double() for t in make_inputs(4, 16, 3))
    with pytest.raises(RuntimeError, match=r"float32, float16 or bfloat16 x, not torch.float64"):
        fa.fused_adapter(x, wd, bd, wu, bu, backend="triton")


def test_module_arguments_checked():
    with pytest.raises(ValueError, match="hidden_size must be a positive integer"):
        fa.FusedAdapter(0, 4)
    with pytest.raises(ValueError, match="bottleneck_size must be a positive integer"):
        fa.FusedAdapter(8, 2.5)
    with pytest.raises(ValueError, match="unknown init 'xavier'"):
        fa.FusedAdapter(8, 2, init="xavier")
    with pytest.raises(ValueError, match="unknown activation"):
        fa.FusedAdapter(8, 2, activation="mish")
    with pytest.raises(ValueError, match="unknown backend"):
        fa.FusedAdapter(8, 2, backend="fast")
    with pytest.raises(ValueError, match="scaling must be a finite"):
        fa.FusedAdapter(8, 2, scaling=float("inf"))
    down, up = torch.nn.Linear(8, 2), torch.nn.Linear(3, 8)
    with pytest.raises(ValueError, match=r"down must be Linear\(d, r\) and up Linear\(r, d\)"):
        fa.FusedAdapter.from_linear(down, up)
    with pytest.raises(ValueError, match="both have a bias"):
        fa.FusedAdapter.from_linear(torch.nn.Linear(8, 2), torch.nn.Linear(2, 8, bias=False))
    with pytest.raises(TypeError, match="must be nn.Linear"):
        fa.FusedAdapter.from_linear(torch.nn.Conv1d(8, 2, 1), up)
