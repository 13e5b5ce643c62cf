"""Triton kernels for the fused adapter: a one-pass forward and a one-pass backward.

Forward, one program per block of BLOCK_M rows::

    z = x @ W_down.T + b_down      (over d in BLOCK_K chunks, fp32 accumulator [BLOCK_M, BLOCK_R])
    a = act(z)                     (fp32, then rounded to x's dtype)
    y = R + s * (a @ W_up.T + b_up)   chunk by chunk over d

x is read once from DRAM (the residual re-read of the program's own rows comes from
L2), y written once, z (fp32, N x r) stored for the backward.

Backward, one launch where the bottleneck fits one chunk of registers (r <= 64 in half
precision, r <= 32 in fp32): each program owns a contiguous range of rows and walks it in
blocks of BLOCK_M rows. Per block:
  phase 1, over d chunks: da = dy @ W_up; dW_up.T += a.T @ dy; db_up += sum(dy)
  then dz = s * da * act'(z) in registers (never stored); db_down += sum(dz)
  phase 2, over d chunks: dx = dz @ W_down (+ dy, the block's own dy chunk again, from
           L2); dW_down += dz.T @ x
Each program adds its weight-gradient sums into its own fp32 slice of a partials buffer
(read, added to and written back per chunk: the slice stays in L2), and the launcher
adds the slices in a fixed order (deterministic). dy, x and dx cross DRAM once each, z
(kept in fp32) once; the partials cost 2 * programs * d * r fp32 written and read back,
so ``rows_per_program`` gives each program enough rows to keep them within one N x d
pass. Wider bottlenecks go in chunks of R_CHUNK columns, one at a time, and in three
launches of the same kernel (phase 1 storing dz, then dx, then dW_down, each from the
stored dz): about one more pass over dy and x, where one launch would spill registers.
Gradients that are not needed are not computed: frozen weights skip every partial, an x
without grad skips dx.

Numerics follow the reference backend: GEMM operands in x's dtype, fp32
accumulation, IEEE fp32 dots unless PyTorch allows TF32. Each tile is addressed from a
64-bit base (its first row and column) with 32-bit offsets inside it, which keeps the
pointer tiles out of 64-bit registers; the launchers copy the rare strided input whose
tile would span 2**31 elements (a transposed x has column stride N).
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

# constexpr globals: the GPU compiler accepts no other module globals inside @triton.jit
INV_SQRT_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
GELU_C = tl.constexpr(0.044715)


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:  # relu; NaN passes like torch.relu
        return tl.where(z <= 0.0, 0.0, z)
    elif ACT == 1:  # gelu (erf)
        return 0.5 * z * (1.0 + tl.erf(z * INV_SQRT_2))
    elif ACT == 2:  # gelu (tanh approximation)
        inner = SQRT_2_OVER_PI * (z + GELU_C * z * z * z)
        return z * tl.sigmoid(2.0 * inner)  # 0.5 z (1 + tanh(inner)), with tanh(t) = 2 sigmoid(2t) - 1
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
        cdf = 0.5 * (1.0 + tl.erf(z * INV_SQRT_2))
        return cdf + z * tl.exp(-0.5 * z * z) * INV_SQRT_2PI
    elif ACT == 2:
        inner = SQRT_2_OVER_PI * (z + GELU_C * z * z * z)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        dinner = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * z * z)
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
def _mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation; the product accumulates into acc's registers."""
    # UPCAST works around the interpreter's wrong bf16 dot; on GPUs it is always False.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _and(mask, flag):
    """mask & flag for a scalar flag. Written as a select: triton 3.9's interpreter turns
    ``mask & flag`` into int32 data, which its masked load refuses; on a GPU both compile
    to the same and."""
    return tl.where(flag, mask, False)


