"""The adapter site op (adapter + residual + LayerNorm) on every backend: out and all eight
gradients against float64 math written with torch.nn.functional, for the three
placements, every activation and dtype, frozen or trainable LayerNorm, odd shapes and
layouts, NaN, bad input, and the operator machinery (gradcheck, opcheck, torch.compile)."""

import itertools
import zlib

import pytest
import torch
import torch.nn.functional as F

import fastadapter as fa
from fastadapter.ops.adapter_layernorm import adapter_layernorm_backward, adapter_layernorm_forward

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
NAMES = ("out", "dh", "dr", "dw_down", "db_down", "dw_up", "db_up", "dln_weight", "dln_bias")
BACKENDS = [b for b in ("reference", "cpp", "triton") if b in fa.available_backends()]


def make_site(n, d, r, dtype=torch.float32, wdtype=None, bias=True, ln="affine", seed=0, lead=None, layout="contiguous"):
    """Seeded inputs (never zeros): h, r, the adapter's weights, the LayerNorm's weight and bias
    (``ln``: "affine", "weight" (no bias) or "none")."""
    g, h, res, w_down, b_down, w_up, b_up = site_tensors(n, d, r, dtype, wdtype, bias, seed, lead, layout)
    wdtype = wdtype or dtype
    ln_w = (1 + 0.2 * torch.randn(d, generator=g)).to(wdtype) if ln in ("affine", "weight") else None
    ln_b = (0.1 * torch.randn(d, generator=g)).to(wdtype) if ln == "affine" else None
    return h, res, w_down, b_down, w_up, b_up, ln_w, ln_b


def site_math(h, r, w_down, b_down, w_up, b_up, ln_w, ln_b, placement, activation, scaling, eps):
    """The three placements with plain torch.nn.functional, independent of fastadapter."""
    d = h.shape[-1]

    def f(x):
        return F.linear(torch_act(F.linear(x, w_down, b_down), activation), w_up, b_up)

    def ln(x):
        return F.layer_norm(x, (d,), ln_w, ln_b, eps)

    if placement == "houlsby":
        return ln(h + r + scaling * f(h))
    if placement == "parallel":
        return ln(h + r + scaling * f(r))
    t = h + r
    return ln(t + scaling * f(ln(t)))


def outputs_and_grads(fn, inputs, dtype_cast=None, trainable=None, dy_seed=321):
    """[out, dh, dr, dw_down, db_down, dw_up, db_up, dln_w, dln_b] of fn(*inputs); ``dtype_cast``
    casts every tensor first (float64 for the truth, x's dtype for eager)."""
    ts = [None if t is None else t.detach() for t in inputs]
    if dtype_cast is not None:
        ts = [None if t is None else t.to(dtype_cast) for t in ts]
    trainable = trainable or [True] * 8
    for t, train in zip(ts, trainable):
        if t is not None:
            t.requires_grad_(bool(train))
    out = fn(*ts)
    g = torch.Generator().manual_seed(dy_seed)
    dout = torch.randn(out.shape, generator=g).to(device=out.device, dtype=out.dtype)
    wanted = [t for t in ts if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, dout)) if wanted else iter(())
    return [out.detach()] + [next(grads) if t is not None and t.requires_grad else None for t in ts]


def check_site(backend, inputs, placement, activation="gelu", scaling=0.75, eps=1e-5, trainable=None):
    """out and gradients of ``backend`` against float64 math (DESIGN.md tolerances), and for
    every backend within 2x of eager PyTorch's own error in the same dtype."""
    dtype = inputs[0].dtype

    def op(*t):
        return fa.adapter_layernorm(
            *t, placement=placement, activation=activation, scaling=scaling, eps=eps, backend=backend
        )  # fmt: skip

    def math_(*t):
        return site_math(*t, placement, activation, scaling, eps)

    got = outputs_and_grads(op, inputs, trainable=trainable)
    want = outputs_and_grads(math_, inputs, dtype_cast=torch.float64, trainable=trainable)
    eager = outputs_and_grads(math_, inputs, dtype_cast=dtype, trainable=trainable) if dtype != torch.float64 else None
    for i, name in enumerate(NAMES):
        if want[i] is None:
            assert got[i] is None, f"{name} should not be computed"
            continue
        like = inputs[i - 1] if i else inputs[0]
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
    """The full product for reference and cpp; for triton (the interpreter is slow) every
    placement x dtype and every placement x activation."""
    params = []
    for backend in BACKENDS:
        if backend == "triton":
            cases = {(p, dt, "gelu") for p in PLACEMENTS for dt in DTYPES}
            cases |= {(p, torch.bfloat16, a) for p in PLACEMENTS for a in ACTIVATIONS}
        else:
            cases = set(itertools.product(PLACEMENTS, DTYPES, ACTIVATIONS))
        for (p, dt, a), r in itertools.product(sorted(cases, key=str), (6, 12) if backend == "cpp" else (6,)):
            params.append(pytest.param(backend, p, dt, a, r, id=f"{backend}-{p}-{str(dt)[6:]}-{a}-r{r}"))
    return params


