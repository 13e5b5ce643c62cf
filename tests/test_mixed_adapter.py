"""The mixed-adapter op (row i through adapter index[i], -1 for none) on every backend that
implements it: y and all five gradients against float64 math that runs every adapter on
every row and selects (independent of the backends' grouping), every activation, dtype
and residual mode, odd shapes and layouts, unused adapters, bad input, stack_adapters,
and the operator machinery (gradcheck, opcheck, torch.compile)."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastadapter as fa
from fastadapter import backends
from fastadapter.ops.mixed_adapter import mixed_adapter_backward, mixed_adapter_forward

from .helpers import ACTIVATIONS, DTYPES, FLOOR, TOL, config_grid, rel_err, require, torch_act, unique_cases

BACKENDS = [b for b in ("reference", "cpp", "triton") if "mixed_adapter" in backends.get(b).ops]
NAMES = ("y", "dx", "dw_down", "db_down", "dw_up", "db_up", "dresidual")


def make_mixed(n, d, r, adapters, dtype=torch.float32, wdtype=None, bias=True, seed=0, lead=None, layout="contiguous",
               none_share=0.2):  # fmt: skip
    """Seeded inputs: x, an index with about ``none_share`` of the rows at -1 and the rest
    spread evenly and randomly over the adapters, and the stacked weights."""
    g = torch.Generator().manual_seed(seed)
    wdtype = wdtype or dtype
    shape = tuple(lead) if lead is not None else (n,)
    if layout == "transposed":
        x = torch.randn(d, *shape, generator=g).movedim(0, -1)
    elif layout == "strided":
        x = torch.randn(*shape, 2 * d, generator=g)[..., ::2]
    elif layout == "padded":  # rows contiguous, with a gap between them
        x = torch.randn(*shape, d + 5, generator=g)[..., :d]
    else:
        x = torch.randn(*shape, d, generator=g)
    index = torch.randint(0, adapters, shape, generator=g)
    index[torch.rand(shape, generator=g) < none_share] = -1
    w_down = (torch.randn(adapters, r, d, generator=g) / math.sqrt(d)).to(wdtype)
    w_up = (torch.randn(adapters, d, r, generator=g) / math.sqrt(r)).to(wdtype)
    b_down = (0.1 * torch.randn(adapters, r, generator=g)).to(wdtype) if bias else None
    b_up = (0.1 * torch.randn(adapters, d, generator=g)).to(wdtype) if bias else None
    return x.to(dtype), index, w_down, b_down, w_up, b_up


def mixed_math(x, index, w_down, b_down, w_up, b_up, residual, activation, scaling):
    """Every adapter on every row, then each row's own (plain torch.nn.functional)."""
    y = torch.zeros_like(x) if residual is None else residual.clone()
    for a in range(w_down.shape[0]):
        f = F.linear(torch_act(F.linear(x, w_down[a], None if b_down is None else b_down[a]), activation), w_up[a],
                     None if b_up is None else b_up[a])  # fmt: skip
        y = y + torch.where((index == a).unsqueeze(-1), scaling * f, torch.zeros_like(f))
    return y


def _run(fn, x, index, weights, residual_mode, cast=None, dy_seed=7):
    """[y, dx, dw_down, db_down, dw_up, db_up, dresidual] of fn; ``cast`` casts every float tensor."""
    ts = [None if t is None else t.detach() for t in (x, *weights)]
    if cast is not None:
        ts = [None if t is None else t.to(cast) for t in ts]
    for t in ts:
        if t is not None:
            t.requires_grad_()
    res = None
    if residual_mode == "tensor":
        g = torch.Generator().manual_seed(99)
        res = torch.randn(ts[0].shape, generator=g).to(ts[0].device, ts[0].dtype).requires_grad_()
    y = fn(ts[0], index, *ts[1:], res)
    g = torch.Generator().manual_seed(dy_seed)
    dy = torch.randn(y.shape, generator=g).to(y.device, y.dtype)
    wanted = [t for t in ts if t is not None] + ([res] if res is not None else [])
    grads = iter(torch.autograd.grad(y, wanted, dy))
    out = [y.detach()] + [next(grads) if t is not None else None for t in ts]
    return out + [next(grads) if res is not None else None]