@triton.jit
def _accumulate_product(ptr, a, b, mask, ADD, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """ptr[...] = (ptr[...] where ADD, else 0) + a @ b: a partial-sum tile of the program's own
    slice, the stored partial loaded as the product's accumulator."""
    acc = tl.load(ptr, mask=_and(mask, ADD), other=0.0)
    tl.store(ptr, _mma(a, b, acc, PRECISION, UPCAST), mask=mask)


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fwd_rows(
    x_rows, x_off, res_rows, res_off, y_rows, y_off, z_rows, m, mask_m, WD, BD, WU, BU,
    D, R, scaling, stride_xd, stride_rd, stride_wdr, stride_wdd, stride_wud, stride_wur,
    ACT: tl.constexpr, RES: tl.constexpr, HAS_BD: tl.constexpr, HAS_BU: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The forward of one block of rows: row i of the block is x_rows + x_off[i] (and so for
    the residual and y); z goes to z_rows, BLOCK_M contiguous rows of R."""
    rr = tl.arange(0, BLOCK_R)
    mask_r = rr < R
    k = tl.arange(0, BLOCK_K)
    dtype = x_rows.dtype.element_ty

    # z = x @ W_down.T + b_down
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    x_chunk = x_rows  # 64-bit base of the chunk, advanced BLOCK_K columns a step
    for k0 in range(0, D, BLOCK_K):
        mask_k = k < D - k0
        x = tl.load(x_chunk + (x_off[:, None] + k[None, :] * stride_xd),
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # fmt: skip
        x_chunk += BLOCK_K * stride_xd
        wd = tl.load(WD + k0 * stride_wdd + (rr[None, :] * stride_wdr + k[:, None] * stride_wdd),
                     mask=mask_r[None, :] & mask_k[:, None], other=0.0)  # fmt: skip
        acc = _mma(x, wd.to(dtype), acc, PRECISION, UPCAST)
    if HAS_BD:
        acc += tl.load(BD + rr, mask=mask_r, other=0.0).to(tl.float32)[None, :]
    tl.store(z_rows + (m[:, None] * R + rr[None, :]), acc, mask=mask_m[:, None] & mask_r[None, :])
    a = tl.where(mask_r[None, :], _act(acc, ACT), 0.0).to(dtype)

    # y = R + s * (a @ W_up.T + b_up), chunk by chunk
    x_chunk = x_rows
    r_chunk = res_rows
    for k0 in range(0, D, BLOCK_K):
        mask_k = k < D - k0
        mask = mask_m[:, None] & mask_k[None, :]
        wu = tl.load(WU + k0 * stride_wud + (k[None, :] * stride_wud + rr[:, None] * stride_wur),
                     mask=mask_r[:, None] & mask_k[None, :], other=0.0)  # fmt: skip
        u = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        if HAS_BU:
            u += tl.load(BU + k0 + k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
        u = _mma(a, wu.to(dtype), u, PRECISION, UPCAST)
        out = u * scaling
        if RES == 1:  # the block's own x again: an L2 hit
            out += tl.load(x_chunk + (x_off[:, None] + k[None, :] * stride_xd), mask=mask, other=0.0).to(tl.float32)
            x_chunk += BLOCK_K * stride_xd
        elif RES == 2:
            out += tl.load(r_chunk + (res_off[:, None] + k[None, :] * stride_rd), mask=mask, other=0.0).to(tl.float32)
            r_chunk += BLOCK_K * stride_rd
        tl.store(y_rows + k0 + (y_off[:, None] + k[None, :]), out.to(dtype), mask=mask)


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
    # 64-bit bases of the block's rows; 32-bit offsets inside a tile (the launcher copies
    # an input whose tile would span 2**31 elements)
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    m = tl.arange(0, BLOCK_M)
    _fwd_rows(
        X + row0 * stride_xm, m * stride_xm, RES_PTR + row0 * stride_rm, m * stride_rm, Y + row0 * D, m * D, Z + row0 * R,
        m, m < N - row0, WD, BD, WU, BU, D, R, scaling, stride_xd, stride_rd, stride_wdr, stride_wdd, stride_wud, stride_wur,
        ACT, RES, HAS_BD, HAS_BU, PRECISION, UPCAST, BLOCK_R, BLOCK_M, BLOCK_K,
    )  # fmt: skip


# ----------------------------------------------------------------------------- backward


@triton.jit
def _bwd_phase1_chunk(
    dy_rows, dy_off, z_rows, WU, dwu_slice, dbu_slice, dbd_slice, m, mask_m, add, j0, c, k,
    D, R, scaling, stride_dyd, stride_wud, stride_wur,
    ACT: tl.constexpr, NEED_DZ: tl.constexpr, NEED_DBD: tl.constexpr, NEED_DWU: tl.constexpr, NEED_DBU: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_CHUNK: tl.constexpr,
):  # fmt: skip
    """Phase 1 for one block of rows (row i at dy_rows + dy_off[i]; z at z_rows, BLOCK_M
    contiguous rows of R) and the bottleneck columns j0 + c, over d: da = dy @ W_up,
    dW_up.T += a.T @ dy, db_up += sum(dy) (with the first chunk); returns
    dz = s * da * act'(z) in x's dtype (zeros where not NEED_DZ), db_down += sum(dz)."""
    dtype = dy_rows.dtype.element_ty
    rr = j0 + c
    mask_r = rr < R
    mask_mr = mask_m[:, None] & mask_r[None, :]
    z_tile = z_rows + (m[:, None] * R + rr[None, :])
    if NEED_DWU:
        # a.T: the loop-invariant operand goes first, where the tensor-core layouts split it
        # across warps instead of copying it to each
        a = tl.load(z_tile, mask=mask_mr, other=0.0)
        a_t = tl.trans(tl.where(mask_mr, _act(a, ACT), 0.0).to(dtype))
    da = tl.zeros((BLOCK_M, R_CHUNK), dtype=tl.float32)
    dy_chunk = dy_rows  # 64-bit base of the chunk, advanced BLOCK_K columns a step
    for k0 in range(0, D, BLOCK_K):
        mask_k = k < D - k0
        dy = tl.load(dy_chunk + (dy_off[:, None] + k[None, :] * stride_dyd),
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # fmt: skip
        dy_chunk += BLOCK_K * stride_dyd
        if NEED_DZ:
            wu = tl.load(WU + k0 * stride_wud + (k[:, None] * stride_wud + rr[None, :] * stride_wur),
                         mask=mask_k[:, None] & mask_r[None, :], other=0.0)  # fmt: skip
            da = _mma(dy, wu.to(dtype), da, PRECISION, UPCAST)
        if NEED_DWU:
            dwu_tile = dwu_slice + k0 + (rr[:, None] * D + k[None, :])
            _accumulate_product(dwu_tile, a_t, dy, mask_r[:, None] & mask_k[None, :], add, PRECISION, UPCAST)
        if NEED_DBU:
            if j0 == 0:
                dbu_tile = dbu_slice + k0 + k
                dbu = tl.load(dbu_tile, mask=_and(mask_k, add), other=0.0) + tl.sum(dy.to(tl.float32), axis=0)
                tl.store(dbu_tile, dbu, mask=mask_k)
    dz = tl.zeros((BLOCK_M, R_CHUNK), dtype=dtype)
    if NEED_DZ:
        # z again (the block's own rows, from L1/L2) instead of holding it through the loop
        g = da * scaling * _act_grad(tl.load(z_tile, mask=mask_mr, other=0.0), ACT)
        g = tl.where(mask_mr, g, 0.0)
        if NEED_DBD:
            dbd_tile = dbd_slice + rr
            tl.store(dbd_tile, tl.load(dbd_tile, mask=_and(mask_r, add), other=0.0) + tl.sum(g, axis=0), mask=mask_r)
        dz = g.to(dtype)
    return dz


@triton.jit
def _bwd_phase2_chunk(
    dz, dz_t, dx, x, WD, dwd_slice, add, k0, rr, k, mask_k, D, R, stride_wdr, stride_wdd,
    NEED_DX: tl.constexpr, NEED_DWD: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Phase 2 for the bottleneck columns rr and the d chunk k0 + k: returns dx + dz @ W_down,
    and adds dz.T @ x to the program's dW_down partial."""
    mask_r = rr < R
    if NEED_DX:
        wd = tl.load(WD + k0 * stride_wdd + (rr[:, None] * stride_wdr + k[None, :] * stride_wdd),
                     mask=mask_r[:, None] & mask_k[None, :], other=0.0)  # fmt: skip
        dx = _mma(dz, wd.to(dz.dtype), dx, PRECISION, UPCAST)
    if NEED_DWD:
        dwd_tile = dwd_slice + k0 + (rr[:, None] * D + k[None, :])
        _accumulate_product(dwd_tile, dz_t, x, mask_r[:, None] & mask_k[None, :], add, PRECISION, UPCAST)
    return dx


@triton.jit
def _bwd_rows(
    dy_rows, dy_off, x_rows, x_off, dx_rows, dx_off, z_rows, dzs_rows, m, mask_m, add,
    WD, WU, dwu_slice, dwd_slice, dbu_slice, dbd_slice, c, k,
    D, R, scaling, stride_dyd, stride_xd, stride_wdr, stride_wdd, stride_wud, stride_wur,
    ACT: tl.constexpr, RES_X: tl.constexpr, PHASE1: tl.constexpr, PHASE2: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DWD: tl.constexpr, NEED_DBD: tl.constexpr,
    NEED_DWU: tl.constexpr, NEED_DBU: tl.constexpr, STORE_DZ: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The backward of one block of rows: row i at dy_rows + dy_off[i] (so for x and dx);
    z and the stored dz at z_rows and dzs_rows, BLOCK_M contiguous rows of R and BLOCK_R.
    ``add``: whether the block adds to the program's partial sums (False: it writes them)."""
    # PHASE1 and PHASE2 in one launch where the bottleneck fits one chunk (BLOCK_R ==
    # R_CHUNK): dz stays in registers. Wider bottlenecks go in chunks of R_CHUNK columns,
    # one chunk at a time (the tensor-core layouts give every warp whole rows of each
    # accumulator, so a chunk bounds the registers), and in separate launches: phase 1
    # stores dz to dzs_rows (rows of BLOCK_R in x's dtype), phase 2 (dx, or dW_down) reads it back.
    NEED_DZ: tl.constexpr = NEED_DBD or STORE_DZ or (PHASE2 and (NEED_DX or NEED_DWD))
    FUSED: tl.constexpr = PHASE1 and PHASE2
    tl.static_assert(not FUSED or BLOCK_R == R_CHUNK, "one launch takes one chunk of the bottleneck")
    dtype = x_rows.dtype.element_ty
    if FUSED:
        dz = _bwd_phase1_chunk(
            dy_rows, dy_off, z_rows, WU, dwu_slice, dbu_slice, dbd_slice, m, mask_m, add, 0, c, k,
            D, R, scaling, stride_dyd, stride_wud, stride_wur,
            ACT, NEED_DZ, NEED_DBD, NEED_DWU, NEED_DBU, PRECISION, UPCAST, BLOCK_M, BLOCK_K, R_CHUNK,
        )  # fmt: skip
    elif PHASE1:
        for j0 in range(0, BLOCK_R, R_CHUNK):  # a loop, not unrolled: one chunk's registers at a time
            dzj = _bwd_phase1_chunk(
                dy_rows, dy_off, z_rows, WU, dwu_slice, dbu_slice, dbd_slice, m, mask_m, add, j0, c, k,
                D, R, scaling, stride_dyd, stride_wud, stride_wur,
                ACT, NEED_DZ, NEED_DBD, NEED_DWU, NEED_DBU, PRECISION, UPCAST, BLOCK_M, BLOCK_K, R_CHUNK,
            )  # fmt: skip
            if STORE_DZ:
                mask_mr = mask_m[:, None] & (j0 + c < R)[None, :]
                tl.store(dzs_rows + (m[:, None] * BLOCK_R + (j0 + c)[None, :]), dzj, mask=mask_mr)

    # phase 2, over d: dx = dz @ W_down (+ dy), dW_down += dz.T @ x
    if PHASE2 and (NEED_DX or NEED_DWD):
        if FUSED:
            dz_t = tl.trans(dz)
        x_chunk = x_rows
        dy_chunk = dy_rows
        for k0 in range(0, D, BLOCK_K):
            mask_k = k < D - k0
            mask = mask_m[:, None] & mask_k[None, :]
            dx = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            if NEED_DX and RES_X:  # the block's own dy chunk again: an L2 hit
                dx = tl.load(dy_chunk + (dy_off[:, None] + k[None, :] * stride_dyd), mask=mask, other=0.0)
                dx = dx.to(tl.float32)
                dy_chunk += BLOCK_K * stride_dyd
            x = tl.zeros((BLOCK_M, BLOCK_K), dtype=dtype)
            if NEED_DWD:
                x = tl.load(x_chunk + (x_off[:, None] + k[None, :] * stride_xd), mask=mask, other=0.0)
                x_chunk += BLOCK_K * stride_xd
            if FUSED:
                dx = _bwd_phase2_chunk(
                    dz, dz_t, dx, x, WD, dwd_slice, add, k0, c, k, mask_k, D, R, stride_wdr, stride_wdd,
                    NEED_DX, NEED_DWD, PRECISION, UPCAST,
                )  # fmt: skip
            else:
                for j0 in range(0, BLOCK_R, R_CHUNK):  # dz of each chunk from phase 1's launch
                    mask_mr = mask_m[:, None] & (j0 + c < R)[None, :]
                    dzj = tl.load(dzs_rows + (m[:, None] * BLOCK_R + (j0 + c)[None, :]), mask=mask_mr, other=0.0)
                    dx = _bwd_phase2_chunk(
                        dzj, tl.trans(dzj), dx, x, WD, dwd_slice, add, k0, j0 + c, k, mask_k, D, R,
                        stride_wdr, stride_wdd, NEED_DX, NEED_DWD, PRECISION, UPCAST,
                    )  # fmt: skip
            if NEED_DX:
                tl.store(dx_rows + k0 + (dx_off[:, None] + k[None, :]), dx.to(dtype), mask=mask)


@triton.jit
def _adapter_bwd_kernel(
    DY, X, Z, WD, WU, DX, DZS, DWU_P, DWD_P, DBU_P, DBD_P,
    N, D, R, rows_per_program, scaling,
    stride_dym, stride_dyd, stride_xm, stride_xd,
    stride_wdr, stride_wdd, stride_wud, stride_wur,
    ACT: tl.constexpr, RES_X: tl.constexpr, PHASE1: tl.constexpr, PHASE2: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DWD: tl.constexpr, NEED_DBD: tl.constexpr,
    NEED_DWU: tl.constexpr, NEED_DBU: tl.constexpr, STORE_DZ: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, N)
    m = tl.arange(0, BLOCK_M)
    k = tl.arange(0, BLOCK_K)
    c = tl.arange(0, R_CHUNK)
    # the program's own slices of the partial sums (d * r < 2**31: 32-bit offsets inside)
    dwu_slice = DWU_P + pid * R * D  # dW_up.T, [r, d]
    dwd_slice = DWD_P + pid * R * D
    dbu_slice = DBU_P + pid * D
    dbd_slice = DBD_P + pid * R
    for row0 in range(first, last, BLOCK_M):
        # the program's first block writes its partials, later blocks add
        _bwd_rows(
            DY + row0 * stride_dym, m * stride_dym, X + row0 * stride_xm, m * stride_xm, DX + row0 * D, m * D, Z + row0 * R,
            DZS + row0 * BLOCK_R, m, m < last - row0, row0 > first, WD, WU, dwu_slice, dwd_slice, dbu_slice, dbd_slice, c, k,
            D, R, scaling, stride_dyd, stride_xd, stride_wdr, stride_wdd, stride_wud, stride_wur,
            ACT, RES_X, PHASE1, PHASE2, NEED_DX, NEED_DWD, NEED_DBD, NEED_DWU, NEED_DBU, STORE_DZ, PRECISION, UPCAST,
            BLOCK_R, R_CHUNK, BLOCK_M, BLOCK_K,
        )  # fmt: skip


# ----------------------------------------------------------------------------- configs

# Autotuning candidates (BLOCK_M, BLOCK_K, num_warps, num_stages) per kind of product
# ("half": fp16/bf16 on tensor cores; "tf32"; "ieee": fp32 on CUDA cores) and, for the
# forward, per BLOCK_R; for the backward per launch role (the one-launch "fused" kernel,
# or "phase1", "dx" and "dwd" launches where the bottleneck takes several chunks). Each
# list holds the configs that compile for sm_80 and sm_90 without a register spill, as
# tests/test_gpu_compile.py checks; the first is the one used without autotuning.
_FWD_CONFIGS = {
    ("half", 64): [(64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2)],
    ("half", 128): [(64, 64, 8, 2), (32, 64, 4, 2), (64, 128, 8, 2)],
    ("half", 256): [(64, 64, 8, 2), (32, 64, 8, 2)],
    ("tf32", 64): [(64, 64, 8, 2), (64, 64, 4, 2), (64, 128, 8, 2)],
    ("tf32", 128): [(64, 64, 8, 2)],
    ("tf32", 256): [(32, 64, 8, 2), (16, 64, 4, 2)],
    ("ieee", 64): [(32, 32, 8, 2), (32, 16, 4, 2), (64, 16, 8, 2)],
    ("ieee", 128): [(16, 32, 8, 2)],
    ("ieee", 256): [(16, 16, 8, 2), (32, 16, 8, 2)],
}
_BWD_CONFIGS = {
    ("half", "fused"): [(128, 16, 8, 2), (32, 16, 4, 2)],
    ("half", "phase1"): [(64, 16, 8, 2)],
    ("half", "dx"): [(64, 16, 8, 2)],
    ("half", "dwd"): [(32, 32, 8, 2), (32, 16, 4, 2)],
    ("tf32", "fused"): [(128, 16, 8, 2), (64, 16, 4, 2), (64, 32, 8, 2)],
    ("tf32", "phase1"): [(64, 32, 8, 2), (32, 16, 4, 2)],
    ("tf32", "dx"): [(64, 16, 4, 2), (32, 16, 4, 2)],
    ("tf32", "dwd"): [(32, 16, 4, 2)],
    ("ieee", "fused"): [(16, 16, 4, 2)],
    ("ieee", "phase1"): [(32, 32, 8, 1)],
    ("ieee", "dx"): [(32, 16, 4, 2)],
    ("ieee", "dwd"): [(32, 16, 4, 2)],
}
MAX_BLOCK_M = 128  # every BLOCK_M above divides it
MAXNREG = 255
MAX_BLOCK_K = 128  # the largest BLOCK_K


def _configs(tables):
    if INTERPRET:  # the interpreter cannot autotune: one configuration
        return [triton.Config({"BLOCK_M": 32, "BLOCK_K": 64}, num_warps=4)]
    union = dict.fromkeys(c for table in tables.values() for c in table)
    # maxnreg: without an explicit limit ptxas caps some of these kernels at 128 registers a
    # thread and spills; with it, it uses what it needs (still within the 255 of one thread)
    return [triton.Config({"BLOCK_M": m, "BLOCK_K": k}, num_warps=w, num_stages=s, maxnreg=MAXNREG) for m, k, w, s in union]


def _kind(dtype: torch.dtype, precision: str) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return "half"
    return "tf32" if precision == "tf32" else "ieee"


def _role(kwargs) -> str:
    if kwargs["PHASE1"] and kwargs["PHASE2"]:
        return "fused"
    return "phase1" if kwargs["PHASE1"] else ("dx" if kwargs["NEED_DX"] else "dwd")


def _keep(configs, wanted):
    """The configs whose (BLOCK_M, BLOCK_K, num_warps, num_stages) are in ``wanted``, in its
    order (the first alone without autotuning)."""
    by_key = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages): c for c in configs}
    kept = [by_key[w] for w in wanted if w in by_key] or configs[:1]  # the interpreter's single config
    return kept if AUTOTUNE else kept[:1]


_NEEDS = ["NEED_DX", "NEED_DWD", "NEED_DBD", "NEED_DWU", "NEED_DBU"]


def _prune_fwd(configs, named_args, **kwargs):
    kind = _kind(named_args["X"].dtype, kwargs["PRECISION"])
    return _keep(configs, _FWD_CONFIGS[(kind, max(64, kwargs["BLOCK_R"]))])


def _prune_bwd(configs, named_args, **kwargs):
    return _keep(configs, _BWD_CONFIGS[(_kind(named_args["X"].dtype, kwargs["PRECISION"]), _role(kwargs))])


_fwd = triton.autotune(
    configs=_configs(_FWD_CONFIGS),
    key=["D", "R", "RES", "ACT", "HAS_BD", "HAS_BU", "PRECISION"],
    prune_configs_by={"early_config_prune": _prune_fwd},
)(_adapter_fwd_kernel)
_bwd = triton.autotune(
    configs=_configs(_BWD_CONFIGS),
    key=["D", "R", "ACT", "RES_X", "PHASE1", "PHASE2", "STORE_DZ", "PRECISION", *_NEEDS],
    prune_configs_by={"early_config_prune": _prune_bwd},
)(_adapter_bwd_kernel)


# ----------------------------------------------------------------------------- launchers


def block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def r_chunk(r: int, dtype: torch.dtype) -> int:
    """Bottleneck columns the backward handles at a time: 64 in half precision, 32 in fp32
    (whose tiles take twice the registers)."""
    return min(block_r(r), 32 if dtype == torch.float32 else 64)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


def rows_per_program(n: int, r: int, weight_grads: bool, programs_max: Optional[int] = None) -> int:
    """Rows each backward program walks (a multiple of every BLOCK_M).

    With weight gradients, every program writes 2 * d * r fp32 partials and the launcher
    reads them back: 16 * r / rows bytes per row of d, against 3 * 2 bytes per row of d
    for dy, x and dx in half precision. 8 * block_r rows keep the partials within one
    N x d pass (and the program count below the SM count only where N is small); without
    weight gradients there are no partials and every row block is its own program.
    ``programs_max`` caps the program count."""
    rows = MAX_BLOCK_M
    if weight_grads:
        rows = max(rows, 8 * block_r(r))
    if programs_max is not None:
        rows = max(rows, triton.cdiv(n, programs_max))
    return triton.cdiv(rows, MAX_BLOCK_M) * MAX_BLOCK_M


def _tile_addressable(t: torch.Tensor) -> torch.Tensor:
    """t, or a contiguous copy where a tile's 32-bit offsets (up to MAX_BLOCK_M rows and
    MAX_BLOCK_K columns from the tile's 64-bit base) could pass 2**31 elements."""
    span = MAX_BLOCK_M * abs(t.stride(0)) + MAX_BLOCK_K * abs(t.stride(1))
    return t if span < 2**31 else t.contiguous()


def adapter_forward(x, w_down, b_down, w_up, b_up, residual, activation, scaling, residual_is_x):
    """Fused forward over 2-D x [N, d]: returns (y [N, d] in x's dtype, z [N, r] fp32)."""
    n, d = x.shape
    x = _tile_addressable(x)
    residual = None if residual is None else _tile_addressable(residual)
    r = w_down.shape[0]
    y = torch.empty((n, d), dtype=x.dtype, device=x.device)
    z = torch.empty((n, r), dtype=torch.float32, device=x.device)
    if n == 0:
        return y, z
    res_mode = RES_X if residual_is_x else (RES_TENSOR if residual is not None else RES_NONE)
    res = residual if residual is not None else x
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),)  # noqa: E731
    _fwd[grid](
        x, w_down, b_down if b_down is not None else w_down, w_up, b_up if b_up is not None else w_up, res, y, z,
        n, d, r, float(scaling),
        x.stride(0), x.stride(1), res.stride(0), res.stride(1),
        w_down.stride(0), w_down.stride(1), w_up.stride(0), w_up.stride(1),
        ACT=ACT_IDS[activation], RES=res_mode, HAS_BD=b_down is not None, HAS_BU=b_up is not None,
        PRECISION=_precision(x.dtype), UPCAST=_upcast(x.dtype), BLOCK_R=block_r(r),
    )  # fmt: skip
    return y, z