@pytest.mark.parametrize("backend,placement,dtype,activation,r", _battery())
def test_matches_float64(backend, placement, dtype, activation, r):
    """cpp at r = 6 (its ATen composition) and r = 12 (its AVX2 kernels, r >= 8)."""
    require(backend, "cpu", dtype)
    inputs = make_site(29, 40, r, dtype, seed=zlib.crc32(f"{placement}{activation}".encode()))
    check_site(backend, inputs, placement, activation)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_fp32_weights_half_activations(backend, placement, dtype):
    require(backend, "cpu", dtype)
    check_site(backend, make_site(33, 48, 8, dtype, wdtype=torch.float32, seed=4), placement, "silu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize(
    "trainable",
    [
        (1, 1, 1, 1, 1, 1, 0, 0),  # the base model's LayerNorm frozen, as usual
        (1, 1, 0, 0, 0, 0, 1, 1),  # adapter frozen, LayerNorm trains
        (0, 0, 1, 1, 1, 1, 0, 0),  # the lowest site: nothing below it trains
        (1, 0, 0, 0, 0, 0, 0, 0),
        (0, 1, 0, 0, 0, 0, 0, 0),
    ],
    ids=lambda t: "".join(map(str, t)),
)
def test_only_needed_gradients(backend, placement, trainable):
    require(backend, "cpu")
    check_site(backend, make_site(21, 24, 4, seed=8), placement, "relu", trainable=list(trainable))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ln", ["weight", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_without_affine_parts_and_adapter_without_bias(backend, ln, bias):
    require(backend, "cpu")
    for placement in PLACEMENTS:
        check_site(backend, make_site(17, 24, 5, bias=bias, ln=ln, seed=3), placement, "tanh")


