"""The cpp backend's CPU kernels (csrc/cpu_residual_gemm.cpp: z, dy W_up, y and dx with
their epilogues; csrc/cpu_activation.cpp: the passes over the bottleneck; each on AVX-512
or AVX2) and the ATen path they replace: each against float64 math on shapes that
hit every edge of the micro-tiles (6 x 64 and 16-lane vectors on AVX-512, 6 x 16 and
8-lane vectors on AVX2), every activation, and thread-count independence."""

import re

import pytest
import torch

from fastadapter.backends import extension

from .helpers import check_against_float64, make_inputs, rel_err, require


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            found = re.search(r"^flags\s*:(.*)$", f.read(), re.M)
    except OSError:
        return set()
    return set(found.group(1).split()) if found else set()


@pytest.fixture
def module():
    require("cpp", "cpu")
    return extension.load()[0]


@pytest.fixture(params=["avx512", "avx2", "aten"])
def path(request, module):
    """Runs the test on each path this CPU has: the AVX-512 kernels, the AVX2 kernel (AVX-512
    off), and ATen ops (both off)."""
    on512, on2 = request.param == "avx512", request.param in ("avx512", "avx2")
    previous = module.set_avx512_kernels_enabled(on512), module.set_avx2_kernels_enabled(on2)
    try:
        if on512 and not all(module.avx512_kernels()):
            pytest.skip("this CPU has no AVX-512")
        if request.param == "avx2" and not all(module.avx2_kernels()):
            pytest.skip("this CPU has no AVX2 and FMA")
        yield request.param
    finally:
        module.set_avx512_kernels_enabled(previous[0])
        module.set_avx2_kernels_enabled(previous[1])


def test_kernels_are_used_where_the_cpu_has_them(module):
    flags = _cpu_flags()
    assert module.avx512_kernels() == ["avx512f" in flags] * 2
    assert module.avx2_kernels() == [{"avx2", "fma"} <= flags] * 2


# N around the 6-row micro-tile and 24-row task; d and r around the 64- and 16-column
# blocks, the 16- and 8-float vectors, the kernels' floor (r >= 8; below, ATen) and the 128-long
# k-block (d is k for z and dy W_up, r for y and dx); N=3000, d=100 splits into several tasks
SHAPES = [(1, 768, 64), (5, 64, 1), (7, 33, 3), (25, 100, 8), (97, 130, 17), (48, 16, 300), (3000, 100, 8), (513, 1024, 64),
          (13, 24, 9), (31, 257, 23)]  # fmt: skip


