"""Triton kernels for the fused adapter: forward, and a two-kernel backward.

Forward, one program per block of BLOCK_M rows::

    z = x @ W_down.T + b_down      (over d in BLOCK_K chunks, fp32 accumulator [BLOCK_M, BLOCK_R])
    a = act(z)                     (fp32, then rounded to x's dtype)
    y = R + s * (a @ W_up.T + b_up)   chunk by chunk over d

x is read once from DRAM (the residual re-read of the same tile is served by L2), y
written once, z (fp32, N x r) stored for the backward.

Backward (about 4 passes over N x d):
  K1 `_adapter_bwd_dz_kernel`, per row block: da = dy @ W_up (over d chunks),
     dz = s * da * act'(z), stored fp32 [N, r].
  K2 `_adapter_bwd_kernel`, grid (row groups, d chunks): for its d chunk and rows,
     dx = dz @ W_down (+ dy), and per-group partials of dW_down = dz.T x,
     dW_up = dy.T a and db_up = sum(dy); the launcher sums the partials over groups
     in a fixed order (deterministic).

Numerics follow the reference backend: GEMM operands in x's dtype, fp32
accumulation, IEEE fp32 dots unless PyTorch allows TF32. Offsets into N x d tensors
are 64-bit, row and column alike (a transposed x has column stride N).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# FASTADAPTER_AUTOTUNE=0: one configuration per kernel (tests compile many variants)
AUTOTUNE = os.environ.get("FASTADAPTER_AUTOTUNE", "1") != "0"

ACT_IDS = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3, "tanh": 4, "identity": 5}
RES_NONE, RES_X, RES_TENSOR = 0, 1, 2

_INV_SQRT_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327
_SQRT_2_OVER_PI = 0.7978845608028654
_GELU_C = 0.044715


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:  # relu; NaN passes like torch.relu
        return tl.where(z <= 0.0, 0.0, z)
    elif ACT == 1:  # gelu (erf)
        return 0.5 * z * (1.0 + tl.erf(z * _INV_SQRT_2))
    elif ACT == 2:  # gelu (tanh approximation)
        inner = _SQRT_2_OVER_PI * (z + _GELU_C * z * z * z)
        return 0.5 * z * (2.0 * tl.sigmoid(2.0 * inner))
    elif ACT == 3:  # silu
        return z * tl.sigmoid(z)
    elif ACT == 4:  # tanh
        return 2.0 * tl.sigmoid(2.0 * z) - 1.0
    else:  # identity
        return z


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    if ACT == 0:
        return tl.where(z <= 0.0, 0.0, 1.0)
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.erf(z * _INV_SQRT_2))
        return cdf + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
    elif ACT == 2:
        inner = _SQRT_2_OVER_PI * (z + _GELU_C * z * z * z)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        dinner = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_C * z * z)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * dinner
    elif ACT == 3:
        s = tl.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    elif ACT == 4:
        t = 2.0 * tl.sigmoid(2.0 * z) - 1.0
        return 1.0 - t * t
    else:
        return tl.full(z.shape, 1.0, tl.float32)


@triton.jit
def _mma(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST works around the interpreter's wrong bf16 dot; on GPUs it is always False.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _rows_times_weights(
    A, rows, mask_m, stride_am, stride_ak, W, stride_wr, stride_wk, rr, mask_r, K,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """acc[m, j] = sum over k < K of A[rows[m], k] * W(j, k), in BLOCK_K chunks, fp32.

    W(j, k) sits at W + j * stride_wr + k * stride_wk and is cast to A's dtype."""
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mask_k = kk < K
        cols = kk[None, :].to(tl.int64)
        a = tl.load(A + rows[:, None] * stride_am + cols * stride_ak, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(W + rr[None, :] * stride_wr + kk[:, None] * stride_wk, mask=mask_r[None, :] & mask_k[:, None], other=0.0)
        acc += _mma(a, w.to(a.dtype), PRECISION, UPCAST)
    return acc


def _configs(pairs):
    """Autotuning candidates (BLOCK_M, BLOCK_K, num_warps, num_stages); the first is the default."""
    if INTERPRET:  # the interpreter cannot autotune: one small configuration
        return [triton.Config({"BLOCK_M": 32, "BLOCK_K": 64}, num_warps=4)]
    if not AUTOTUNE:
        pairs = pairs[:1]
    return [triton.Config({"BLOCK_M": m, "BLOCK_K": k}, num_warps=w, num_stages=s) for m, k, w, s in pairs]


def _prune(configs, named_args, **kwargs):
    # Large bottlenecks: the [BLOCK_M, BLOCK_R] fp32 tiles must stay in registers.
    block_r = kwargs.get("BLOCK_R", named_args.get("BLOCK_R", 16))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * block_r <= 128 * 64]
    return kept or configs[:1]