def check_mixed(backend, x, index, weights, activation="gelu", scaling=0.75, residual_mode="x"):
    dtype = x.dtype

    def op(x_, idx, wd, bd, wu, bu, res):
        residual = res if residual_mode == "tensor" else residual_mode == "x"
        return fa.mixed_adapter(x_, idx, wd, bd, wu, bu, activation=activation, scaling=scaling, residual=residual,
                                backend=backend)  # fmt: skip

    def math_(x_, idx, wd, bd, wu, bu, res):
        residual = res if residual_mode == "tensor" else (x_ if residual_mode == "x" else None)
        return mixed_math(x_, idx, wd, bd, wu, bu, residual, activation, scaling)

    got = _run(op, x, index, weights, residual_mode)
    want = _run(math_, x, index, weights, residual_mode, cast=torch.float64)
    eager = _run(math_, x, index, weights, residual_mode, cast=dtype) if dtype != torch.float64 else None
    likes = (x, x, *weights, x)
    for i, name in enumerate(NAMES):
        if want[i] is None:
            assert got[i] is None, name
            continue
        assert got[i].dtype == likes[i].dtype and got[i].shape == want[i].shape, name
        err = rel_err(got[i], want[i])
        assert err <= TOL[dtype], f"{backend} {name}: relative error {err:.3e} > {TOL[dtype]:.0e} ({dtype})"
        if eager is not None:
            eager_err = rel_err(eager[i], want[i])
            assert err <= max(2.0 * eager_err, FLOOR[dtype]), f"{backend} {name}: {err:.3e} > 2x eager's {eager_err:.3e}"
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_float64(backend, dtype, activation):
    require(backend, "cpu", dtype)
    x, index, *w = make_mixed(300, 48, 8, 4, dtype, seed=ACTIVATIONS.index(activation))
    check_mixed(backend, x, index, w, activation=activation)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual_mode", ["x", "none", "tensor"])
@pytest.mark.parametrize("bias", [True, False])
def test_residual_modes_and_no_bias(backend, residual_mode, bias):
    require(backend, "cpu")
    x, index, *w = make_mixed(200, 40, 6, 3, bias=bias, seed=3)
    check_mixed(backend, x, index, w, activation="silu", residual_mode=residual_mode)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda t: str(t)[6:])
