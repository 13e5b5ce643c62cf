"""Triton kernels for the decoder site: adapter + residual + RMSNorm (fastadapter/ops/adapter_rmsnorm.py).

Forward, one program per block of BLOCK_M rows, three sweeps over d in BLOCK_K chunks:
  z = u @ W_down.T + b_down   (u = h, r, or h + r rounded to h's dtype), a = act(z)
  y = h + r + s * (a @ W_up.T + b_up), rounded to h's dtype and stored, and the row sums of y^2
  y_normed = w * (y * rstd), y read back from the program's own stores (from L2 on a GPU)
DRAM sees h and r read once (the second sweep finds them in L2), y and y_normed written once.
z (fp32) and rstd are stored for the backward.

Backward: ``_rms_bwd_kernel`` forms dv = dy + rstd * (g - y_hat * mean(g * y_hat)), g = dn * w,
y_hat = y * rstd, in two sweeps over a block's rows of dn and y (the second from L2), with
the norm weight's gradient as per-program partial sums; the adapter's backward is the
adapter op's own kernel (kernels/adapter.py) with dy = dv, x = u and x as its residual, which
gives dv + du for the adapter's input in its epilogue.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .adapter import (
    ACT_IDS,
    INTERPRET,
    _act,
    _and,
    _mma,
    _precision,
    _tile_addressable,
    _upcast,
    adapter_backward,
    block_r,
    rows_per_program,
)
from .adapter_layernorm import _FWD_CONFIGS, _configs, _pruner, _up_chunk

PLACEMENT_IDS = {"houlsby": 0, "parallel": 1, "pfeiffer": 2}
# The interpreter truncates fp32 -> bf16 casts where a GPU rounds to nearest: under it, with
# bf16, pfeiffer's adapter input u = h + r is made by torch (the backward's u, rounded the
# same, then meets the forward's z: a relu near 0 does not flip), and dv is stored in fp32
# and rounded by torch. The traffic counter turns this off to count the bytes a GPU moves.
ROUND_IN_TORCH = INTERPRET


@triton.jit
def _rms_site_fwd_kernel(
    H, R, U, WD, BD, WU, BU, NW, Y, YN, Z, RSTD,
    N, D, RK, scaling, eps,
    stride_hm, stride_hd, stride_rm, stride_rd,
    stride_wdr, stride_wdd, stride_wud, stride_wur,
    PLACEMENT: tl.constexpr, U_GIVEN: tl.constexpr, ACT: tl.constexpr, HAS_BD: tl.constexpr, HAS_BU: tl.constexpr,
    HAS_NW: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    m = tl.arange(0, BLOCK_M)
    k = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    mask_m = m < N - row0
    mask_r = rr < RK
    dtype = H.dtype.element_ty
    h_rows = H + row0 * stride_hm
    r_rows = R + row0 * stride_rm

    # z = u @ W_down.T + b_down
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    h_chunk, r_chunk = h_rows, r_rows
    for k0 in range(0, D, BLOCK_K):
        mask_k = k < D - k0
        mask = mask_m[:, None] & mask_k[None, :]
        if PLACEMENT == 0:
            u = tl.load(h_chunk + (m[:, None] * stride_hm + k[None, :] * stride_hd), mask=mask, other=0.0)
        elif PLACEMENT == 1:
            u = tl.load(r_chunk + (m[:, None] * stride_rm + k[None, :] * stride_rd), mask=mask, other=0.0)
        elif U_GIVEN:  # pfeiffer's u, made by torch (the interpreter with bf16: see ROUND_IN_TORCH)
            u = tl.load(U + row0 * D + k0 + (m[:, None] * D + k[None, :]), mask=mask, other=0.0)
        else:
            t = tl.load(h_chunk + (m[:, None] * stride_hm + k[None, :] * stride_hd), mask=mask, other=0.0).to(tl.float32)
            t += tl.load(r_chunk + (m[:, None] * stride_rm + k[None, :] * stride_rd), mask=mask, other=0.0).to(tl.float32)
            u = t.to(dtype)
        h_chunk += BLOCK_K * stride_hd
        r_chunk += BLOCK_K * stride_rd
        wd = tl.load(WD + k0 * stride_wdd + (rr[None, :] * stride_wdr + k[:, None] * stride_wdd),
                     mask=mask_r[None, :] & mask_k[:, None], other=0.0)  # fmt: skip
        acc = _mma(u, wd.to(dtype), acc, PRECISION, UPCAST)
    if HAS_BD:
        acc += tl.load(BD + rr, mask=mask_r, other=0.0).to(tl.float32)[None, :]
    tl.store(Z + row0 * RK + (m[:, None] * RK + rr[None, :]), acc, mask=mask_m[:, None] & mask_r[None, :])
    a = tl.where(mask_r[None, :], _act(acc, ACT), 0.0).to(dtype)

    # y = h + r + s * f, rounded once, stored; the row sums of its squares
    ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    h_chunk, r_chunk = h_rows, r_rows
    y_rows = Y + row0 * D
    for k0 in range(0, D, BLOCK_K):
        mask_k = k < D - k0
        mask = mask_m[:, None] & mask_k[None, :]
        y = tl.load(h_chunk + (m[:, None] * stride_hm + k[None, :] * stride_hd), mask=mask, other=0.0).to(tl.float32)
        y += tl.load(r_chunk + (m[:, None] * stride_rm + k[None, :] * stride_rd), mask=mask, other=0.0).to(tl.float32)
        h_chunk += BLOCK_K * stride_hd
        r_chunk += BLOCK_K * stride_rd
        y += scaling * _up_chunk(a, WU, BU, k0, k, rr, mask_k, mask_r, stride_wud, stride_wur, HAS_BU, PRECISION, UPCAST,
                                 BLOCK_M, BLOCK_K)  # fmt: skip
        y = y.to(dtype)
        tl.store(y_rows + k0 + (m[:, None] * D + k[None, :]), y, mask=mask)
        yf = tl.where(mask, y.to(tl.float32), 0.0)
        ss += tl.sum(yf * yf, axis=1)
    rstd = 1.0 / tl.sqrt(ss / D + eps)
    tl.store(RSTD + row0 + m, rstd, mask=mask_m)
    tl.debug_barrier()  # the block's stores of y are seen by all its threads

    # y_normed = w * (y * rstd), each product rounded to h's dtype (Llama's RMSNorm)
    yn_rows = YN + row0 * D
    for k0 in range(0, D, BLOCK_K):
        mask_k = k < D - k0
        mask = mask_m[:, None] & mask_k[None, :]
        y = tl.load(y_rows + k0 + (m[:, None] * D + k[None, :]), mask=mask, other=0.0).to(tl.float32)
        yn = (y * rstd[:, None]).to(dtype)
        if HAS_NW:
            yn = (tl.load(NW + k0 + k, mask=mask_k, other=0.0).to(tl.float32)[None, :] * yn.to(tl.float32)).to(dtype)
        tl.store(yn_rows + k0 + (m[:, None] * D + k[None, :]), yn, mask=mask)


# A launch with no product by design, {kernel: {constexpr: value}}: the norm's backward. The
# GPU compile check asks for no tensor-core instruction in it while its TTIR has no tt.dot.
NO_PRODUCT_VARIANTS = {"_rms_bwd_kernel": {}}


@triton.jit
def _rms_bwd_kernel(
    DY, DN, Y, RSTD, NW, DV, DNW_P,
    N, D, rows_per_program,
    stride_dym, stride_dyd, stride_dnm, stride_dnd,
    HAS_DY: tl.constexpr, HAS_NW: tl.constexpr, NEED_DNW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dv = dy + RMSNorm'(dn) for the program's rows (dy absent: the norm's part alone), and the
    program's partial sums of the norm weight's gradient, sum of dn * y_hat (y_hat rounded)."""
    pid = tl.program_id(0).to(tl.int64)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, N)
    m = tl.arange(0, BLOCK_M)
    k = tl.arange(0, BLOCK_K)
    dtype = Y.dtype.element_ty
    dnw_slice = DNW_P + pid * D
    for row0 in range(first, last, BLOCK_M):
        mask_m = m < last - row0
        add = row0 > first
        rstd = tl.load(RSTD + row0 + m, mask=mask_m, other=0.0)
        # two sweeps over d: the row sums of g * y, then dv
        sum_gy = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for sweep in tl.static_range(2):
            for k0 in range(0, D, BLOCK_K):
                mask_k = k < D - k0
                mask = mask_m[:, None] & mask_k[None, :]
                y = tl.load(Y + row0 * D + k0 + (m[:, None] * D + k[None, :]), mask=mask, other=0.0).to(tl.float32)
                dn = tl.load(DN + row0 * stride_dnm + k0 * stride_dnd + (m[:, None] * stride_dnm + k[None, :] * stride_dnd),
                             mask=mask, other=0.0).to(tl.float32)  # fmt: skip
                g = dn
                if HAS_NW:
                    g = g * tl.load(NW + k0 + k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
                if sweep == 0:
                    sum_gy += tl.sum(g * y, axis=1)
                    if NEED_DNW:
                        tile = dnw_slice + k0 + k
                        y_hat = (y * rstd[:, None]).to(dtype).to(tl.float32)
                        tl.store(tile, tl.load(tile, mask=_and(mask_k, add), other=0.0) + tl.sum(dn * y_hat, axis=0),
                                 mask=mask_k)  # fmt: skip
                else:
                    # mean(g * y_hat) = sum(g * y) * rstd / D; dv = rstd * (g - y * rstd * mean)
                    c = (sum_gy * rstd * rstd / D)[:, None]
                    dv = rstd[:, None] * (g - y * c)
                    if HAS_DY:
                        dv += tl.load(DY + row0 * stride_dym + k0 * stride_dyd + (m[:, None] * stride_dym + k[None, :] *
                                      stride_dyd), mask=mask, other=0.0).to(tl.float32)  # fmt: skip
                    tl.store(DV + row0 * D + k0 + (m[:, None] * D + k[None, :]), dv.to(DV.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- configs and launchers

# the forward's configs are the LayerNorm site's (checked spill-free for this kernel too: tests/test_gpu_compile.py)
_BWD_CONFIG = (32, 64, 4, 2)  # no product: one config for every dtype (fp32 at BLOCK_K 128 took 224 registers)

_fwd = triton.autotune(
    configs=_configs(_FWD_CONFIGS),
    key=["D", "RK", "PLACEMENT", "U_GIVEN", "ACT", "HAS_BD", "HAS_BU", "HAS_NW", "PRECISION"],
    prune_configs_by={"early_config_prune": _pruner(_FWD_CONFIGS)},
)(_rms_site_fwd_kernel)


def rms_site_forward(h, r, w_down, b_down, w_up, b_up, norm_weight, placement, eps, activation, scaling):
    """The site over 2-D h, r [N, d]: (y, y_normed, z, rstd) as the op defines them."""
    import torch

    n, d = h.shape
    rk = w_down.shape[0]
    h, r = _tile_addressable(h), _tile_addressable(r)
    f32, dev = torch.float32, h.device
    y, y_normed = torch.empty((n, d), dtype=h.dtype, device=dev), torch.empty((n, d), dtype=h.dtype, device=dev)
    z, rstd = torch.empty((n, rk), dtype=f32, device=dev), torch.empty(n, dtype=f32, device=dev)
    if n == 0:
        return y, y_normed, z, rstd
    u = (h + r).contiguous() if ROUND_IN_TORCH and placement == "pfeiffer" and h.dtype == torch.bfloat16 else None
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),)  # noqa: E731
    _fwd[grid](
        h, r, u if u is not None else h, w_down, b_down if b_down is not None else w_down, w_up,
        b_up if b_up is not None else w_up, norm_weight if norm_weight is not None else h, y, y_normed, z, rstd,
        n, d, rk, float(scaling), float(eps),
        h.stride(0), h.stride(1), r.stride(0), r.stride(1),
        w_down.stride(0), w_down.stride(1), w_up.stride(0), w_up.stride(1),
        PLACEMENT=PLACEMENT_IDS[placement], U_GIVEN=u is not None, ACT=ACT_IDS[activation], HAS_BD=b_down is not None,
        HAS_BU=b_up is not None, HAS_NW=norm_weight is not None, PRECISION=_precision(h.dtype), UPCAST=_upcast(h.dtype),
        BLOCK_R=block_r(rk),
    )  # fmt: skip
    return y, y_normed, z, rstd


def rms_backward(dy, dn, y, rstd, norm_weight, need_dnw, programs_max=None):
    """(dv in y's dtype, the norm weight's gradient (fp32) or None); dy may be None."""
    import torch

    n, d = y.shape
    dev, f32 = y.device, torch.float32
    if n == 0:
        return torch.empty((0, d), dtype=y.dtype, device=dev), (torch.zeros(d, dtype=f32, device=dev) if need_dnw else None)
    if programs_max is None and dev.type == "cuda":
        programs_max = torch.cuda.get_device_properties(dev).multi_processor_count
    rows = rows_per_program(n, 1, need_dnw, programs_max)
    programs = triton.cdiv(n, rows)
    truncating = ROUND_IN_TORCH and y.dtype == torch.bfloat16
    dv = torch.empty((n, d), dtype=f32 if truncating else y.dtype, device=dev)
    dnw_p = torch.empty((programs, d), dtype=f32, device=dev) if need_dnw else rstd
    dn = _tile_addressable(dn.to(y.dtype))
    dy = None if dy is None else _tile_addressable(dy.to(y.dtype))
    bm, bk, w, s = _BWD_CONFIG if not INTERPRET else (16, 32, 4, 2)
    _rms_bwd_kernel[(programs,)](
        dy if dy is not None else dn, dn, y, rstd, norm_weight if norm_weight is not None else y, dv, dnw_p,
        n, d, rows,
        (dy if dy is not None else dn).stride(0), (dy if dy is not None else dn).stride(1), dn.stride(0), dn.stride(1),
        HAS_DY=dy is not None, HAS_NW=norm_weight is not None, NEED_DNW=need_dnw, BLOCK_M=bm, BLOCK_K=bk, num_warps=w,
        num_stages=s,
    )  # fmt: skip
    return dv.to(y.dtype), (dnw_p.sum(0) if need_dnw else None)


def rms_site_backward(dy, dn, u, y, z, rstd, w_down, b_down, w_up, b_up, norm_weight, activation, scaling, needs,
                      programs_max=None):  # fmt: skip
    """(dv, du, dw_down, db_down, dw_up, db_up, dnorm_weight) for the adapter's input u, with
    du = dv + the adapter's own input gradient; dy or dn may be None (that output did not
    reach the loss); None where ``needs`` (du, dw_down, db_down, dw_up, db_up, dnorm_weight)
    does not ask."""
    import torch

    need_du, need_dwd, need_dbd, need_dwu, need_dbu, need_dnw = (bool(v) for v in needs)
    y = _tile_addressable(y)
    if dn is None:
        dv, dnw = dy.to(y.dtype).clone(), (torch.zeros(y.shape[1], dtype=torch.float32, device=y.device) if need_dnw else None)
    else:
        dv, dnw = rms_backward(dy, dn, y, rstd, norm_weight, need_dnw, programs_max)
    grads = adapter_backward(dv, u, z, w_down, b_down, w_up, b_up, activation, scaling, True,
                             (need_du, need_dwd, need_dbd, need_dwu, need_dbu), programs_max)  # fmt: skip
    return (dv, *grads, dnw)


__all__ = ["rms_backward", "rms_site_backward", "rms_site_forward"]
