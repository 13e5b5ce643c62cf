"""The decoder site op (adapter + residual + the RMSNorm after it) on every backend: y,
y_normed and all seven gradients against float64 math written with torch.nn.functional,
for the three placements, every activation and dtype, the norm weight trainable, frozen or
absent, gradients from either output or both, odd shapes and layouts, NaN, bad input, and
the operator machinery (gradcheck, opcheck, torch.compile)."""

import itertools
import zlib

import pytest
import torch
import torch.nn.functional as F

import fastadapter as fa
from fastadapter import backends
from fastadapter.ops.adapter_rmsnorm import adapter_rmsnorm_backward, adapter_rmsnorm_forward

from .helpers import (
    ACTIVATIONS,
    DTYPES,
    FLOOR,
    TOL,
    config_grid,
    launch_cases,
    rel_err,
    require,
    saved_bytes,
    site_tensors,
    torch_act,
)

PLACEMENTS = ("houlsby", "parallel", "pfeiffer")
NAMES = ("y", "y_normed", "dh", "dr", "dw_down", "db_down", "dw_up", "db_up", "dnorm_weight")
BACKENDS = [b for b in ("reference", "cpp", "triton") if "adapter_rmsnorm" in backends.get(b).ops]
EPS = 1e-5


def make_site(n, d, r, dtype=torch.float32, wdtype=None, bias=True, norm=True, seed=0, lead=None, layout="contiguous"):
    """Seeded inputs (never zeros): h (the sub-layer's output), r (the stream), the adapter's
    weights and the norm's weight (None with ``norm=False``)."""
    g, h, res, w_down, b_down, w_up, b_up = site_tensors(n, d, r, dtype, wdtype, bias, seed, lead, layout)
    wdtype = wdtype or dtype
    norm_w = (1 + 0.2 * torch.randn(d, generator=g)).to(wdtype) if norm else None
    return h, res, w_down, b_down, w_up, b_up, norm_w


def site_math(h, r, w_down, b_down, w_up, b_up, norm_w, placement, activation, scaling, eps):
    """The decoder site and Llama's RMSNorm with plain torch ops, independent of fastadapter."""

    def f(x):
        return F.linear(torch_act(F.linear(x, w_down, b_down), activation), w_up, b_up)

    u = {"houlsby": h, "parallel": r, "pfeiffer": h + r}[placement]
    y = r + h + scaling * f(u)
    yf = y.float() if y.dtype != torch.float64 else y
    normed = (yf * torch.rsqrt(yf.pow(2).mean(-1, keepdim=True) + eps)).to(y.dtype)
    return y, normed if norm_w is None else norm_w * normed


def outputs_and_grads(fn, inputs, dtype_cast=None, trainable=None, outputs=(0, 1), seed=321):
    """[y, y_normed, dh, dr, dw_down, db_down, dw_up, db_up, dnorm_w] of fn(*inputs), the loss
    a random projection of the ``outputs`` chosen; ``dtype_cast`` casts every tensor first."""
    ts = [None if t is None else t.detach() for t in inputs]
    if dtype_cast is not None:
        ts = [None if t is None else t.to(dtype_cast) for t in ts]
    trainable = trainable or [True] * 7
    for t, train in zip(ts, trainable):
        if t is not None:
            t.requires_grad_(bool(train))
    outs = fn(*ts)
    g = torch.Generator().manual_seed(seed)
    grads_out = [torch.randn(o.shape, generator=g).to(device=o.device, dtype=o.dtype) for o in outs]
    wanted = [t for t in ts if t is not None and t.requires_grad]
    used = [o for i, o in enumerate(outs) if i in outputs]
    # an input the chosen outputs do not reach (the norm weight for y alone) gets zeros
    grads = torch.autograd.grad(used, wanted, [grads_out[i] for i in outputs], materialize_grads=True) if wanted else ()
    grads = iter(grads)
    return [o.detach() for o in outs] + [next(grads) if t is not None and t.requires_grad else None for t in ts]


