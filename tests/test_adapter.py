"""The battery every backend runs: outputs and all five gradients against float64 math."""

import itertools
import zlib

import pytest
import torch

import fastadapter as fa
from fastadapter.ops.adapter import adapter_backward, adapter_forward

from .helpers import (
    ACTIVATIONS,
    BACKEND_DEVICES,
    DTYPES,
    check_against_float64,
    config_grid,
    make_inputs,
    rel_err,
    require,
    unique_cases,
)

RESIDUALS = ("x", "none", "tensor")


def _residual(mode, x, seed=7):
    if mode == "x":
        return True
    if mode == "none":
        return False
    g = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, generator=g).to(device=x.device, dtype=x.dtype)


def _battery():
    """The full product on the CPU, the cpp backend at r = 7 (its ATen composition) and r = 12
    (its AVX2 kernels, r >= 8); on CUDA a covering set (every activation x dtype, every
    residual mode x bias), since each combination compiles its own kernels there."""
    full = list(itertools.product(DTYPES, ACTIVATIONS, RESIDUALS, (True, False)))
    cover = [(dt, act, "x", True) for dt in DTYPES for act in ACTIVATIONS]
    cover += [(torch.bfloat16, "gelu", res, bias) for res in RESIDUALS for bias in (True, False) if (res, bias) != ("x", True)]
    params = []
    for case in BACKEND_DEVICES:
        backend, device = case.values
        ranks = (7, 12) if backend == "cpp" else (7,) if device == "cpu" else (64,)
        for (dtype, act, res, bias), r in itertools.product(full if device == "cpu" else cover, ranks):
            params.append(pytest.param(backend, device, dtype, act, res, bias, r, marks=case.marks,
                                       id=f"{case.id}-{dtype}-{act}-{res}-{bias}-r{r}"))  # fmt: skip
    return params


@pytest.mark.parametrize("backend,device,dtype,activation,residual,bias,r", _battery())
def test_matches_float64(backend, device, dtype, activation, residual, bias, r):
    require(backend, device, dtype)
    n, d = (37, 100) if device == "cpu" else (4099, 768)
    x, wd, bd, wu, bu = make_inputs(n, d, r, dtype, device=device, bias=bias, seed=zlib.crc32(f"{activation}{residual}".encode()))
    check_against_float64(backend, x, wd, bd, wu, bu, activation, scaling=0.75, residual=_residual(residual, x))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("activation", ("gelu", "silu"))
def test_fp32_weights_half_x(backend, device, dtype, activation):
    require(backend, device, dtype)
    n, d, r = (33, 96, 12) if device == "cpu" else (2048, 1024, 32)
    x, wd, bd, wu, bu = make_inputs(n, d, r, dtype, wdtype=torch.float32, device=device, seed=3)
    got = check_against_float64(backend, x, wd, bd, wu, bu, activation)
    assert got[0].dtype == dtype and got[2].dtype == torch.float32


SHAPES = [
    # (lead shape, d, r, layout)
    ((0,), 100, 7, "contiguous"),
    ((1,), 100, 1, "contiguous"),
    ((5,), 64, 1, "contiguous"),
    ((19,), 33, 7, "contiguous"),
    ((2, 9), 48, 16, "contiguous"),
    ((2, 0, 3), 40, 5, "contiguous"),
    ((3, 7), 100, 7, "transposed"),
    ((21,), 100, 7, "strided"),
    ((2, 11), 72, 24, "strided"),
    ((70,), 130, 64, "contiguous"),
    ((3,), 16, 200, "contiguous"),
]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("lead,d,r,layout", SHAPES, ids=lambda v: str(v).replace(" ", ""))
def test_odd_shapes_and_layouts(backend, device, lead, d, r, layout):
    require(backend, device, torch.float32, r)
    x, wd, bd, wu, bu = make_inputs(None, d, r, lead=lead, layout=layout, device=device, seed=11)
    if layout != "contiguous":
        assert not x.is_contiguous()
    got = check_against_float64(backend, x, wd, bd, wu, bu, "gelu_tanh", scaling=1.5)
    assert got[0].shape == x.shape
    if x.numel() == 0:
        for g in got[2:]:
            assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("r", (65, 130))