def test_fp32_weights_half_activations(backend, dtype):
    require(backend, "cpu", dtype)
    x, index, *w = make_mixed(160, 32, 8, 3, dtype, wdtype=torch.float32, seed=5)
    check_mixed(backend, x, index, w)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "lead, d, r, adapters, layout",
    [((0,), 16, 4, 3, "contiguous"), ((1,), 16, 4, 3, "contiguous"), ((3, 17), 33, 1, 2, "contiguous"),
     ((2, 0, 3), 24, 4, 2, "contiguous"), ((50,), 31, 5, 1, "transposed"), ((4, 25), 40, 8, 5, "strided"),
     ((70,), 36, 6, 3, "padded")],
)  # fmt: skip
def test_odd_shapes_and_layouts(backend, lead, d, r, adapters, layout):
    require(backend, "cpu")
    x, index, *w = make_mixed(None, d, r, adapters, lead=lead, layout=layout, seed=11)
    check_mixed(backend, x, index, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unused_adapters_get_zero_gradients_and_rows_without_adapter_pass_through(backend):
    require(backend, "cpu")
    x, index, *w = make_mixed(64, 16, 4, 4, seed=2)
    index = torch.where(index == 2, torch.full_like(index, -1), index)  # adapter 2 unused
    got = check_mixed(backend, x, index, w)
    for name, grad in zip(NAMES[2:6], got[2:6]):
        assert torch.count_nonzero(grad[2]) == 0, f"{name} of the unused adapter"
    none = index == -1
    assert torch.equal(got[0][none], x[none]), "a row with index -1 is its residual, exactly"
    assert torch.equal(got[1][none], torch.randn(x.shape, generator=torch.Generator().manual_seed(7))[none])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", ["grouped", "random", "all-none"])
def test_row_orders(backend, order):
    """Grouped rows (each adapter's contiguous, in adapter order: the cpp backend runs views)
    and random rows give the same math; so does a batch with no adapter at all."""
    require(backend, "cpu")
    x, index, *w = make_mixed(120, 24, 4, 3, seed=8)
    if order == "grouped":
        index = index.sort().values
    elif order == "all-none":
        index = torch.full_like(index, -1)
    check_mixed(backend, x, index, w, residual_mode="tensor")


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_adapter_everywhere_is_the_adapter_op(backend):
    require(backend, "cpu")
    x, _, wd, bd, wu, bu = make_mixed(90, 32, 8, 1, seed=4)
    y = fa.mixed_adapter(x, torch.zeros(90, dtype=torch.int32), wd, bd, wu, bu, activation="tanh", backend=backend)
    want = fa.fused_adapter(x, wd[0], bd[0], wu[0], bu[0], activation="tanh", backend=backend)
    assert rel_err(y, want) <= 1e-6


# The cpp backend's ways through the mixed op (the cpp_avx2 fixture): its kernels reading
# and writing rows through row maps (fp32, r and d >= 8) at the AVX-512 or AVX2 width, and
# gather, adapter kernels, scatter.
# (lead shape, d, r, adapters, layout): d and r around the kernels' 16- and 64-column
# blocks, 8- and 16-lane vectors and 6-row micro-tiles, r = 8 its smallest; d = 128 whole
# blocks only; r > 128 (the up-projection's k in blocks); strided and transposed x
ROW_MAP_CASES = [((203,), 40, 8, 3, "contiguous"), ((97,), 100, 17, 4, "strided"), ((5, 13), 24, 16, 2, "transposed"),
                 ((61,), 130, 9, 5, "padded"), ((90,), 128, 64, 3, "contiguous"), ((50,), 200, 150, 2, "contiguous")]  # fmt: skip


@pytest.mark.parametrize("lead, d, r, adapters, layout", ROW_MAP_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("order", ["random", "grouped"])
@pytest.mark.parametrize("residual_mode", ["x", "none", "tensor"])
def test_cpp_row_maps_and_gathers(cpp_avx2, lead, d, r, adapters, layout, order, residual_mode):
    x, index, *w = make_mixed(None, d, r, adapters, lead=lead, layout=layout, seed=d + r)
    index = torch.where(index == adapters - 1, torch.full_like(index, -1), index)  # the last adapter unused
    if order == "grouped":
        index = index.flatten().sort().values.view(index.shape)
    got = check_mixed("cpp", x, index, w, activation="gelu_tanh", scaling=1.25, residual_mode=residual_mode)
    for name, grad in zip(NAMES[2:6], got[2:6]):
        assert torch.count_nonzero(grad[adapters - 1]) == 0, f"{name} of the unused adapter"


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cpp_row_maps_every_activation(cpp_avx2, activation):
    x, index, *w = make_mixed(150, 56, 12, 3, seed=ACTIVATIONS.index(activation))
    check_mixed("cpp", x, index, w, activation=activation)


def test_backends_agree_on_a_bigger_batch():
    if len(BACKENDS) < 2:
        pytest.skip("one backend implements mixed_adapter here")
    x, index, *w = make_mixed(2000, 96, 16, 6, seed=6)
    outs = [_run(lambda *t, b=b: fa.mixed_adapter(*t[:6], activation="gelu", backend=b), x, index, w, "x") for b in BACKENDS]
    for other, out in zip(BACKENDS[1:], outs[1:]):
        for name, a, b in zip(NAMES, outs[0], out):
            if a is not None:
                assert rel_err(a, b) <= 1e-5, f"{other} against {BACKENDS[0]}: {name}"


@pytest.mark.parametrize(
    "dtype, r, skew",
    [(torch.float32, 48, 0.9), (torch.bfloat16, 100, 0.9), (torch.float16, 24, 0.0), (torch.float32, 1, 0.5)],
    ids=["fp32-r48-skewed", "bf16-r100-skewed", "fp16-r24-even", "fp32-r1"],
)  # fmt: skip
def test_triton_programs_and_bottleneck_chunks(dtype, r, skew):
    """The triton kernels' own cases: bottlenecks wider than one register chunk (phase 1, dx
    and dW_down in separate launches, dz stored in sorted order), an adapter whose rows take
    several backward programs (its weight gradients summed over their slices) and adapters
    with no rows, next to even spreads."""
    require("triton", "cpu", dtype, r)
    x, index, *w = make_mixed(700, 40, r, 4, dtype, seed=12)
    heavy = torch.rand(700, generator=torch.Generator().manual_seed(3)) < skew
    index = torch.where(heavy, torch.ones_like(index), index)
    if skew:
        index[index == 3] = -1  # adapter 3 unused
    check_mixed("triton", x, index, w, activation="gelu_tanh", residual_mode="x")


def test_triton_refuses_more_adapters_than_its_segment_search_holds():
    require("triton", "cpu")
    from fastadapter.kernels.mixed_adapter import MAX_ADAPTERS

    x, index, wd, bd, wu, bu = make_mixed(6, 8, 1, MAX_ADAPTERS, seed=1)
    with pytest.raises(ValueError, match=rf"take up to {MAX_ADAPTERS - 1} adapters, got {MAX_ADAPTERS} \(w_down.shape\[0\]\)"):
        fa.mixed_adapter(x, index, wd, bd, wu, bu, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("r", [64, 128])
def test_triton_on_the_gpu(dtype, r):
    """The Triton kernels on CUDA tensors (the real compiler, autotuning, one wave of
    programs), uneven adapters and rows without one, against float64 math."""
    require("triton", "cuda", dtype, r)
    x, index, *w = make_mixed(5000, 200, r, 5, dtype, seed=13)
    index[index == 4] = 1  # adapter 1 takes about twice the rows, adapter 4 none
    check_mixed("triton", x.cuda(), index.cuda(), [t.cuda() for t in w], activation="gelu", residual_mode="tensor")


def _bad(**change):
    x, index, wd, bd, wu, bu = make_mixed(10, 8, 2, 3, seed=1)
    args = dict(x=x, index=index, w_down=wd, b_down=bd, w_up=wu, b_up=bu)
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change, kind, words",
    [
        (dict(index=torch.full((10,), 3)), ValueError, r"index holds 3, outside \[-1, A\) = \[-1, 3\)"),
        (dict(index=torch.full((10,), -2)), ValueError, r"index holds -2"),
        (dict(index=torch.zeros(10)), TypeError, "index must be an int64 or int32 tensor"),
        (dict(index=torch.zeros(5, 2, dtype=torch.long)), ValueError, r"index must have x's leading shape \[10\]"),
        (dict(w_down=torch.randn(2, 8)), ValueError, r"w_down must be 3-D \[A, r, d\]"),
        (dict(w_up=torch.randn(2, 8, 2)), ValueError, "w_up holds 2 adapters but w_down holds 3"),
        (dict(w_up=torch.randn(3, 8, 5)), ValueError, r"w_up must have shape \[A, d, r\]"),
        (dict(b_down=torch.randn(4, 2)), ValueError, "b_down holds 4 adapters but w_down holds 3"),
        (dict(b_up=torch.randn(3, 7)), ValueError, r"b_up must have shape \[A, 8\]"),
        (dict(w_down=torch.randn(3, 2, 8, dtype=torch.float64)), TypeError, "w_down must have x's dtype"),
    ],
)
def test_bad_input_is_refused_naming_the_argument(change, kind, words):
    args = _bad(**change)
    with pytest.raises(kind, match=words):
        fa.mixed_adapter(args.pop("x"), args.pop("index"), **{k: args[k] for k in ("w_down", "b_down", "w_up", "b_up")})


def test_bad_residual_and_unknown_backend_are_refused():
    x, index, wd, bd, wu, bu = make_mixed(10, 8, 2, 3, seed=1)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        fa.mixed_adapter(x, index, wd, bd, wu, bu, residual=torch.randn(10, 7))
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        fa.mixed_adapter(x, index, wd, bd, wu, bu, backend="nope")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    require(backend, "cpu", torch.float64)
    x, index, *w = make_mixed(12, 6, 3, 3, torch.float64, seed=9)
    inputs = [t.requires_grad_() for t in (x, *w)]

    def f(x_, wd, bd, wu, bu):
        return fa.mixed_adapter(x_, index, wd, bd, wu, bu, activation="silu", scaling=0.7, backend=backend)

    assert torch.autograd.gradcheck(f, tuple(inputs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    require(backend, "cpu")
    x, index, wd, bd, wu, bu = (t.requires_grad_() if t.is_floating_point() else t for t in make_mixed(9, 16, 4, 3, seed=1))
    args = (x, index, wd, bd, wu, bu, None, "gelu", 0.5, True, backend)
    torch.library.opcheck(torch.ops.fastadapter.mixed_adapter_forward.default, args)
    _, z = mixed_adapter_forward(*(t.detach() if isinstance(t, torch.Tensor) else t for t in args))
    bargs = (torch.randn(9, 16), x.detach(), index, z, wd.detach(), bd.detach(), wu.detach(), bu.detach(), "gelu", 0.5, True,
             [True] * 5, backend)  # fmt: skip
    torch.library.opcheck(torch.ops.fastadapter.mixed_adapter_backward.default, bargs)
    grads = mixed_adapter_backward(*bargs[:11], [False, True, False, False, False], backend)
    assert grads[1].shape == wd.shape and all(g.numel() == 0 for i, g in enumerate(grads) if i != 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    require(backend, "cpu")
    torch._dynamo.reset()
    x, index, *w = make_mixed(40, 32, 8, 3, seed=5)
    inputs = [t.requires_grad_() for t in (x, *w)]

    def f(x_, wd, bd, wu, bu):
        return fa.mixed_adapter(x_, index, wd, bd, wu, bu, activation="gelu", backend=backend)

    compiled = torch.compile(f, fullgraph=True)
    a, b = compiled(*inputs), f(*inputs)
    assert rel_err(a, b) <= 1e-6
    for ga, gb in zip(torch.autograd.grad(a.square().sum(), inputs), torch.autograd.grad(b.square().sum(), inputs)):
        assert rel_err(ga, gb) <= 1e-5


def test_stack_adapters_pads_smaller_bottlenecks_exactly():
    torch.manual_seed(0)
    mods = [fa.FusedAdapter(24, r, activation="gelu") for r in (4, 8, 2)]
    for m in mods:  # nonzero up-projections (the default init zeros them)
        torch.nn.init.normal_(m.up.weight, std=0.2)
    x = torch.randn(30, 24)
    index = torch.arange(30) % 4 - 1  # -1, 0, 1, 2, -1, ...
    w_down, b_down, w_up, b_up = fa.stack_adapters(mods)
    assert w_down.shape == (3, 8, 24) and w_up.shape == (3, 24, 8) and b_down.shape == (3, 8)
    y = fa.mixed_adapter(x, index, w_down, b_down, w_up, b_up, activation="gelu")
    for i in range(30):
        want = x[i] if index[i] < 0 else mods[index[i]](x[i : i + 1])[0]
        assert rel_err(y[i], want) <= 1e-6
    y.square().sum().backward()
    assert all(p.grad is not None for m in mods for p in m.parameters())


def test_stack_adapters_refuses_adapters_that_do_not_fit():
    with pytest.raises(ValueError, match="adapter 1 has d = 16, adapter 0 has d = 24"):
        fa.stack_adapters([fa.FusedAdapter(24, 4), fa.FusedAdapter(16, 4)])
    with pytest.raises(ValueError, match="adapter 1 has activation"):
        fa.stack_adapters([fa.FusedAdapter(24, 4, activation="relu"), fa.FusedAdapter(24, 4, activation="gelu")])
    with pytest.raises(ValueError, match="at least one adapter"):
        fa.stack_adapters([])


# ----------------------------------------------------------------------------- GPU compile check


def gpu_launches():
    """(what, launch) for tests/gpu_compile.py: the triton backend's mixed launchers on CPU
    tensors. The kernels run the adapter op's block code, whose variants tests/test_adapter.py
    checks in full; here what the row indirection and the segment search add, varying one
    thing at a time from bf16 / gelu / residual x / bias / every gradient / r = 64 / d = 768 /
    A = 4 / 32-bit offsets: fp32 with and without TF32 (the split backward), fp16, fp32
    weights, a residual tensor, frozen adapters (dx only), x without grad, r = 1 and 128,
    and 64-bit row offsets (tensors past 2**31 elements) in bf16 and fp32."""
    from fastadapter.kernels import mixed_adapter as kernels

    base = dict(dtype=torch.bfloat16, wdtype=None, activation="gelu", residual="x", bias=True, needs=(1,) * 5, r=64, d=768,
                adapters=4, n=512)  # fmt: skip
    cases = [dict(base), dict(base, dtype=torch.float32), dict(base, dtype=torch.float32, tf32=True)]
    cases += config_grid(base) + [dict(base, activation=a) for a in ACTIVATIONS] + [dict(base, n=4099)]
    cases += [dict(base, dtype=torch.float16), dict(base, wdtype=torch.float32), dict(base, residual="tensor")]
    cases += [dict(base, needs=(1, 0, 0, 0, 0)), dict(base, needs=(0, 1, 1, 1, 1)), dict(base, r=1), dict(base, r=128)]
    cases += [dict(base, offsets=64), dict(base, dtype=torch.float32, offsets=64)]

    def launch(case):
        def run():
            x, index, wd, bd, wu, bu = make_mixed(case["n"], case["d"], case["r"], case["adapters"], case["dtype"],
                                                  wdtype=case["wdtype"], bias=case["bias"])  # fmt: skip
            res = {"x": None, "none": None, "tensor": torch.randn(case["n"], case["d"]).to(case["dtype"])}[case["residual"]]
            tf32, limit = torch.backends.cuda.matmul.allow_tf32, kernels.OFFSET32_LIMIT
            torch.backends.cuda.matmul.allow_tf32 = bool(case.get("tf32"))
            if case.get("offsets") == 64:  # the kernels' form for tensors past 2**31 elements
                kernels.OFFSET32_LIMIT = 0
            try:
                args = (case["activation"], 0.5, case["residual"] == "x")
                y, z = kernels.mixed_forward(x, index, wd, bd, wu, bu, res, *args)
                kernels.mixed_backward(y, x, index, z, wd, bd, wu, bu, *args, case["needs"], programs_max=132)
            finally:
                torch.backends.cuda.matmul.allow_tf32, kernels.OFFSET32_LIMIT = tf32, limit

        return run

    def name(case):
        return " ".join(f"{k}={v}" for k, v in case.items() if base.get(k, object()) != v) or "base"

    return [(name(c), launch(c)) for c in unique_cases(base, cases)]