def check_site(backend, inputs, placement, activation="gelu", scaling=0.75, trainable=None, outputs=(0, 1)):
    """Outputs and gradients of ``backend`` against float64 math (DESIGN.md tolerances), and
    within 2x of eager PyTorch's own error in the same dtype."""
    dtype = inputs[0].dtype

    def op(*t):
        return fa.adapter_rmsnorm(*t, placement=placement, activation=activation, scaling=scaling, eps=EPS, backend=backend)

    def math_(*t):
        return site_math(*t, placement, activation, scaling, EPS)

    kw = dict(trainable=trainable, outputs=outputs)
    got = outputs_and_grads(op, inputs, **kw)
    want = outputs_and_grads(math_, inputs, dtype_cast=torch.float64, **kw)
    eager = outputs_and_grads(math_, inputs, dtype_cast=dtype, **kw) if dtype != torch.float64 else None
    for i, name in enumerate(NAMES):
        if want[i] is None:
            assert got[i] is None, f"{name} should not be computed"
            continue
        like = inputs[i - 2] if i >= 2 else inputs[0]
        assert got[i].dtype == like.dtype, f"{name} dtype {got[i].dtype}"
        assert got[i].shape == want[i].shape, f"{name} shape {tuple(got[i].shape)}"
        err = rel_err(got[i], want[i])
        assert err <= TOL[dtype], f"{backend} {placement} {name}: relative error {err:.3e} > {TOL[dtype]:.0e} ({dtype})"
        if eager is not None:
            eager_err = rel_err(eager[i], want[i])
            bound = max(2.0 * eager_err, FLOOR[dtype])
            assert err <= bound, f"{backend} {placement} {name}: error {err:.3e} > 2x eager's {eager_err:.3e} ({dtype})"
    return got


def _battery():
    """The full product for reference and cpp, at r = 7 (the cpp backend's ATen composition)
    and r = 12 (its AVX2 kernels, r >= 8); for triton (the interpreter is slow) every
    placement x dtype and every placement x activation, at r = 12."""
    params = []
    for backend in BACKENDS:
        if backend == "triton":
            cases = {(p, dt, "gelu", 12) for p in PLACEMENTS for dt in DTYPES}
            cases |= {(p, torch.bfloat16, a, 12) for p in PLACEMENTS for a in ACTIVATIONS}
        else:
            cases = set(itertools.product(PLACEMENTS, DTYPES, ACTIVATIONS, (7, 12)))
        for p, dt, a, r in sorted(cases, key=str):
            params.append(pytest.param(backend, p, dt, a, r, id=f"{backend}-{p}-{str(dt)[6:]}-{a}-r{r}"))
    return params