def test_wide_bottleneck_half(backend, device, dtype, r):
    """Half precision past one 64-column chunk of the Triton backward: its three-launch path
    (dz stored by phase 1, dx and dW_down from it), over several programs' rows."""
    require(backend, device, dtype, r)
    n, d = (160, 40) if device == "cpu" else (4099, 768)
    x, wd, bd, wu, bu = make_inputs(n, d, r, dtype, device=device, seed=r)
    check_against_float64(backend, x, wd, bd, wu, bu, "silu", scaling=0.5, residual=True)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("scaling", (0.0, -2.5, 4.0))
def test_scaling(backend, device, scaling):
    require(backend, device)
    x, wd, bd, wu, bu = make_inputs(17, 40, 4, device=device, seed=5)
    check_against_float64(backend, x, wd, bd, wu, bu, "relu", scaling=scaling, residual=True)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_inf_propagate(backend, device, dtype):
    require(backend, device, dtype)
    x, wd, bd, wu, bu = make_inputs(8, 24, 4, dtype, device=device, seed=2)
    x[1, 3] = float("nan")
    x[5, 0] = float("inf")
    got = fa.fused_adapter(x, wd, bd, wu, bu, activation="gelu", backend=backend)
    ref = fa.fused_adapter(x, wd, bd, wu, bu, activation="gelu", backend="reference")
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    assert torch.isnan(got[1]).all()
    assert not torch.isfinite(got[5]).all()
    ok = torch.isfinite(ref)
    assert torch.equal(ok, torch.isfinite(got))
    assert rel_err(got[ok], ref[ok]) <= 2e-2
    # clean rows stay finite
    assert torch.isfinite(got[[0, 2, 3, 4, 6, 7]]).all()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("trainable", ["x", "weights", "biases", "up", "none_x_only_residual"])
def test_only_needed_gradients(backend, device, trainable):
    """Frozen weights / x without grad: the right subset of gradients, equal to the full ones."""
    require(backend, device)
    x, wd, bd, wu, bu = make_inputs(23, 40, 6, device=device, seed=9)
    full = [t.clone().requires_grad_() for t in (x, wd, bd, wu, bu)]
    y = fa.fused_adapter(*full, activation="silu", backend=backend)
    dy = torch.randn_like(y)
    want = torch.autograd.grad(y, full, dy)
    flags = {
        "x": (1, 0, 0, 0, 0),
        "weights": (0, 1, 0, 1, 0),
        "biases": (0, 0, 1, 0, 1),
        "up": (0, 0, 0, 1, 1),
        "none_x_only_residual": (0, 0, 0, 0, 0),
    }[trainable]
    ins = [t.clone().requires_grad_(bool(f)) for t, f in zip((x, wd, bd, wu, bu), flags)]
    res = torch.randn_like(x).requires_grad_() if trainable == "none_x_only_residual" else True
    y = fa.fused_adapter(*ins, activation="silu", backend=backend, residual=res)
    wrt = [t for t in ins if t.requires_grad] + ([res] if isinstance(res, torch.Tensor) else [])
    got = torch.autograd.grad(y, wrt, dy)
    expected = [w for w, f in zip(want, flags) if f]
    if isinstance(res, torch.Tensor):
        expected.append(dy)
    for g, w in zip(got, expected):
        assert rel_err(g, w) <= 1e-6


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_backward_op_computes_only_what_is_asked(backend, device):
    require(backend, device)
    x, wd, bd, wu, bu = make_inputs(12, 32, 4, device=device, seed=4)
    y, z = adapter_forward(x, wd, bd, wu, bu, None, "gelu", 1.0, True, backend)
    assert z.dtype == torch.float32 and z.shape == (12, 4)
    dy = torch.randn_like(y)
    for needs in itertools.product((False, True), repeat=5):
        grads = adapter_backward(dy, x, z, wd, bd, wu, bu, "gelu", 1.0, True, list(needs), backend)
        for need, g, like in zip(needs, grads, (x, wd, bd, wu, bu)):
            assert g.shape == (like.shape if need else (0,))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_deterministic(backend, device):
    require(backend, device)
    x, wd, bd, wu, bu = make_inputs(300, 64, 8, device=device, seed=6)
    runs = []
    for _ in range(2):
        ins = [t.clone().requires_grad_() for t in (x, wd, bd, wu, bu)]
        y = fa.fused_adapter(*ins, activation="gelu", backend=backend)
        runs.append([y, *torch.autograd.grad(y, ins, torch.ones_like(y))])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_module_uses_backend(backend, device):
    require(backend, device)
    torch.manual_seed(0)
    m = fa.FusedAdapter(48, 8, activation="gelu", backend=backend, device=device)
    ref = fa.FusedAdapter.from_linear(m.down, m.up, activation="gelu", backend="reference")
    x = torch.randn(2, 5, 48, device=device)
    assert rel_err(m(x), ref(x)) <= 1e-5