_FWD_CONFIGS = _configs(
    [(64, 64, 4, 2), (64, 128, 4, 2), (128, 64, 4, 2), (128, 64, 8, 3), (32, 128, 4, 2), (64, 128, 8, 3), (32, 64, 4, 2)]
)


@triton.autotune(configs=_FWD_CONFIGS, key=["D", "BLOCK_R", "RES", "ACT"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _adapter_fwd_kernel(
    X, WD, BD, WU, BU, RES_PTR, Y, Z,
    N, D, R, scaling,
    stride_xm, stride_xd, stride_rm, stride_rd,
    stride_wdr, stride_wdd, stride_wud, stride_wur,
    ACT: tl.constexpr, RES: tl.constexpr, HAS_BD: tl.constexpr, HAS_BU: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    mask_m = rows < N
    rr = tl.arange(0, BLOCK_R)
    mask_r = rr < R
    dtype = X.dtype.element_ty

    acc = _rows_times_weights(
        X, rows, mask_m, stride_xm, stride_xd, WD, stride_wdr, stride_wdd, rr, mask_r, D,
        PRECISION, UPCAST, BLOCK_M, BLOCK_R, BLOCK_K,
    )  # fmt: skip
    if HAS_BD:
        acc += tl.load(BD + rr, mask=mask_r, other=0.0).to(tl.float32)[None, :]
    tl.store(Z + rows[:, None] * R + rr[None, :], acc, mask=mask_m[:, None] & mask_r[None, :])
    a = tl.where(mask_r[None, :], _act(acc, ACT), 0.0).to(dtype)

    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mask_k = kk < D
        mask = mask_m[:, None] & mask_k[None, :]
        wu = tl.load(WU + kk[None, :] * stride_wud + rr[:, None] * stride_wur, mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        u = _mma(a, wu.to(dtype), PRECISION, UPCAST)
        if HAS_BU:
            u += tl.load(BU + kk, mask=mask_k, other=0.0).to(tl.float32)[None, :]
        out = u * scaling
        cols = kk[None, :].to(tl.int64)
        if RES == 1:
            out += tl.load(X + rows[:, None] * stride_xm + cols * stride_xd, mask=mask, other=0.0).to(tl.float32)
        elif RES == 2:
            out += tl.load(RES_PTR + rows[:, None] * stride_rm + cols * stride_rd, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + rows[:, None] * D + kk[None, :], out.to(dtype), mask=mask)


_DZ_CONFIGS = _configs([(64, 64, 4, 2), (64, 128, 4, 2), (128, 64, 8, 2), (32, 128, 4, 2), (128, 128, 8, 3)])


@triton.autotune(configs=_DZ_CONFIGS, key=["D", "BLOCK_R", "ACT"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _adapter_bwd_dz_kernel(
    DY, Z, WU, DZ,
    N, D, R, scaling,
    stride_dym, stride_dyd, stride_wud, stride_wur,
    ACT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    mask_m = rows < N
    rr = tl.arange(0, BLOCK_R)
    mask_r = rr < R

    da = _rows_times_weights(
        DY, rows, mask_m, stride_dym, stride_dyd, WU, stride_wur, stride_wud, rr, mask_r, D,
        PRECISION, UPCAST, BLOCK_M, BLOCK_R, BLOCK_K,
    )  # fmt: skip
    mask_mr = mask_m[:, None] & mask_r[None, :]
    z = tl.load(Z + rows[:, None] * R + rr[None, :], mask=mask_mr, other=0.0)
    dz = da * scaling * _act_grad(z, ACT)
    tl.store(DZ + rows[:, None] * R + rr[None, :], dz, mask=mask_mr)


_BWD_CONFIGS = _configs([(64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (32, 64, 4, 2), (64, 128, 8, 2)])


@triton.autotune(configs=_BWD_CONFIGS, key=["D", "BLOCK_R", "ACT", "RES_X"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _adapter_bwd_kernel(
    DY, X, Z, DZ, WD, DX, DWD_P, DWU_P, DBU_P,
    N, D, R, rows_per_group,
    stride_dym, stride_dyd, stride_xm, stride_xd, stride_wdr, stride_wdd,
    ACT: tl.constexpr, RES_X: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DWD: tl.constexpr, NEED_DWU: tl.constexpr, NEED_DBU: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # grid: (row groups, d chunks); rows_per_group is a multiple of every BLOCK_M.
    pid_g = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = kk < D
    rr = tl.arange(0, BLOCK_R)
    mask_r = rr < R
    dtype = X.dtype.element_ty

    if NEED_DX:
        wd = tl.load(WD + rr[:, None] * stride_wdr + kk[None, :] * stride_wdd, mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        wd = wd.to(dtype)
    acc_dwd = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    acc_dwu = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
    acc_dbu = tl.zeros((BLOCK_K,), dtype=tl.float32)

    first = pid_g * rows_per_group
    for m0 in range(first, first + rows_per_group, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = rows < N
        mask = mask_m[:, None] & mask_k[None, :]
        mask_mr = mask_m[:, None] & mask_r[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dym + kk[None, :].to(tl.int64) * stride_dyd, mask=mask, other=0.0)
        if NEED_DX or NEED_DWD:
            dz = tl.load(DZ + rows[:, None] * R + rr[None, :], mask=mask_mr, other=0.0).to(dtype)
            if NEED_DX:
                dx = _mma(dz, wd, PRECISION, UPCAST)
                if RES_X:
                    dx += dy.to(tl.float32)
                tl.store(DX + rows[:, None] * D + kk[None, :], dx.to(dtype), mask=mask)
            if NEED_DWD:
                x = tl.load(X + rows[:, None] * stride_xm + kk[None, :].to(tl.int64) * stride_xd, mask=mask, other=0.0)
                acc_dwd += _mma(tl.trans(dz), x, PRECISION, UPCAST)
        if NEED_DWU:
            z = tl.load(Z + rows[:, None] * R + rr[None, :], mask=mask_mr, other=0.0)
            a = tl.where(mask_mr, _act(z, ACT), 0.0).to(dtype)
            acc_dwu += _mma(tl.trans(dy), a, PRECISION, UPCAST)
        if NEED_DBU:
            acc_dbu += tl.sum(dy.to(tl.float32), axis=0)

    if NEED_DWD:
        tl.store(DWD_P + pid_g * R * D + rr[:, None] * D + kk[None, :], acc_dwd, mask=mask_r[:, None] & mask_k[None, :])
    if NEED_DWU:
        tl.store(DWU_P + pid_g * D * R + kk[:, None] * R + rr[None, :], acc_dwu, mask=mask_k[:, None] & mask_r[None, :])
    if NEED_DBU:
        tl.store(DBU_P + pid_g * D + kk, acc_dbu, mask=mask_k)


# ----------------------------------------------------------------------------- launchers


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


_GROUP_ALIGN = 128  # every BLOCK_M of the backward configs divides this


def _rows_per_group(n: int, d: int, device: torch.device) -> int:
    """Rows each backward program walks: enough groups x d-chunks to fill the GPU."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        target = max(1, triton.cdiv(4 * sms, triton.cdiv(d, 64)))
    else:  # interpreter: few programs
        target = 2
    groups = max(1, min(triton.cdiv(n, _GROUP_ALIGN), target))
    return triton.cdiv(triton.cdiv(n, groups), _GROUP_ALIGN) * _GROUP_ALIGN


def adapter_forward(x, w_down, b_down, w_up, b_up, residual, activation, scaling, residual_is_x):
    """Fused forward over 2-D x [N, d]: returns (y [N, d] in x's dtype, z [N, r] fp32)."""
    n, d = x.shape
    r = w_down.shape[0]
    y = torch.empty((n, d), dtype=x.dtype, device=x.device)
    z = torch.empty((n, r), dtype=torch.float32, device=x.device)
    if n == 0:
        return y, z
    res_mode = RES_X if residual_is_x else (RES_TENSOR if residual is not None else RES_NONE)
    res = residual if residual is not None else x
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),)  # noqa: E731
    _adapter_fwd_kernel[grid](
        x, w_down, b_down if b_down is not None else w_down, w_up, b_up if b_up is not None else w_up, res, y, z,
        n, d, r, float(scaling),
        x.stride(0), x.stride(1), res.stride(0), res.stride(1),
        w_down.stride(0), w_down.stride(1), w_up.stride(0), w_up.stride(1),
        ACT=ACT_IDS[activation], RES=res_mode, HAS_BD=b_down is not None, HAS_BU=b_up is not None,
        PRECISION=_precision(x.dtype), UPCAST=_upcast(x.dtype), BLOCK_R=_block_r(r),
    )  # fmt: skip
    return y, z


def adapter_backward(dy, x, z, w_down, b_down, w_up, b_up, activation, scaling, residual_is_x, needs):
    """Fused backward from dy, x and z; returns (dx, dw_down, db_down, dw_up, db_up), None where not needed.

    Weight gradients are fp32 here; the operator casts them to each weight's dtype.
    """
    need_dx, need_dwd, need_dbd, need_dwu, need_dbu = needs
    n, d = x.shape
    r = w_down.shape[0]
    dev = x.device
    if dy.dtype != x.dtype:
        dy = dy.to(x.dtype)
    f32 = torch.float32
    block_r = _block_r(r)
    precision, upcast, act = _precision(x.dtype), _upcast(x.dtype), ACT_IDS[activation]

    dz: Optional[torch.Tensor] = None
    if (need_dx or need_dwd or need_dbd) and n > 0:
        dz = torch.empty((n, r), dtype=f32, device=dev)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),)  # noqa: E731
        _adapter_bwd_dz_kernel[grid](
            dy, z, w_up, dz, n, d, r, float(scaling),
            dy.stride(0), dy.stride(1), w_up.stride(0), w_up.stride(1),
            ACT=act, PRECISION=precision, UPCAST=upcast, BLOCK_R=block_r,
        )  # fmt: skip

    dx = torch.empty((n, d), dtype=x.dtype, device=dev) if need_dx else None
    dwd = dwu = dbu = None
    if n == 0:
        dwd = torch.zeros((r, d), dtype=f32, device=dev) if need_dwd else None
        dwu = torch.zeros((d, r), dtype=f32, device=dev) if need_dwu else None
        dbu = torch.zeros((d,), dtype=f32, device=dev) if need_dbu else None
    elif need_dx or need_dwd or need_dwu or need_dbu:
        rows_per_group = _rows_per_group(n, d, dev)
        groups = triton.cdiv(n, rows_per_group)
        dwd_p = torch.empty((groups, r, d), dtype=f32, device=dev) if need_dwd else z
        dwu_p = torch.empty((groups, d, r), dtype=f32, device=dev) if need_dwu else z
        dbu_p = torch.empty((groups, d), dtype=f32, device=dev) if need_dbu else z
        grid = lambda meta: (groups, triton.cdiv(d, meta["BLOCK_K"]))  # noqa: E731
        _adapter_bwd_kernel[grid](
            dy, x, z, dz if dz is not None else z, w_down, dx if dx is not None else z, dwd_p, dwu_p, dbu_p,
            n, d, r, rows_per_group,
            dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), w_down.stride(0), w_down.stride(1),
            ACT=act, RES_X=bool(residual_is_x), NEED_DX=bool(need_dx), NEED_DWD=bool(need_dwd),
            NEED_DWU=bool(need_dwu), NEED_DBU=bool(need_dbu), PRECISION=precision, UPCAST=upcast, BLOCK_R=block_r,
        )  # fmt: skip
        # fixed-order sums of the per-group partials: deterministic
        dwd = dwd_p.sum(0) if need_dwd else None
        dwu = dwu_p.sum(0) * scaling if need_dwu else None
        dbu = dbu_p.sum(0) * scaling if need_dbu else None
    if need_dbd:
        dbd = dz.sum(0) if dz is not None else torch.zeros(r, dtype=f32, device=dev)
    else:
        dbd = None
    return dx, dwd, dbd, dwu, dbu