def run_backward_launches(launch, rows, rows_dx, one_pass, needs, dz_buffer):
    """The backward's launch plan, shared by the adapter and mixed-adapter ops: where the
    bottleneck fits one chunk (``one_pass``) one launch with dz in registers; else phase 1
    (bias and dW_up sums, storing dz into ``dz_buffer()``), then dx and dW_down from the
    stored dz, each its own launch. ``launch(rows, phase1, phase2, dzs, flags)`` launches
    the op's kernel with its rows per program (unit), the phases, the dz buffer (None: not
    used) and all six NEED_*/STORE_DZ flags; ``rows_dx`` is the unit of the dx launch."""
    need_dx, need_dwd, need_dbd, need_dwu, need_dbu = needs
    flags = dict(NEED_DX=False, NEED_DWD=False, NEED_DBD=False, NEED_DWU=False, NEED_DBU=False, STORE_DZ=False)
    if one_pass:
        launch(rows, True, True, None, dict(flags, NEED_DX=need_dx, NEED_DWD=need_dwd, NEED_DBD=need_dbd,
                                            NEED_DWU=need_dwu, NEED_DBU=need_dbu))  # fmt: skip
        return
    dzs = dz_buffer() if need_dx or need_dwd else None
    launch(rows, True, False, dzs, dict(flags, NEED_DBD=need_dbd, NEED_DWU=need_dwu, NEED_DBU=need_dbu,
                                        STORE_DZ=need_dx or need_dwd))  # fmt: skip
    if need_dx:
        launch(rows_dx, False, True, dzs, dict(flags, NEED_DX=True))
    if need_dwd:
        launch(rows, False, True, dzs, dict(flags, NEED_DWD=True))


