"""Shared test machinery: input factories, float64 math, error metrics, backend lists.

Every backend is checked by name against the same battery (tests/test_adapter.py).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

import fastadapter as fa
from fastadapter import backends

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# the timeout of every subprocess a test runs: a guard against a hang, far above any real run
# on a busy 2-core machine (a slow machine makes the suite slower, never red)
HANG_GUARD_S = 4 * 3600
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "tanh", "identity")

# relative Frobenius error against float64 math (DESIGN.md)
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}
# errors at or below this never fail the "at most 2x the reference backend" rule. fp32: a
# one-element gradient (db_down at r = 1) has no rounding errors to average: on a Zen 5 CPU
# eager's own error there was 8.9e-7 and the cpp backend's (ATen, another summation order) 1.8e-6
FLOOR = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-13}
GRAD_NAMES = ("y", "dx", "dw_down", "db_down", "dw_up", "db_up")


def _cases():
    cases = []
    for name in ("reference", "triton", "cpp"):
        if name in backends.names():
            cases.append(pytest.param(name, "cpu", id=f"{name}-cpu"))
    for name in ("reference", "triton", "cuda"):
        if name in backends.names():
            cases.append(pytest.param(name, "cuda", id=f"{name}-cuda", marks=pytest.mark.gpu))
    return cases


BACKEND_DEVICES = _cases()


def require(backend: str, device: str, dtype=torch.float32, r: int = 8):
    """Skip (with the backend's own reason) when it cannot run on this machine."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    reason = backends.get(backend).check(torch.device(device), dtype, r)
    if reason is not None:
        if backend == "cpp" and os.environ.get("CI"):
            pytest.fail(f"the cpp backend must build in CI: {reason}")
        pytest.skip(f"{backend}: {reason}")


def make_inputs(n, d, r, dtype=torch.float32, wdtype=None, device="cpu", bias=True, seed=0, lead=None, layout="contiguous"):
    """Seeded random inputs (never zeros). ``lead`` replaces (n,) as leading shape;
    ``layout`` "transposed" or "strided" gives a non-contiguous x."""
    g = torch.Generator().manual_seed(seed)
    wdtype = wdtype or dtype
    shape = tuple(lead) if lead is not None else (n,)
    if layout == "transposed":
        x = torch.randn(d, *shape, generator=g).movedim(0, -1)
    elif layout == "strided":
        x = torch.randn(*shape, 2 * d, generator=g)[..., ::2]
    else:
        x = torch.randn(*shape, d, generator=g)
    x = x.to(device=device, dtype=dtype)
    w_down = (torch.randn(r, d, generator=g) / math.sqrt(d)).to(device=device, dtype=wdtype)
    w_up = (torch.randn(d, r, generator=g) / math.sqrt(r)).to(device=device, dtype=wdtype)
    b_down = (0.1 * torch.randn(r, generator=g)).to(device=device, dtype=wdtype) if bias else None
    b_up = (0.1 * torch.randn(d, generator=g)).to(device=device, dtype=wdtype) if bias else None
    return x, w_down, b_down, w_up, b_up


def torch_act(z, name):
    return {
        "relu": F.relu,
        "gelu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "silu": F.silu,
        "tanh": torch.tanh,
        "identity": lambda t: t,
    }[name](z)


def float64_math(x, w_down, b_down, w_up, b_up, activation, scaling, residual):
    """The DESIGN.md formula in float64 with plain torch.nn.functional, independent of fastadapter."""
    z = F.linear(x, w_down, b_down)
    y = scaling * F.linear(torch_act(z, activation), w_up, b_up)
    if residual is True:
        y = y + x
    elif isinstance(residual, torch.Tensor):
        y = y + residual
    return y


def outputs_and_grads(fn, x, w_down, b_down, w_up, b_up, residual, dy_seed=123, to64=False):
    """Run fn(x, w_down, b_down, w_up, b_up, residual) and return [y, dx, dw_down, db_down, dw_up, db_up]."""
    if to64:
        x, w_down, b_down, w_up, b_up = (None if t is None else t.detach().double() for t in (x, w_down, b_down, w_up, b_up))
        if isinstance(residual, torch.Tensor):
            residual = residual.detach().double()
    else:
        x, w_down, b_down, w_up, b_up = (None if t is None else t.detach() for t in (x, w_down, b_down, w_up, b_up))
    ins = [t for t in (x, w_down, b_down, w_up, b_up) if t is not None]
    for t in ins:
        t.requires_grad_(True)
    y = fn(x, w_down, b_down, w_up, b_up, residual)
    g = torch.Generator().manual_seed(dy_seed)
    dy = torch.randn(y.shape, generator=g).to(device=y.device, dtype=y.dtype)
    grads = torch.autograd.grad(y, ins, dy)
    out = [y.detach()]
    it = iter(grads)
    for t in (x, w_down, b_down, w_up, b_up):
        out.append(None if t is None else next(it))
    return out


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double().cpu(), ref.double().cpu()
    denom = ref.norm().item()
    num = (a - ref).norm().item()
    if denom == 0.0:
        return num
    return num / denom


def fused(activation, scaling, backend):
    def fn(x, w_down, b_down, w_up, b_up, residual):
        return fa.fused_adapter(
            x, w_down, b_down, w_up, b_up, activation=activation, scaling=scaling, residual=residual, backend=backend
        )

    return fn


def check_against_float64(
    backend, x, w_down, b_down, w_up, b_up, activation="gelu", scaling=0.75, residual=True, baseline="reference"
):
    """Outputs and all five gradients of ``backend`` against float64 math; for non-reference
    backends also against a baseline's own error in the same dtype: the reference backend,
    or (``baseline="eager"``) the same math as plain eager PyTorch modules with autograd."""
    dtype = x.dtype
    res = residual
    got = outputs_and_grads(fused(activation, scaling, backend), x, w_down, b_down, w_up, b_up, res)
    res64 = residual.double() if isinstance(residual, torch.Tensor) else residual
    want = outputs_and_grads(
        lambda *a: float64_math(*a[:5], activation, scaling, a[5]), x, w_down, b_down, w_up, b_up, res64, to64=True
    )
    base = None
    if baseline == "eager":
        base = outputs_and_grads(lambda *a: float64_math(*a[:5], activation, scaling, a[5]), x, w_down, b_down, w_up, b_up, res)
    elif backend != "reference":
        base = outputs_and_grads(fused(activation, scaling, "reference"), x, w_down, b_down, w_up, b_up, res)
    for i, name in enumerate(GRAD_NAMES):
        if want[i] is None:
            assert got[i] is None
            continue
        like = (None, x, w_down, b_down, w_up, b_up)[i]
        assert got[i].dtype == (dtype if i == 0 else like.dtype), f"{name} dtype {got[i].dtype}"
        assert got[i].shape == want[i].shape, f"{name} shape {tuple(got[i].shape)} != {tuple(want[i].shape)}"
        err = rel_err(got[i], want[i])
        tol = TOL[dtype]
        assert err <= tol, f"{backend} {name}: relative error {err:.3e} > {tol:.0e} ({dtype})"
        if base is not None:
            ref_err = rel_err(base[i], want[i])
            bound = max(2.0 * ref_err, FLOOR[dtype])
            assert err <= bound, f"{backend} {name}: error {err:.3e} > 2x {baseline}'s {ref_err:.3e} ({dtype})"
    return got


def site_tensors(n, d, r, dtype, wdtype=None, bias=True, seed=0, lead=None, layout="contiguous"):
    """The site ops' seeded inputs (never zeros): (g, h, r, w_down, b_down, w_up, b_up), with
    the generator g left to draw the norm's parameters next. ``lead`` and ``layout`` as in
    :func:`make_inputs`, for h and r both."""
    g = torch.Generator().manual_seed(seed)
    wdtype = wdtype or dtype
    shape = tuple(lead) if lead is not None else (n,)

    def act_input():
        if layout == "transposed":
            return torch.randn(d, *shape, generator=g).movedim(0, -1)
        if layout == "strided":
            return torch.randn(*shape, 2 * d, generator=g)[..., ::2]
        return torch.randn(*shape, d, generator=g)

    h, res = act_input().to(dtype), act_input().to(dtype)
    w_down = (torch.randn(r, d, generator=g) / math.sqrt(d)).to(wdtype)
    w_up = (torch.randn(d, r, generator=g) / math.sqrt(r)).to(wdtype)
    b_down = (0.1 * torch.randn(r, generator=g)).to(wdtype) if bias else None
    b_up = (0.1 * torch.randn(d, generator=g)).to(wdtype) if bias else None
    return g, h, res, w_down, b_down, w_up, b_up


def saved_bytes(fn, exclude) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs, those of ``exclude``
    (the inputs and parameters, saved by reference) left out."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.nbytes() and all(st.data_ptr() != p.untyped_storage().data_ptr() for p in exclude):
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


# one bottleneck size per padded BLOCK_R the kernels compile for (16 ... MAX_BOTTLENECK)
BLOCK_RANKS = (16, 32, 64, 128, 256)


def config_grid(base: dict, ranks=BLOCK_RANKS) -> list[dict]:
    """Launch cases for tests/gpu_compile.py: every kind of product the config tables key on
    (bf16 on the tensor cores, fp32 with TF32, IEEE fp32) at every padded bottleneck size.
    tests/test_gpu_compile.py checks that the launches reach every table entry."""
    modes = (dict(dtype=torch.bfloat16), dict(dtype=torch.float32), dict(dtype=torch.float32, tf32=True))
    return [dict(base, r=r, **mode) for mode in modes for r in ranks]


def unique_cases(base: dict, cases: list[dict]) -> list[dict]:
    """``cases`` without repeats (cases equal in what they change from ``base``), in order."""
    seen, out = set(), []
    for c in cases:
        key = tuple(sorted((k, str(v)) for k, v in c.items() if base.get(k, object()) != v))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def launch_cases(base: dict, cases: list[dict], run) -> list[tuple[str, object]]:
    """(what, launch) pairs for tests/gpu_compile.py: each case named by what it changes from
    ``base``, launched by ``run(case)`` with TF32 on where the case says ``tf32=True``."""

    def launch(case):
        def go():
            saved = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = bool(case.get("tf32"))
            try:
                run(case)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = saved

        return go

    def name(case):
        return " ".join(f"{k}={v}" for k, v in case.items() if base.get(k, object()) != v) or "base"

    return [(name(c), launch(c)) for c in unique_cases(base, cases)]