@pytest.mark.parametrize("backend,placement,dtype,activation,r", _battery())
def test_matches_float64(backend, placement, dtype, activation, r):
    require(backend, "cpu", dtype, r)
    inputs = make_site(29, 40, r, dtype, seed=zlib.crc32(f"{placement}{activation}{r}".encode()))
    check_site(backend, inputs, placement, activation)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64_on_the_gpu(backend, placement, dtype):
    require(backend, "cuda", dtype)
    inputs = [None if t is None else t.cuda() for t in make_site(1000, 576, 64, dtype, seed=13)]
    check_site(backend, inputs, placement, "gelu")
    check_site(backend, inputs, placement, "silu", outputs=(1,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_fp32_weights_half_activations(backend, placement, dtype):
    require(backend, "cpu", dtype)
    check_site(backend, make_site(33, 48, 8, dtype, wdtype=torch.float32, seed=4), placement, "silu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("outputs", [(0,), (1,), (0, 1)], ids=["y-only", "normed-only", "both"])
@pytest.mark.parametrize("r", [5, 16])
def test_gradients_from_either_output(backend, placement, outputs, r):
    require(backend, "cpu", torch.float32, r)
    check_site(backend, make_site(31, 24, r, seed=7), placement, "relu", outputs=outputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize(
    "trainable",
    [
        (1, 1, 1, 1, 1, 1, 0),  # the base model's norm frozen, as usual
        (1, 1, 0, 0, 0, 0, 1),  # adapter frozen, the norm trains
        (0, 0, 1, 1, 1, 1, 0),  # the lowest site: nothing below it trains
        (0, 0, 1, 0, 0, 0, 0),
        (1, 0, 0, 0, 0, 0, 0),
        (0, 1, 0, 0, 0, 0, 0),
    ],
    ids=lambda t: "".join(map(str, t)),
)
@pytest.mark.parametrize("r", [4, 12])
def test_only_needed_gradients(backend, placement, trainable, r):
    require(backend, "cpu", torch.float32, r)
    check_site(backend, make_site(21, 24, r, seed=8), placement, "relu", trainable=list(trainable))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", [True, False], ids=["norm-weight", "no-norm-weight"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_without_norm_weight_and_adapter_without_bias(backend, norm, bias):
    require(backend, "cpu")
    for placement, r in itertools.product(PLACEMENTS, (5, 8)):
        check_site(backend, make_site(17, 24, r, bias=bias, norm=norm, seed=3), placement, "tanh")


# r >= 8 takes the cpp kernels; d around the 8- and 16-float vectors and the 16- and
# 64-column blocks (128: whole blocks only); r > 128 (the up-projection's k in blocks, over
# several column blocks); N = 0, 1, around the 6-row micro-rows and over several 24-row
# tiles; non-contiguous inputs
SHAPES = [
    # (lead, d, r, layout)
    ((0,), 40, 6, "contiguous"),
    ((0,), 16, 8, "contiguous"),
    ((1,), 40, 6, "contiguous"),
    ((1,), 24, 9, "strided"),
    ((2, 0, 3), 24, 4, "contiguous"),
    ((3, 7), 33, 5, "contiguous"),
    ((21,), 100, 1, "contiguous"),  # r = 1: db_down is one sum over N rows (at N = 19 they cancel to ~1/15 of their size)
    ((3, 5), 40, 7, "transposed"),
    ((7, 5), 100, 17, "transposed"),
    ((13,), 36, 6, "strided"),
    ((61,), 131, 12, "contiguous"),
    ((7, 23), 72, 16, "strided"),
    ((4,), 16, 70, "contiguous"),
    ((50,), 128, 64, "contiguous"),
    ((37,), 200, 150, "contiguous"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,d,r,layout", SHAPES, ids=lambda v: str(v).replace(" ", ""))
def test_odd_shapes_and_layouts(backend, lead, d, r, layout):
    require(backend, "cpu", torch.float32, r)
    inputs = make_site(None, d, r, lead=lead, layout=layout, seed=11)
    if layout != "contiguous":
        assert not inputs[0].is_contiguous() and not inputs[1].is_contiguous()
    for placement in PLACEMENTS:
        got = check_site(backend, inputs, placement, "gelu_tanh", scaling=1.5)
        assert got[0].shape == inputs[0].shape and got[1].shape == inputs[0].shape


@pytest.mark.parametrize("lead,d,r,layout", [s for s in SHAPES if s[2] >= 8], ids=lambda v: str(v).replace(" ", ""))
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_cpp_fused_site(cpp_avx2, lead, d, r, layout, placement):
    """csrc/adapter_rmsnorm_cpu.cpp (AVX2 on, the products at either width) and the cpp adapter
    kernels with ATen's norm (off)."""
    inputs = make_site(None, d, r, lead=lead, layout=layout, seed=d + r)
    for outputs in ((0, 1), (1,)):
        check_site("cpp", inputs, placement, "gelu", trainable=[1, 1, 1, 1, 1, 1, 1], outputs=outputs)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cpp_fused_site_every_activation(cpp_avx2, activation):
    check_site("cpp", make_site(19, 56, 10, seed=ACTIVATIONS.index(activation)), "pfeiffer", activation)


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_cpp_fused_site_gradients_do_not_depend_on_the_thread_count(cpp_avx2, placement):
    """The fused backward's sums have a fixed order: one thread and two give the same bits.
    N = 1000 is not a multiple of the 24-row tiles."""
    inputs = [t.requires_grad_(i < 6) for i, t in enumerate(make_site(1000, 96, 16, seed=4))]
    g = torch.Generator().manual_seed(5)
    dy, dn = torch.randn(1000, 96, generator=g), torch.randn(1000, 96, generator=g)

    def grads():
        y, n = fa.adapter_rmsnorm(*inputs, placement=placement, activation="gelu", scaling=0.5, backend="cpp")
        return torch.autograd.grad((y, n), inputs[:6], (dy, dn))

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = grads()
        torch.set_num_threads(1)
        one = grads()
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(NAMES[2:], two, one):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("r", [4, 8])
def test_nan_stays_in_its_row(backend, placement, r):
    require(backend, "cpu", torch.float32, r)
    h, res, *rest = make_site(13, 24, r, seed=2)
    h[7, 5] = float("nan")
    y, normed = fa.adapter_rmsnorm(h, res, *rest, placement=placement, activation="gelu", backend=backend)
    ref_y, ref_n = fa.adapter_rmsnorm(h, res, *rest, placement=placement, activation="gelu", backend="reference")
    assert torch.isnan(normed[7]).all()  # a NaN in a row reaches the whole row through the norm
    others = torch.arange(13) != 7
    assert torch.isfinite(y[others]).all() and torch.isfinite(normed[others]).all()
    assert torch.equal(torch.isnan(y), torch.isnan(ref_y)) and torch.equal(torch.isnan(normed), torch.isnan(ref_n))


def test_llama_rmsnorm_convention_bit_for_bit():
    """y_normed is what the model's own RMSNorm module gives for the op's y (reference, fp32 and bf16)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    for dtype in (torch.float32, torch.bfloat16):
        h, res, wd, bd, wu, bu, w = make_site(9, 32, 4, dtype, seed=1)
        norm = LlamaRMSNorm(32, eps=EPS).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(w)
            y, normed = fa.adapter_rmsnorm(h, res, wd, bd, wu, bu, norm.weight, placement="houlsby", eps=EPS,
                                           backend="reference")  # fmt: skip
            assert torch.equal(normed, norm(y))


def _args(**kw):
    h, r, wd, bd, wu, bu, w = make_site(4, 8, 2)
    args = dict(h=h, r=r, w_down=wd, b_down=bd, w_up=wu, b_up=bu, norm_weight=w)
    args.update(kw)
    return args


@pytest.mark.parametrize(
    "change,kind,words",
    [
        (dict(r=torch.randn(4, 9)), ValueError, "r must have h's shape"),
        (dict(r=torch.randn(4, 8, dtype=torch.float64)), TypeError, "r must have h's dtype"),
        (dict(norm_weight=torch.ones(7)), ValueError, "norm_weight must have shape [8]"),
        (dict(norm_weight=torch.ones(8, dtype=torch.float16)), TypeError, "norm_weight must have h's dtype"),
        (dict(norm_weight=[1.0] * 8), TypeError, "norm_weight must be a torch.Tensor"),
        (dict(w_down=torch.randn(2, 7)), ValueError, "w_down must have shape [r, d]"),
        (dict(w_up=torch.randn(8, 3)), ValueError, "w_up must have shape [d, r]"),
        (dict(h=torch.ones(4, 8, dtype=torch.int64)), TypeError, "h must be a float32"),
        (dict(h="x"), TypeError, "h must be a torch.Tensor"),
    ],
    ids=lambda v: str(v)[:30],
)
def test_bad_input_is_refused_naming_the_argument(change, kind, words):
    args = _args(**change)
    with pytest.raises(kind, match=words.replace("[", r"\[").replace("]", r"\]")):
        fa.adapter_rmsnorm(**args, placement="houlsby")


def test_unknown_placement_activation_backend_and_bad_eps_are_refused():
    with pytest.raises(ValueError, match="unknown placement 'sideways'"):
        fa.adapter_rmsnorm(**_args(), placement="sideways")
    with pytest.raises(ValueError, match="unknown activation 'swoosh'"):
        fa.adapter_rmsnorm(**_args(), placement="houlsby", activation="swoosh")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        fa.adapter_rmsnorm(**_args(), placement="houlsby", backend="fast")
    for eps in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="eps must be a positive finite number"):
            fa.adapter_rmsnorm(**_args(), placement="houlsby", eps=eps)


def test_adapterhub_placement_names_are_accepted():
    args = _args()
    for alias, name in (("double_seq_bn", "houlsby"), ("par_bn", "parallel"), ("seq_bn", "pfeiffer")):
        a = fa.adapter_rmsnorm(**args, placement=alias, backend="reference")
        b = fa.adapter_rmsnorm(**args, placement=name, backend="reference")
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_gradcheck_float64(backend, placement):
    require(backend, "cpu", torch.float64)
    inputs = [t.double().requires_grad_() for t in make_site(5, 9, 3, seed=6)]

    def f(*t):
        return fa.adapter_rmsnorm(*t, placement=placement, activation="silu", scaling=0.7, eps=EPS, backend=backend)

    assert torch.autograd.gradcheck(f, tuple(inputs))
    assert torch.autograd.gradcheck(lambda *t: f(*t)[1], tuple(inputs))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("r", [4, 8])
def test_opcheck(backend, placement, r):
    require(backend, "cpu", torch.float32, r)
    inputs = [t.requires_grad_() for t in make_site(6, 16, r, seed=1)]
    args = (*inputs, placement, EPS, "gelu", 0.5, backend)
    torch.library.opcheck(torch.ops.fastadapter.adapter_rmsnorm_forward.default, args)
    y, _, z, rstd = (t.detach() for t in torch.ops.fastadapter.adapter_rmsnorm_forward(*args))
    h, r_, wd, bd, wu, bu, w = (t.detach() for t in inputs)
    for dy in (torch.randn(6, 16), torch.empty(0)):
        bargs = (dy, torch.randn(6, 16), h, r_, y, z, rstd, wd, bd, wu, bu, w, placement, EPS, "gelu", 0.5, [True] * 7,
                 backend)  # fmt: skip
        torch.library.opcheck(torch.ops.fastadapter.adapter_rmsnorm_backward.default, bargs)


def test_backward_op_computes_only_what_is_asked():
    h, r, wd, bd, wu, bu, w = make_site(5, 12, 3, seed=9)
    y, _, z, rstd = adapter_rmsnorm_forward(h, r, wd, bd, wu, bu, w, "pfeiffer", EPS, "gelu", 1.0, "reference")
    dy, dn = torch.randn_like(h), torch.randn_like(h)
    for needs in itertools.product((False, True), repeat=7):
        if sum(needs) not in (1, 7):
            continue
        grads = adapter_rmsnorm_backward(dy, dn, h, r, y, z, rstd, wd, bd, wu, bu, w, "pfeiffer", EPS, "gelu", 1.0,
                                         list(needs), "reference")  # fmt: skip
        for need, g, like in zip(needs, grads, (h, r, wd, bd, wu, bu, w)):
            assert g.shape == (like.shape if need else (0,))


def test_backward_op_refuses_saved_tensors_that_do_not_fit():
    h, r, wd, bd, wu, bu, w = make_site(6, 8, 2, seed=1)
    y, _, z, rstd = adapter_rmsnorm_forward(h, r, wd, bd, wu, bu, w, "houlsby", EPS, "relu", 1.0, "reference")
    rest = (wd, bd, wu, bu, w, "houlsby", EPS, "relu", 1.0, [True] * 7, "reference")
    dy = torch.randn_like(h)
    with pytest.raises(ValueError, match="dn must have y's shape"):
        adapter_rmsnorm_backward(dy, dy[:3], h, r, y, z, rstd, *rest)
    with pytest.raises(ValueError, match="at least one output's gradient"):
        adapter_rmsnorm_backward(dy.new_empty(0), dy.new_empty(0), h, r, y, z, rstd, *rest)
    with pytest.raises(ValueError, match="h must have y's shape"):
        adapter_rmsnorm_backward(dy, dy, h.new_empty(0), r, y, z, rstd, *rest)
    with pytest.raises(ValueError, match="rstd must be"):
        adapter_rmsnorm_backward(dy, dy, h, r, y, z, rstd[:2], *rest)
    adapter_rmsnorm_backward(dy, dy, h, r.new_empty(0), y, z, rstd, *rest)  # houlsby does not read r again


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_saved_tensors_known_by_hand(backend, placement):
    """y, z, rstd and the adapter's input of h and r (both for pfeiffer); parameters not counted."""
    require(backend, "cpu")
    n, d, rk = 24, 16, 8
    h, r, *params = make_site(n, d, rk, dtype=torch.bfloat16, seed=2)
    h.requires_grad_(), r.requires_grad_()
    saved = saved_bytes(lambda: fa.adapter_rmsnorm(h, r, *params, placement=placement, backend=backend), params)
    inputs = n * d * 2 * (2 if placement == "pfeiffer" else 1)
    assert saved == inputs + n * d * 2 + n * rk * 4 + n * 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    require(backend, "cpu")
    torch._dynamo.reset()
    inputs = [t.requires_grad_() for t in make_site(14, 32, 8, seed=5)]

    def site(*t):
        y, normed = fa.adapter_rmsnorm(*t, placement="houlsby", activation="gelu", eps=EPS, backend=backend)
        return y, normed

    compiled = torch.compile(site, fullgraph=True)
    a, b = compiled(*inputs), site(*inputs)
    for x, y in zip(a, b):
        assert rel_err(x, y) <= 1e-6
    ga = torch.autograd.grad(a[0].sum() + a[1].square().sum(), inputs)
    gb = torch.autograd.grad(b[0].sum() + b[1].square().sum(), inputs)
    for x, y in zip(ga, gb):
        assert rel_err(x, y) <= 1e-5
    explanation = torch._dynamo.explain(site)(*inputs)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


# ----------------------------------------------------------------------------- GPU compile check


def gpu_launches():
    """(what, launch) for tests/gpu_compile.py: the triton backend's decoder-site launchers on
    CPU tensors, varying one thing at a time from bf16 / houlsby / gelu / r = 64 / d = 576 /
    bias and norm weight / both outputs' gradients / every gradient: each placement,
    activation and dtype (fp32 with and without TF32, fp16, fp32 weights with half h), the
    padded bottleneck sizes, no norm weight, no bias, d = 4096, N not a multiple of 16, the
    norm frozen, and y_normed alone reaching the loss."""
    from fastadapter.kernels import adapter_rmsnorm as kernels

    base = dict(dtype=torch.bfloat16, wdtype=None, placement="houlsby", activation="gelu", r=64, d=576, n=512, bias=True,
                norm=True, needs=(1,) * 6, dy=True)  # fmt: skip
    cases = [dict(base)] + config_grid(base)
    cases += [dict(base, placement=p) for p in ("parallel", "pfeiffer")]
    cases += [dict(base, activation=a) for a in ACTIVATIONS if a != "gelu"]
    cases += [dict(base, dtype=torch.float32), dict(base, dtype=torch.float32, tf32=True), dict(base, dtype=torch.float16)]
    cases += [dict(base, wdtype=torch.float32), dict(base, placement="pfeiffer", dtype=torch.float32)]
    cases += [dict(base, r=r) for r in (1, 100, 128, 256)]
    cases += [dict(base, dtype=torch.float32, r=r) for r in (128, 256)]
    cases += [dict(base, norm=False), dict(base, bias=False), dict(base, d=4096), dict(base, n=4099)]
    cases += [dict(base, needs=(1, 1, 1, 1, 1, 0)), dict(base, dy=False)]

    def run(case):
        h, r, wd, bd, wu, bu, w = make_site(case["n"], case["d"], case["r"], case["dtype"], wdtype=case["wdtype"],
                                            bias=case["bias"], norm=case["norm"])  # fmt: skip
        y, normed, z, rstd = kernels.rms_site_forward(h, r, wd, bd, wu, bu, w, case["placement"], EPS, case["activation"], 0.5)
        u = {"houlsby": h, "parallel": r, "pfeiffer": h + r}[case["placement"]]
        kernels.rms_site_backward(y if case["dy"] else None, normed, u, y, z, rstd, wd, bd, wu, bu, w, case["activation"], 0.5,
                                  case["needs"], programs_max=132)  # fmt: skip

    return launch_cases(base, cases, run)