# ----------------------------------------------------------------------------- GPU compile check


def gpu_launches():
    """(what, launch) for tests/gpu_compile.py: the triton backend's own launchers, run on
    CPU tensors, for each activation, dtype (fp32 with and without TF32, fp16, bf16, fp32
    weights with half x), residual mode, set of needed gradients (all; a frozen adapter:
    dx only; x without grad: weights only; inference: forward only), bias or none, d not a
    multiple of 16, and bottleneck sizes over every padded block size up to 256. Each
    varies one thing from bf16 / gelu / residual x / bias / all gradients / r = 64 / d = 768."""
    from fastadapter.backends.triton import MAX_BOTTLENECK
    from fastadapter.kernels import adapter as kernels

    base = dict(dtype=torch.bfloat16, wdtype=None, activation="gelu", residual="x", bias=True, needs=(1,) * 5, r=64, d=768,
                n=512)  # fmt: skip
    cases = [dict(base)] + config_grid(base) + [dict(base, n=4099)]
    cases += [dict(base, activation=a) for a in kernels.ACT_IDS if a != base["activation"]]
    cases += [dict(base, dtype=torch.float32), dict(base, dtype=torch.float32, tf32=True), dict(base, dtype=torch.float16)]
    cases += [dict(base, wdtype=torch.float32)]
    cases += [dict(base, residual=m) for m in ("none", "tensor")]
    cases += [dict(base, bias=False), dict(base, d=100)]
    cases += [dict(base, needs=(1, 0, 0, 0, 0)), dict(base, needs=(0, 1, 1, 1, 1)), dict(base, needs=None)]
    cases += [dict(base, r=r) for r in (1, 24, 100, 128, 200, MAX_BOTTLENECK)]
    cases += [dict(base, dtype=torch.float32, r=r) for r in (24, 100, 128)]
    cases += [dict(base, dtype=torch.float32, tf32=True, r=100), dict(base, dtype=torch.float32, activation="gelu_tanh", r=128)]

    def launch(case):
        def run():
            n, d, r, dtype = case["n"], case["d"], case["r"], case["dtype"]
            x, wd, bd, wu, bu = make_inputs(n, d, r, dtype, wdtype=case["wdtype"], bias=case["bias"])
            res = {"x": None, "none": None, "tensor": torch.randn(n, d).to(dtype)}[case["residual"]]
            tf32 = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = bool(case.get("tf32"))
            try:
                y, z = kernels.adapter_forward(x, wd, bd, wu, bu, res, case["activation"], 0.5, case["residual"] == "x")
                if case["needs"] is not None:
                    kernels.adapter_backward(
                        y, x, z, wd, bd, wu, bu, case["activation"], 0.5, case["residual"] == "x", case["needs"], programs_max=132
                    )
            finally:
                torch.backends.cuda.matmul.allow_tf32 = tf32

        return run

    def name(case):
        return " ".join(f"{k}={v}" for k, v in case.items() if base.get(k, object()) != v) or "base"

    return [(name(c), launch(c)) for c in unique_cases(base, cases)]