@pytest.mark.parametrize("n,d,r", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("residual", ["x", "none", "tensor"])
def test_matches_float64(path, n, d, r, residual):
    x, w_down, b_down, w_up, b_up = make_inputs(n, d, r, seed=n + d + r)
    if residual == "tensor":  # a non-contiguous residual: every other column of a wider tensor
        res = torch.randn(n, 2 * d, generator=torch.Generator().manual_seed(1))[:, ::2]
    else:
        res = residual == "x"
    check_against_float64("cpp", x, w_down, b_down, w_up, b_up, activation="gelu", scaling=0.75, residual=res)


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu", "tanh", "identity"])
@pytest.mark.parametrize("r", [1, 16, 37])
def test_every_activation(path, activation, r):
    x, w_down, b_down, w_up, b_up = make_inputs(131, 48, r, seed=r)
    check_against_float64("cpp", x, w_down, b_down, w_up, b_up, activation=activation, scaling=1.5, residual=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_x_without_bias(path, dtype):
    x, w_down, _, w_up, _ = make_inputs(77, 200, 24, dtype=dtype, bias=False)
    check_against_float64("cpp", x, w_down, None, w_up, None, activation="silu", scaling=2.0, residual=True)


def test_same_bits_on_one_thread_and_on_all(path):
    """y and dx (the products with d outputs per row) do not depend on the thread count; on
    the avx512 and avx2 paths the weight gradients neither (cpu_weight_grad.cpp splits
    columns, not N).
    MKL's weight-gradient GEMMs split the sum over N by thread, so elsewhere those are
    reproducible for a given thread count only (tests/test_adapter.py)."""
    import fastadapter as fa

    x, w_down, b_down, w_up, b_up = make_inputs(1000, 192, 32)
    params = (w_down, b_down, w_up, b_up)
    for t in (x, w_down, w_up):
        t.requires_grad_()
    wrt = [x] + ([w_down, w_up] if path != "aten" else [])

    def run():
        y = fa.fused_adapter(x, *params, activation="gelu", backend="cpp")
        return (y, *torch.autograd.grad(y, wrt, torch.ones_like(y)))

    threads = torch.get_num_threads()
    try:
        many = run()
        torch.set_num_threads(1)
        one = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(many, one):
        assert torch.equal(a, b)


# The cases an AMD EPYC (Zen 4) failed when the weight and bias gradients were sums of
# MKL's own order (a ones column of the dW_up GEMM): now each gradient must be within 2x
# of plain eager PyTorch's error in fp32 (nn.functional with autograd), on both paths.
EAGER_CASES = [
    # (n, d, r, activation, residual, bias)
    (3000, 100, 8, "gelu", "x", True),
    (3000, 100, 8, "gelu", "none", True),
    (3000, 100, 8, "gelu", "tensor", True),
    (131, 48, 1, "silu", "x", True),
    (4, 67, 1, "relu", "x", False),
    (4096, 768, 64, "gelu", "x", True),
]


@pytest.mark.parametrize("n,d,r,activation,residual,bias", EAGER_CASES, ids=lambda v: str(v))
def test_within_twice_eager_error(path, n, d, r, activation, residual, bias):
    x, w_down, b_down, w_up, b_up = make_inputs(n, d, r, bias=bias, seed=n * d + r)
    if residual == "tensor":
        res = torch.randn(n, d, generator=torch.Generator().manual_seed(2))
    else:
        res = residual == "x"
    check_against_float64("cpp", x, w_down, b_down, w_up, b_up, activation, scaling=1.0, residual=res, baseline="eager")


def test_relu_gradient_at_nan_is_atens(path):
    """relu'(NaN): ATen's threshold_backward (the reference) passes the gradient where z is
    NaN (not z <= 0); the passes must too, or db_down loses that row's share."""
    import fastadapter as fa

    x, w_down, b_down, w_up, b_up = make_inputs(50, 40, 16, seed=3)
    x[7, 2] = float("nan")
    grads = {}
    for backend in ("cpp", "reference"):
        b_down_ = b_down.clone().requires_grad_()
        y = fa.fused_adapter(x, w_down, b_down_, w_up, b_up, activation="relu", backend=backend)
        (grads[backend],) = torch.autograd.grad(y, b_down_, torch.ones_like(y))
    assert torch.isfinite(grads["reference"]).all()
    torch.testing.assert_close(grads["cpp"], grads["reference"])


def test_bias_gradients_are_the_reference_sums(path):
    """db_up is ATen's sum of dy, as the reference forms it: the same bits, whatever BLAS
    path this CPU takes (a sum inside a GEMM would not be)."""
    import fastadapter as fa

    x, w_down, b_down, w_up, b_up = make_inputs(3000, 100, 8, seed=5)
    dy = torch.randn(3000, 100, generator=torch.Generator().manual_seed(6))
    grads = {}
    for backend in ("cpp", "reference"):
        b_up_ = b_up.clone().requires_grad_()
        y = fa.fused_adapter(x, w_down, b_down, w_up, b_up_, activation="gelu", scaling=0.5, backend=backend)
        (grads[backend],) = torch.autograd.grad(y, b_up_, dy)
    assert torch.equal(grads["cpp"], grads["reference"])


# The weight-gradient kernel (csrc/cpu_weight_grad.cpp) alone: N around its 64-row blocks,
# m around the 6-column panels of A (and its floor of 8), d around B's 64- (AVX-512) and
# 16-column (AVX2) panels and the 8-float vectors; several column blocks per thread and
# several threads.
WEIGHT_GRAD_SHAPES = [(0, 8, 8), (1, 8, 33), (63, 9, 16), (64, 64, 17), (65, 13, 100), (129, 64, 7 * 16 + 5),
                      (70, 30, 64), (130, 250, 129), (200, 17, 384), (3000, 64, 768)]  # fmt: skip


@pytest.mark.parametrize("n,m,d", WEIGHT_GRAD_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("transposed", [False, True], ids=["m_d", "d_m"])
def test_weight_grad_kernel_matches_float64(path, module, n, m, d, transposed):
    g = torch.Generator().manual_seed(n + m + d)
    # rows further apart than their length: the kernel reads through row strides
    a = torch.randn(n, m + 3, generator=g)[:, :m]
    b = torch.randn(n, d + 5, generator=g)[:, :d]
    got = module.weight_grad_cpu(a, b, 0.75, transposed)
    if path == "aten" or m < 8 or d < 8:
        assert got is None  # the caller's GEMM (ATen)
        return
    want = 0.75 * a.double().t() @ b.double()
    want = want.t() if transposed else want
    assert got.shape == want.shape and got.is_contiguous()
    mkl = (a.t() @ b).mul_(0.75)
    mkl = mkl.t() if transposed else mkl
    err, mkl_err = rel_err(got, want), rel_err(mkl, want)
    assert err <= max(2.0 * mkl_err, 1e-6), f"relative error {err:.3e} (MKL: {mkl_err:.3e})"


@pytest.mark.parametrize("n,m,d", [(6, 7, 64), (6, 64, 7)], ids=lambda v: str(v))
def test_weight_grad_kernel_leaves_small_products(module, n, m, d):
    """m or d below 8 (a bottleneck r < 8) stays on MKL."""
    assert module.weight_grad_cpu(torch.randn(n, m), torch.randn(n, d), 1.0, False) is None


def test_weight_grad_kernel_same_bits_on_one_thread_and_on_all(path, module):
    """Threads split the output's columns, not the sum over N: every thread count gives the
    same bits."""
    a, b = torch.randn(1000, 64), torch.randn(1000, 200)
    threads = torch.get_num_threads()
    try:
        many = module.weight_grad_cpu(a, b, 1.0, True)
        torch.set_num_threads(1)
        one = module.weight_grad_cpu(a, b, 1.0, True)
    finally:
        torch.set_num_threads(threads)
    if path == "aten":
        assert many is None and one is None
        return
    assert torch.equal(many, one)


def test_weight_grad_kernel_same_bits_with_avx512_and_avx2(module):
    """Both widths sum each output in the same order (one running sum per 64-row block, then
    the blocks in order): the gradients do not depend on which kernel this CPU runs."""
    if not all(module.avx512_kernels()):
        pytest.skip("this CPU has no AVX-512")
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(1000, 37, generator=g), torch.randn(1000, 200, generator=g)
    wide = module.weight_grad_cpu(a, b, 0.5, False)
    previous = module.set_avx512_kernels_enabled(False)
    try:
        narrow = module.weight_grad_cpu(a, b, 0.5, False)
    finally:
        module.set_avx512_kernels_enabled(previous)
    assert torch.equal(wide, narrow)


def test_weight_grad_kernel_nan_stays_in_its_column(path, module):
    """A NaN in row p, column j of B reaches column j of the result only."""
    if path == "aten":
        pytest.skip("the kernel runs on the avx512 and avx2 paths")
    a, b = torch.randn(300, 16), torch.randn(300, 40)
    b[123, 17] = float("nan")
    got = module.weight_grad_cpu(a, b, 1.0, False)
    assert torch.isnan(got[:, 17]).all()
    got[:, 17] = 0
    assert torch.isfinite(got).all()


def _four_ops(n, d, r):
    """A call of each cpp op on seeded inputs, relu, returning its outputs and every gradient:
    the adapter op, the LayerNorm and RMSNorm site ops (row hooks, a second residual) and the
    mixed-adapter op (row maps)."""
    import fastadapter as fa

    from .helpers import site_tensors

    g, h, res, *w = site_tensors(n, d, r, torch.float32, seed=7)
    ln_w, ln_b = 1 + 0.2 * torch.randn(d, generator=g), 0.1 * torch.randn(d, generator=g)
    index = torch.randint(-1, 3, (n,), generator=g)
    stacked = [torch.stack([t, 0.5 * t, -t]) for t in w]

    def grads(out, inputs):
        outs = out if isinstance(out, tuple) else (out,)
        dys = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(outs)]
        return (*outs, *torch.autograd.grad(outs, inputs, dys))

    def leaves(*ts):
        return [t.detach().clone().requires_grad_() for t in ts]

    def adapter():
        x, *ws = leaves(h, *w)
        return grads(fa.fused_adapter(x, *ws, activation="relu", scaling=0.3, backend="cpp"), [x, *ws])

    def layernorm():
        ins = leaves(h, res, *w, ln_w, ln_b)
        return grads(fa.adapter_layernorm(*ins, placement="houlsby", activation="relu", scaling=0.3, backend="cpp"), ins)

    def rmsnorm():
        ins = leaves(h, res, *w, ln_w)
        return grads(fa.adapter_rmsnorm(*ins, placement="pfeiffer", activation="relu", scaling=0.3, backend="cpp"), ins)

    def mixed():
        x, *ws = leaves(h, *stacked)
        return grads(fa.mixed_adapter(x, index, *ws, activation="relu", scaling=0.3, backend="cpp"), [x, *ws])

    return {"adapter": adapter, "adapter_layernorm": layernorm, "adapter_rmsnorm": rmsnorm, "mixed_adapter": mixed}


@pytest.mark.parametrize("r", [40, 150])
@pytest.mark.parametrize("op", ["adapter", "adapter_layernorm", "adapter_rmsnorm", "mixed_adapter"])
def test_same_bits_with_avx512_and_avx2(module, op, r):
    """Every product forms each output from the same sums in the same order at either width
    (the plain AVX-512 kernel, its row-pointer form, the AVX2 kernel), and so do the weight
    gradients: the outputs and gradients of each op do not depend on which kernels this CPU
    runs. relu, whose passes are exact at both widths (the others' vector functions differ
    in the last bits). d and r over several 64-column blocks; k = d > 128 and, with r = 150,
    k = r > 128 too (every product in k-blocks)."""
    if not (all(module.avx512_kernels()) and all(module.avx2_kernels())):
        pytest.skip("this CPU has no AVX-512")
    fn = _four_ops(1000, 200, r)[op]
    wide = fn()
    previous = module.set_avx512_kernels_enabled(False)
    try:
        narrow = fn()
    finally:
        module.set_avx512_kernels_enabled(previous)
    assert len(wide) == len(narrow)
    for i, (a, b) in enumerate(zip(wide, narrow)):
        assert torch.equal(a, b), f"{op}: output or gradient {i} differs"