SHAPES = [
    # (lead, d, r, layout)
    ((0,), 40, 6, "contiguous"),
    ((1,), 40, 6, "contiguous"),
    ((2, 0, 3), 24, 4, "contiguous"),
    ((3, 7), 33, 5, "contiguous"),
    ((19,), 100, 1, "contiguous"),
    ((3, 5), 40, 7, "transposed"),
    ((13,), 36, 6, "strided"),
    ((4,), 16, 70, "contiguous"),
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
        assert got[0].shape == inputs[0].shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_nan_propagates_by_row(backend, placement):
    require(backend, "cpu")
    h, r, *rest = make_site(6, 24, 4, seed=2)
    h[2, 5] = float("nan")
    out = fa.adapter_layernorm(h, r, *rest, placement=placement, activation="gelu", backend=backend)
    ref = fa.adapter_layernorm(h, r, *rest, placement=placement, activation="gelu", backend="reference")
    assert torch.isnan(out[2]).all()  # a NaN in a row reaches the whole row through the LayerNorm
    assert torch.isfinite(out[[0, 1, 3, 4, 5]]).all()
    assert torch.equal(torch.isnan(out), torch.isnan(ref))


# The cpp backend's ways through the site in fp32 (the cpp_avx2 fixture):
# csrc/adapter_layernorm_cpu.cpp (the residual adds and the LayerNorm in the row kernel's
# epilogue, its products at the AVX-512 or AVX2 width, the LayerNorm backward in one pass;
# r >= 8), and the adapter kernels with ATen's LayerNorm.
# r >= 8; d around the 8- and 16-float vectors and the 16- and 64-column blocks (128: whole
# blocks only); r > 128 (the up-projection's k in blocks, over several column blocks); N = 0,
# 1, around the 6-row micro-rows and over several of the 24-row tiles the products chain
# through; non-contiguous h and r
FUSED_SHAPES = [((29,), 40, 8, "contiguous"), ((7, 5), 100, 17, "transposed"), ((1,), 24, 9, "strided"),
                ((0,), 16, 8, "contiguous"), ((61,), 131, 12, "contiguous"), ((7, 23), 72, 16, "strided"),
                ((50,), 128, 64, "contiguous"), ((37,), 200, 150, "contiguous")]  # fmt: skip


@pytest.mark.parametrize("lead,d,r,layout", FUSED_SHAPES, ids=lambda v: str(v).replace(" ", ""))
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("ln_trains", [False, True], ids=["ln-frozen", "ln-trains"])
def test_cpp_fused_site(cpp_avx2, lead, d, r, layout, placement, ln_trains):
    inputs = make_site(None, d, r, lead=lead, layout=layout, seed=d + r)
    trainable = [1, 1, 1, 1, 1, 1, int(ln_trains), int(ln_trains)]
    got = check_site("cpp", inputs, placement, "gelu", scaling=0.75, trainable=trainable)
    assert got[0].shape == inputs[0].shape


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("ln", ["weight", "none"])
def test_cpp_fused_site_without_affine_parts(cpp_avx2, placement, ln):
    check_site("cpp", make_site(25, 48, 16, ln=ln, bias=False, seed=6), placement, "silu", scaling=1.5)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cpp_fused_site_every_activation(cpp_avx2, activation):
    check_site("cpp", make_site(19, 56, 10, seed=ACTIVATIONS.index(activation)), "houlsby", activation)


def test_cpp_fused_site_nan_stays_in_its_row(cpp_avx2):
    h, r, *rest = make_site(13, 40, 8, seed=2)
    h[7, 5] = float("nan")
    out = fa.adapter_layernorm(h, r, *rest, placement="houlsby", activation="gelu", backend="cpp")
    assert torch.isnan(out[7]).all()
    assert torch.isfinite(out[torch.arange(13) != 7]).all()


@pytest.mark.parametrize("placement", ["houlsby", "parallel"])
def test_cpp_fused_site_gradients_do_not_depend_on_the_thread_count(cpp_avx2, placement):
    """The fused backward's sums (db_up from the prologue's per-tile sums, the weight
    gradients) have a fixed order: one thread and two give the same bits. N = 1000 is not a
    multiple of the 24-row tiles."""
    inputs = [t.requires_grad_(i < 6) for i, t in enumerate(make_site(1000, 96, 16, seed=4))]
    dout = torch.randn(1000, 96, generator=torch.Generator().manual_seed(5))

    def grads():
        out = fa.adapter_layernorm(*inputs, placement=placement, activation="gelu", scaling=0.5, backend="cpp")
        return torch.autograd.grad(out, inputs[:6], dout)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = grads()
        torch.set_num_threads(1)
        one = grads()
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(("dh", "dr", "dw_down", "db_down", "dw_up", "db_up"), two, one):
        assert torch.equal(a, b), name


def _args(**kw):
    h, r, wd, bd, wu, bu, lw, lb = make_site(4, 8, 2)
    args = dict(h=h, r=r, w_down=wd, b_down=bd, w_up=wu, b_up=bu, ln_weight=lw, ln_bias=lb)
    args.update(kw)
    return args


@pytest.mark.parametrize(
    "change,kind,words",
    [
        (dict(r=torch.randn(4, 9)), ValueError, "r must have h's shape"),
        (dict(r=torch.randn(4, 8, dtype=torch.float64)), TypeError, "r must have h's dtype"),
        (dict(ln_weight=torch.ones(7)), ValueError, "ln_weight must have shape [8]"),
        (dict(ln_bias=torch.ones(8, dtype=torch.float16)), TypeError, "ln_bias must have h's dtype"),
        (dict(w_down=torch.randn(2, 7)), ValueError, "w_down must have shape [r, d]"),
        (dict(h=torch.ones(4, 8, dtype=torch.int64)), TypeError, "h must be a float32"),
        (dict(h="x"), TypeError, "h must be a torch.Tensor"),
    ],
    ids=lambda v: str(v)[:30],
)
def test_bad_input_is_refused_naming_the_argument(change, kind, words):
    args = _args(**change)
    with pytest.raises(kind, match=words.replace("[", r"\[").replace("]", r"\]")):
        fa.adapter_layernorm(**args, placement="houlsby")


def test_unknown_placement_and_bad_eps_are_refused():
    with pytest.raises(ValueError, match="unknown placement 'sideways'; expected one of: houlsby, parallel, pfeiffer"):
        fa.adapter_layernorm(**_args(), placement="sideways")
    with pytest.raises(ValueError, match="eps must be a positive finite number"):
        fa.adapter_layernorm(**_args(), placement="houlsby", eps=0.0)
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'placement'"):
        fa.adapter_layernorm(**_args())


def test_adapterhub_placement_names_are_accepted():
    args = _args()
    for alias, name in (("double_seq_bn", "houlsby"), ("par_bn", "parallel"), ("seq_bn", "pfeiffer")):
        a = fa.adapter_layernorm(**args, placement=alias, backend="reference")
        b = fa.adapter_layernorm(**args, placement=name, backend="reference")
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_gradcheck_float64(backend, placement):
    require(backend, "cpu", torch.float64)
    inputs = [t.double().requires_grad_() for t in make_site(5, 7, 3, seed=6)]

    def f(*t):
        return fa.adapter_layernorm(*t, placement=placement, activation="silu", scaling=0.7, eps=1e-5, backend=backend)

    assert torch.autograd.gradcheck(f, tuple(inputs))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_opcheck(backend, placement):
    require(backend, "cpu")
    inputs = [t.requires_grad_() for t in make_site(6, 16, 4, seed=1)]
    args = (*inputs, placement, 1e-5, "gelu", 0.5, backend)
    torch.library.opcheck(torch.ops.fastadapter.adapter_layernorm_forward.default, args)
    out = torch.ops.fastadapter.adapter_layernorm_forward(*args)
    h, r, wd, bd, wu, bu, lw, lb = (t.detach() for t in inputs)
    _, z, v, mean, rstd, mean_t, rstd_t = (t.detach() for t in out)
    bargs = (torch.randn(6, 16), h, r, z, v, mean, rstd, mean_t, rstd_t, wd, bd, wu, bu, lw, lb, placement, 1e-5, "gelu", 0.5,
             [True] * 8, backend)  # fmt: skip
    torch.library.opcheck(torch.ops.fastadapter.adapter_layernorm_backward.default, bargs)


def test_backward_op_computes_only_what_is_asked():
    h, r, wd, bd, wu, bu, lw, lb = make_site(5, 12, 3, seed=9)
    out = adapter_layernorm_forward(h, r, wd, bd, wu, bu, lw, lb, "pfeiffer", 1e-5, "gelu", 1.0, "reference")
    _, z, v, mean, rstd, mean_t, rstd_t = out
    dout = torch.randn_like(h)
    for needs in itertools.product((False, True), repeat=8):
        if sum(needs) not in (1, 8):
            continue
        grads = adapter_layernorm_backward(
            dout, h, r, z, v, mean, rstd, mean_t, rstd_t, wd, bd, wu, bu, lw, lb, "pfeiffer", 1e-5, "gelu", 1.0, list(needs),
            "reference",
        )  # fmt: skip
        for need, g, like in zip(needs, grads, (h, r, wd, bd, wu, bu, lw, lb)):
            assert g.shape == (like.shape if need else (0,))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_backward_with_and_without_the_kept_ln_input_agree(backend, placement):
    """The CPU backends keep v (the LayerNorm's input); given none, they recompute it."""
    require(backend, "cpu")
    h, r, wd, bd, wu, bu, lw, lb = make_site(37, 24, 5, seed=4)
    _, z, v, mean, rstd, mean_t, rstd_t = adapter_layernorm_forward(h, r, wd, bd, wu, bu, lw, lb, placement, 1e-5, "gelu",
                                                                    0.5, backend)  # fmt: skip
    assert v.shape == h.shape and v.dtype == torch.float32
    dout = torch.randn_like(h)
    rest = (mean, rstd, mean_t, rstd_t, wd, bd, wu, bu, lw, lb, placement, 1e-5, "gelu", 0.5, [True] * 8, backend)
    kept = adapter_layernorm_backward(dout, h, r, z, v, *rest)
    recomputed = adapter_layernorm_backward(dout, h, r, z, v.new_empty(0), *rest)
    for name, a, b in zip(NAMES[1:], kept, recomputed):
        assert rel_err(a, b) <= 1e-5, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_saved_tensors_known_by_hand(backend, placement):
    """Kept v (CPU backends): v, z, the statistics and the adapter's input of h and r; else h, r, z
    and the statistics. Parameters are not counted."""
    require(backend, "cpu")
    n, d, rk = 24, 16, 4
    h, r, *params = make_site(n, d, rk, dtype=torch.bfloat16, seed=2)
    h.requires_grad_(), r.requires_grad_()
    saved = saved_bytes(lambda: fa.adapter_layernorm(h, r, *params, placement=placement, backend=backend), params)
    stats = 2 * n * 4 * (2 if placement == "pfeiffer" else 1)
    if backend == "triton":
        inputs = 2 * n * d * 2
    else:
        inputs = n * d * 4 + n * d * 2 * (2 if placement == "pfeiffer" else 1)
    assert saved == inputs + n * rk * 4 + stats


def test_backward_op_refuses_saved_tensors_that_do_not_fit():
    h, r, wd, bd, wu, bu, lw, lb = make_site(6, 8, 2, seed=1)
    _, z, v, mean, rstd, mean_t, rstd_t = adapter_layernorm_forward(h, r, wd, bd, wu, bu, lw, lb, "houlsby", 1e-5, "relu",
                                                                    1.0, "reference")  # fmt: skip
    rest = (mean, rstd, mean_t, rstd_t, wd, bd, wu, bu, lw, lb, "houlsby", 1e-5, "relu", 1.0, [True] * 8, "reference")
    dout = torch.randn_like(h)
    with pytest.raises(ValueError, match="v must have dout's shape"):
        adapter_layernorm_backward(dout, h, r, z, v[:3], *rest)
    with pytest.raises(ValueError, match="h must have dout's shape"):
        adapter_layernorm_backward(dout, h.new_empty(0), r, z, v, *rest)
    with pytest.raises(ValueError, match="r must have dout's shape"):  # v not kept: r is read again
        adapter_layernorm_backward(dout, h, r.new_empty(0), z, v.new_empty(0), *rest)
    adapter_layernorm_backward(dout, h, r.new_empty(0), z, v, *rest)  # houlsby with v kept does not read r


@pytest.mark.parametrize("backend", ["reference"] + [b for b in BACKENDS if b != "reference"])
def test_compile_fullgraph(backend):
    require(backend, "cpu")
    torch._dynamo.reset()
    inputs = [t.requires_grad_() for t in make_site(2 * 7, 32, 8, seed=5)]

    def site(*t):
        return fa.adapter_layernorm(*t, placement="houlsby", activation="gelu", eps=1e-5, backend=backend)

    compiled = torch.compile(site, fullgraph=True)
    a, b = compiled(*inputs), site(*inputs)
    assert rel_err(a, b) <= 1e-6
    ga = torch.autograd.grad(a.square().sum(), inputs)
    gb = torch.autograd.grad(b.square().sum(), inputs)
    for x, y in zip(ga, gb):
        assert rel_err(x, y) <= 1e-5
    explanation = torch._dynamo.explain(site)(*inputs)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


# ----------------------------------------------------------------------------- GPU compile check


def gpu_launches():
    """(what, launch) for tests/gpu_compile.py: the triton backend's site launchers on CPU
    tensors, varying one thing at a time from bf16 / houlsby / gelu / r = 64 / d = 768 / bias
    and LayerNorm weight and bias / every gradient: each placement, activation and dtype
    (fp32 with and without TF32, fp16, fp32 weights with half h), the padded bottleneck
    sizes, no LayerNorm affine part, no bias, d = 100, and a frozen LayerNorm."""
    from fastadapter.kernels import adapter_layernorm as kernels

    base = dict(dtype=torch.bfloat16, wdtype=None, placement="houlsby", activation="gelu", r=64, d=768, bias=True, ln="affine",
                needs=(1,) * 8, n=512)  # fmt: skip
    cases = [dict(base)] + config_grid(base) + [dict(base, n=4099)]
    cases += [dict(base, placement=p) for p in ("parallel", "pfeiffer")]
    cases += [dict(base, activation=a) for a in ACTIVATIONS if a != "gelu"]
    cases += [dict(base, dtype=torch.float32), dict(base, dtype=torch.float32, tf32=True), dict(base, dtype=torch.float16)]
    cases += [dict(base, wdtype=torch.float32), dict(base, placement="pfeiffer", dtype=torch.float32)]
    cases += [dict(base, r=r) for r in (1, 100, 128, 256)]
    cases += [dict(base, ln="none"), dict(base, placement="pfeiffer", ln="none"), dict(base, bias=False), dict(base, d=100)]
    cases += [dict(base, needs=(1, 1, 1, 1, 1, 1, 0, 0)), dict(base, placement="pfeiffer", needs=(1, 1, 1, 1, 1, 1, 0, 0))]

    def run(case):
        h, r, wd, bd, wu, bu, lw, lb = make_site(case["n"], case["d"], case["r"], case["dtype"], wdtype=case["wdtype"],
                                                 bias=case["bias"], ln=case["ln"])  # fmt: skip
        args = (case["placement"], 1e-5, case["activation"], 0.5)
        out, z, mean, rstd, mean_t, rstd_t = kernels.site_forward(h, r, wd, bd, wu, bu, lw, lb, *args)
        kernels.site_backward(out, h, r, z, mean, rstd, mean_t, rstd_t, wd, bd, wu, bu, lw, lb, *args, case["needs"],
                              programs_max=132)  # fmt: skip

    return launch_cases(base, cases, run)