def adapter_backward(dy, x, z, w_down, b_down, w_up, b_up, activation, scaling, residual_is_x, needs, programs_max=None):
    """Fused backward from dy, x and z; returns (dx, dw_down, db_down, dw_up, db_up), None where not needed.

    Weight gradients are fp32 here; the operator casts them to each weight's dtype.
    ``programs_max`` caps the number of programs (default: the GPU's SM count; none on
    the CPU, where only the interpreter runs the kernels).
    """
    need_dx, need_dwd, need_dbd, need_dwu, need_dbu = (bool(v) for v in needs)
    n, d = x.shape
    r = w_down.shape[0]
    dev = x.device
    f32 = torch.float32
    if n == 0 or not any(needs):
        zeros = [torch.zeros(s, dtype=f32, device=dev) for s in ((r, d), (r,), (d, r), (d,))]
        dx = torch.empty((n, d), dtype=x.dtype, device=dev) if need_dx else None
        return (dx, *(t if need else None for t, need in zip(zeros, (need_dwd, need_dbd, need_dwu, need_dbu))))
    if dy.dtype != x.dtype:
        dy = dy.to(x.dtype)
    dy, x = _tile_addressable(dy), _tile_addressable(x)
    if programs_max is None and dev.type == "cuda":  # one wave of programs at most
        programs_max = torch.cuda.get_device_properties(dev).multi_processor_count
    rows = rows_per_program(n, r, need_dwd or need_dwu or need_dbu, programs_max)
    programs = triton.cdiv(n, rows)
    br, rc = block_r(r), r_chunk(r, x.dtype)
    dx = torch.empty((n, d), dtype=x.dtype, device=dev) if need_dx else z
    dwu_p = torch.empty((programs, r, d), dtype=f32, device=dev) if need_dwu else z  # dW_up.T per program
    dwd_p = torch.empty((programs, r, d), dtype=f32, device=dev) if need_dwd else z
    dbu_p = torch.empty((programs, d), dtype=f32, device=dev) if need_dbu else z
    dbd_p = torch.empty((programs, r), dtype=f32, device=dev) if need_dbd else z

    def launch(grid_rows, phase1, phase2, dzs, flags):
        _bwd[(triton.cdiv(n, grid_rows),)](
            dy, x, z, w_down, w_up, dx, z if dzs is None else dzs, dwu_p, dwd_p, dbu_p, dbd_p,
            n, d, r, grid_rows, float(scaling),
            dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
            w_down.stride(0), w_down.stride(1), w_up.stride(0), w_up.stride(1),
            ACT=ACT_IDS[activation], RES_X=bool(residual_is_x), PHASE1=phase1, PHASE2=phase2, **flags,
            PRECISION=_precision(x.dtype), UPCAST=_upcast(x.dtype), BLOCK_R=br, R_CHUNK=rc,
        )  # fmt: skip

    run_backward_launches(
        launch, rows, rows_per_program(n, r, False, programs_max), br == rc,
        (need_dx, need_dwd, need_dbd, need_dwu, need_dbu), lambda: torch.empty((n, br), dtype=x.dtype, device=dev),
    )  # fmt: skip
    # the programs' partials added in a fixed order: deterministic
    return (
        dx if need_dx else None,
        dwd_p.sum(0) if need_dwd else None,
        dbd_p.sum(0) if need_dbd else None,
        (dwu_p.sum(0) * scaling).t().contiguous() if need_dwu else None,
        dbu_p.sum(0) * scaling if need_dbu else None,
    )
