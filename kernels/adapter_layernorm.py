"""Triton kernels for the adapter site: adapter + residual + LayerNorm (fastadapter/ops/adapter_layernorm.py).

Forward, one program per block of BLOCK_M rows, four sweeps over d in BLOCK_K chunks
(after the first, the block's own h and r come from L2; DRAM sees h, r and out once):
  pfeiffer only: the statistics of t = h + r (chunked Welford)
  z = u @ W_down.T + b_down   (u = h, r, or LN(t) made chunk by chunk), a = act(z)
  the statistics of v = base + s * (a @ W_up.T + b_up)  (base = h + r = t)
  out = LN(v), v made again chunk by chunk
z (fp32) and the statistics (mean and 1/std per row) are stored for the backward.

Backward: ``_site_ln_bwd_kernel`` computes the LayerNorm's input gradient dv from dout,
v (made again from h, r, z) and the statistics, with the LayerNorm's weight and bias
gradients as per-program partial sums; the adapter's backward is the adapter op's own
kernel (kernels/adapter.py) with dy = dv and x = u, its residual giving dh (houlsby) or
dr (parallel) = dv + du. For pfeiffer, ``_site_ln_rows_kernel`` makes u = LN(t) again
and the same LayerNorm-backward kernel, without the adapter term, turns du into
dt = dv + LN'(du).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .adapter import (
    ACT_IDS,
    AUTOTUNE,
    INTERPRET,
    MAX_BLOCK_M,
    MAXNREG,
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

PLACEMENT_IDS = {"houlsby": 0, "parallel": 1, "pfeiffer": 2}
# Under the interpreter, bf16 dv is stored in fp32 and rounded by torch (see _ln_backward);
# the traffic counter turns this off to count the bytes a GPU moves.
ROUND_DV_IN_TORCH = INTERPRET


@triton.jit
def _welford(mean, m2, k0, x, mask, D, BLOCK_K: tl.constexpr):
    """Merge the chunk of columns k0 .. k0 + BLOCK_K of x [BLOCK_M, BLOCK_K] into the running
    per-row (mean, m2) of the k0 columns before it (Chan's parallel update: stable where a
    row's mean is large against its spread)."""
    count = k0 * 1.0
    k_valid = tl.minimum(D - k0, BLOCK_K) * 1.0
    c_mean = tl.sum(tl.where(mask, x, 0.0), axis=1) / k_valid
    c_dev = tl.where(mask, x - c_mean[:, None], 0.0)
    c_m2 = tl.sum(c_dev * c_dev, axis=1)
    total = count + k_valid
    delta = c_mean - mean
    mean += delta * (k_valid / total)
    m2 += c_m2 + delta * delta * (count * k_valid / total)
    return mean, m2


@triton.jit
def _ln_chunk(x, mean, rstd, LNW, LNB, k0, k, mask_k, HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr):
    y = (x - mean[:, None]) * rstd[:, None]
    if HAS_LNW:
        y = y * tl.load(LNW + k0 + k, mask=mask_k, other=1.0).to(tl.float32)[None, :]
    if HAS_LNB:
        y = y + tl.load(LNB + k0 + k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _up_chunk(a, WU, BU, k0, k, rr, mask_k, mask_r, stride_wud, stride_wur, HAS_BU: tl.constexpr,
              PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """f[:, chunk] = a @ W_up[chunk].T + b_up[chunk], fp32."""
    f = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if HAS_BU:
        f += tl.load(BU + k0 + k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
    wu = tl.load(WU + k0 * stride_wud + (k[None, :] * stride_wud + rr[:, None] * stride_wur),
                 mask=mask_r[:, None] & mask_k[None, :], other=0.0)  # fmt: skip
    return _mma(a, wu.to(a.dtype), f, PRECISION, UPCAST)


@triton.jit
def _site_fwd_kernel(
    H, R, WD, BD, WU, BU, LNW, LNB, OUT, Z, MEAN, RSTD, MEAN_T, RSTD_T,
    N, D, RK, scaling, eps,
    stride_hm, stride_hd, stride_rm, stride_rd,
    stride_wdr, stride_wdd, stride_wud, stride_wur,
    PLACEMENT: tl.constexpr, ACT: tl.constexpr, HAS_BD: tl.constexpr, HAS_BU: tl.constexpr,
    HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
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

    # pfeiffer: the statistics of t = h + r
    mean_t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    rstd_t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if PLACEMENT == 2:
        m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        h_chunk, r_chunk = h_rows, r_rows
        for k0 in range(0, D, BLOCK_K):
            mask_k = k < D - k0
            mask = mask_m[:, None] & mask_k[None, :]
            t = tl.load(h_chunk + (m[:, None] * stride_hm + k[None, :] * stride_hd), mask=mask, other=0.0).to(tl.float32)
            t += tl.load(r_chunk + (m[:, None] * stride_rm + k[None, :] * stride_rd), mask=mask, other=0.0).to(tl.float32)
            h_chunk += BLOCK_K * stride_hd
            r_chunk += BLOCK_K * stride_rd
            mean_t, m2 = _welford(mean_t, m2, k0, t, mask, D, BLOCK_K)
        rstd_t = 1.0 / tl.sqrt(m2 / D + eps)
        tl.store(MEAN_T + row0 + m, mean_t, mask=mask_m)
        tl.store(RSTD_T + row0 + m, rstd_t, mask=mask_m)

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
        else:
            t = tl.load(h_chunk + (m[:, None] * stride_hm + k[None, :] * stride_hd), mask=mask, other=0.0).to(tl.float32)
            t += tl.load(r_chunk + (m[:, None] * stride_rm + k[None, :] * stride_rd), mask=mask, other=0.0).to(tl.float32)
            u = tl.where(mask, _ln_chunk(t, mean_t, rstd_t, LNW, LNB, k0, k, mask_k, HAS_LNW, HAS_LNB), 0.0).to(dtype)
        h_chunk += BLOCK_K * stride_hd
        r_chunk += BLOCK_K * stride_rd
        wd = tl.load(WD + k0 * stride_wdd + (rr[None, :] * stride_wdr + k[:, None] * stride_wdd),
                     mask=mask_r[None, :] & mask_k[:, None], other=0.0)  # fmt: skip
        acc = _mma(u, wd.to(dtype), acc, PRECISION, UPCAST)
    if HAS_BD:
        acc += tl.load(BD + rr, mask=mask_r, other=0.0).to(tl.float32)[None, :]
    tl.store(Z + row0 * RK + (m[:, None] * RK + rr[None, :]), acc, mask=mask_m[:, None] & mask_r[None, :])
    a = tl.where(mask_r[None, :], _act(acc, ACT), 0.0).to(dtype)

    # the statistics of v = base + s * f
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    h_chunk, r_chunk = h_rows, r_rows
    for k0 in range(0, D, BLOCK_K):
        mask_k = k < D - k0
        mask = mask_m[:, None] & mask_k[None, :]
        v = tl.load(h_chunk + (m[:, None] * stride_hm + k[None, :] * stride_hd), mask=mask, other=0.0).to(tl.float32)
        v += tl.load(r_chunk + (m[:, None] * stride_rm + k[None, :] * stride_rd), mask=mask, other=0.0).to(tl.float32)
        h_chunk += BLOCK_K * stride_hd
        r_chunk += BLOCK_K * stride_rd
        v += scaling * _up_chunk(a, WU, BU, k0, k, rr, mask_k, mask_r, stride_wud, stride_wur, HAS_BU, PRECISION, UPCAST,
                                 BLOCK_M, BLOCK_K)  # fmt: skip
        mean, m2 = _welford(mean, m2, k0, v, mask, D, BLOCK_K)
    rstd = 1.0 / tl.sqrt(m2 / D + eps)
    tl.store(MEAN + row0 + m, mean, mask=mask_m)
    tl.store(RSTD + row0 + m, rstd, mask=mask_m)

    # out = LN(v)
    h_chunk, r_chunk = h_rows, r_rows
    out_rows = OUT + row0 * D
    for k0 in range(0, D, BLOCK_K):
        mask_k = k < D - k0
        mask = mask_m[:, None] & mask_k[None, :]
        v = tl.load(h_chunk + (m[:, None] * stride_hm + k[None, :] * stride_hd), mask=mask, other=0.0).to(tl.float32)
        v += tl.load(r_chunk + (m[:, None] * stride_rm + k[None, :] * stride_rd), mask=mask, other=0.0).to(tl.float32)
        h_chunk += BLOCK_K * stride_hd
        r_chunk += BLOCK_K * stride_rd
        v += scaling * _up_chunk(a, WU, BU, k0, k, rr, mask_k, mask_r, stride_wud, stride_wur, HAS_BU, PRECISION, UPCAST,
                                 BLOCK_M, BLOCK_K)  # fmt: skip
        out = _ln_chunk(v, mean, rstd, LNW, LNB, k0, k, mask_k, HAS_LNW, HAS_LNB)
        tl.store(out_rows + k0 + (m[:, None] * D + k[None, :]), out.to(dtype), mask=mask)


# Launches with no product by design, {kernel: {constexpr: value}}: the LayerNorm of t for
# pfeiffer, and the LayerNorm backward without the adapter term. The GPU compile check
# asks for no tensor-core instruction in them while their TTIR has no tt.dot.
NO_PRODUCT_VARIANTS = {"_site_ln_rows_kernel": {}, "_site_ln_bwd_kernel": {"ADAPTER": False}}


@triton.jit
def _site_ln_rows_kernel(
    H, R, LNW, LNB, MEAN, RSTD, U, N, D, stride_hm, stride_hd, stride_rm, stride_rd,
    HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """u = LN(h + r) with the stored statistics (pfeiffer's adapter input, made again)."""
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    m = tl.arange(0, BLOCK_M)
    k = tl.arange(0, BLOCK_K)
    mask_m = m < N - row0
    mean = tl.load(MEAN + row0 + m, mask=mask_m, other=0.0)
    rstd = tl.load(RSTD + row0 + m, mask=mask_m, other=0.0)
    h_chunk, r_chunk = H + row0 * stride_hm, R + row0 * stride_rm
    for k0 in range(0, D, BLOCK_K):
        mask_k = k < D - k0
        mask = mask_m[:, None] & mask_k[None, :]
        t = tl.load(h_chunk + (m[:, None] * stride_hm + k[None, :] * stride_hd), mask=mask, other=0.0).to(tl.float32)
        t += tl.load(r_chunk + (m[:, None] * stride_rm + k[None, :] * stride_rd), mask=mask, other=0.0).to(tl.float32)
        h_chunk += BLOCK_K * stride_hd
        r_chunk += BLOCK_K * stride_rd
        u = _ln_chunk(t, mean, rstd, LNW, LNB, k0, k, mask_k, HAS_LNW, HAS_LNB)
        tl.store(U + row0 * D + k0 + (m[:, None] * D + k[None, :]), u.to(U.dtype.element_ty), mask=mask)


@triton.jit
def _site_ln_bwd_kernel(
    DOUT, H, R, Z, WU, BU, LNW, MEAN, RSTD, ADD, DV, DLW_P, DLB_P,
    N, D, RK, rows_per_program, scaling,
    stride_om, stride_od, stride_hm, stride_hd, stride_rm, stride_rd, stride_wud, stride_wur,
    ADAPTER: tl.constexpr, ACT: tl.constexpr, HAS_BU: tl.constexpr, HAS_LNW: tl.constexpr, HAS_ADD: tl.constexpr,
    NEED_DLW: tl.constexpr, NEED_DLB: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dv = LN'(dout) (+ ADD) for the LayerNorm of v = h + r (+ s * f(a) where ADAPTER, a from
    z), and the program's partial sums of the LayerNorm's weight and bias gradients."""
    pid = tl.program_id(0).to(tl.int64)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, N)
    m = tl.arange(0, BLOCK_M)
    k = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    mask_r = rr < RK
    dtype = H.dtype.element_ty
    dlw_slice = DLW_P + pid * D
    dlb_slice = DLB_P + pid * D

    for row0 in range(first, last, BLOCK_M):
        mask_m = m < last - row0
        add = row0 > first
        mean = tl.load(MEAN + row0 + m, mask=mask_m, other=0.0)
        rstd = tl.load(RSTD + row0 + m, mask=mask_m, other=0.0)
        a = tl.zeros((BLOCK_M, BLOCK_R), dtype=dtype)
        if ADAPTER:
            zt = tl.load(Z + row0 * RK + (m[:, None] * RK + rr[None, :]), mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            a = tl.where(mask_r[None, :], _act(zt, ACT), 0.0).to(dtype)
        # two sweeps over d: the row sums of g = dout * w and g * vhat, then dv
        sum_g = tl.zeros((BLOCK_M,), dtype=tl.float32)
        sum_gv = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for sweep in tl.static_range(2):
            h_chunk, r_chunk, o_chunk = H + row0 * stride_hm, R + row0 * stride_rm, DOUT + row0 * stride_om
            for k0 in range(0, D, BLOCK_K):
                mask_k = k < D - k0
                mask = mask_m[:, None] & mask_k[None, :]
                v = tl.load(h_chunk + (m[:, None] * stride_hm + k[None, :] * stride_hd), mask=mask, other=0.0).to(tl.float32)
                v += tl.load(r_chunk + (m[:, None] * stride_rm + k[None, :] * stride_rd), mask=mask, other=0.0).to(tl.float32)
                dout = tl.load(o_chunk + (m[:, None] * stride_om + k[None, :] * stride_od), mask=mask, other=0.0)
                dout = dout.to(tl.float32)
                h_chunk += BLOCK_K * stride_hd
                r_chunk += BLOCK_K * stride_rd
                o_chunk += BLOCK_K * stride_od
                if ADAPTER:
                    v += scaling * _up_chunk(a, WU, BU, k0, k, rr, mask_k, mask_r, stride_wud, stride_wur, HAS_BU, PRECISION,
                                             UPCAST, BLOCK_M, BLOCK_K)  # fmt: skip
                vhat = tl.where(mask, (v - mean[:, None]) * rstd[:, None], 0.0)
                g = dout
                if HAS_LNW:
                    g = g * tl.load(LNW + k0 + k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
                if sweep == 0:
                    sum_g += tl.sum(g, axis=1)
                    sum_gv += tl.sum(g * vhat, axis=1)
                    if NEED_DLW:
                        tile = dlw_slice + k0 + k
                        partial = tl.load(tile, mask=_and(mask_k, add), other=0.0)
                        tl.store(tile, partial + tl.sum(dout * vhat, axis=0), mask=mask_k)
                    if NEED_DLB:
                        tile = dlb_slice + k0 + k
                        tl.store(tile, tl.load(tile, mask=_and(mask_k, add), other=0.0) + tl.sum(dout, axis=0), mask=mask_k)
                else:
                    dv = rstd[:, None] * (g - (sum_g / D)[:, None] - vhat * (sum_gv / D)[:, None])
                    if HAS_ADD:
                        dv += tl.load(ADD + row0 * D + k0 + (m[:, None] * D + k[None, :]), mask=mask, other=0.0).to(tl.float32)
                    tl.store(DV + row0 * D + k0 + (m[:, None] * D + k[None, :]), dv.to(DV.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- configs and launchers

_FWD_CONFIGS = {  # (BLOCK_M, BLOCK_K, num_warps, num_stages) per kind and BLOCK_R: spill-free on sm_80 and sm_90
    ("half", 64): [(32, 64, 8, 2), (64, 32, 8, 2)],
    ("half", 128): [(32, 64, 8, 2), (64, 32, 8, 2)],
    ("half", 256): [(16, 64, 4, 2)],
    ("tf32", 64): [(16, 32, 4, 2)],
    ("tf32", 128): [(32, 32, 8, 2)],
    ("tf32", 256): [(16, 32, 4, 2)],
    ("ieee", 64): [(16, 32, 4, 2), (32, 16, 4, 2)],
    ("ieee", 128): [(16, 16, 4, 2)],
    ("ieee", 256): [(16, 16, 4, 2)],
}
_LN_BWD_CONFIGS = {
    ("half", 64): [(64, 32, 8, 2), (32, 32, 4, 2)],
    ("half", 128): [(64, 32, 8, 2)],
    ("half", 256): [(64, 32, 8, 2)],
    ("tf32", 64): [(32, 32, 8, 2), (16, 32, 4, 2)],
    ("tf32", 128): [(16, 32, 4, 2)],
    ("tf32", 256): [(32, 32, 8, 2)],
    ("ieee", 64): [(32, 16, 4, 2)],
    ("ieee", 128): [(32, 16, 4, 2)],
    ("ieee", 256): [(16, 16, 4, 2)],
}
_ROWS_CONFIG = (32, 64, 4, 2)


def _configs(tables):
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 32}, num_warps=4)]
    union = dict.fromkeys(c for table in tables.values() for c in table)
    return [triton.Config({"BLOCK_M": m, "BLOCK_K": kk}, num_warps=w, num_stages=s, maxnreg=MAXNREG) for m, kk, w, s in union]


def _kind(dtype, precision: str) -> str:
    import torch

    if dtype in (torch.float16, torch.bfloat16):
        return "half"
    return "tf32" if precision == "tf32" else "ieee"


def _pruner(tables):
    def prune(configs, named_args, **kwargs):
        kind = _kind(named_args["H"].dtype, kwargs["PRECISION"])
        wanted = tables[(kind, max(64, kwargs["BLOCK_R"]))]
        by_key = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages): c for c in configs}
        kept = [by_key[w] for w in wanted if w in by_key] or configs[:1]
        return kept if AUTOTUNE else kept[:1]

    return prune


_fwd = triton.autotune(
    configs=_configs(_FWD_CONFIGS),
    key=["D", "RK", "PLACEMENT", "ACT", "HAS_BD", "HAS_BU", "HAS_LNW", "HAS_LNB", "PRECISION"],
    prune_configs_by={"early_config_prune": _pruner(_FWD_CONFIGS)},
)(_site_fwd_kernel)
_ln_bwd = triton.autotune(
    configs=_configs(_LN_BWD_CONFIGS),
    key=["D", "RK", "ADAPTER", "ACT", "HAS_BU", "HAS_LNW", "HAS_ADD", "NEED_DLW", "NEED_DLB", "PRECISION"],
    prune_configs_by={"early_config_prune": _pruner(_LN_BWD_CONFIGS)},
)(_site_ln_bwd_kernel)


def site_forward(h, r, w_down, b_down, w_up, b_up, ln_weight, ln_bias, placement, eps, activation, scaling):
    """The site over 2-D h, r [N, d]: (out, z, mean, rstd, mean_t, rstd_t) as the op defines them."""
    import torch

    n, d = h.shape
    rk = w_down.shape[0]
    h, r = _tile_addressable(h), _tile_addressable(r)
    f32, dev = torch.float32, h.device
    out = torch.empty((n, d), dtype=h.dtype, device=dev)
    z = torch.empty((n, rk), dtype=f32, device=dev)
    mean, rstd = torch.empty(n, dtype=f32, device=dev), torch.empty(n, dtype=f32, device=dev)
    m_t = n if placement == "pfeiffer" else 0
    mean_t, rstd_t = torch.empty(m_t, dtype=f32, device=dev), torch.empty(m_t, dtype=f32, device=dev)
    if n == 0:
        return out, z, mean, rstd, mean_t, rstd_t
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),)  # noqa: E731
    _fwd[grid](
        h, r, w_down, b_down if b_down is not None else w_down, w_up, b_up if b_up is not None else w_up,
        ln_weight if ln_weight is not None else h, ln_bias if ln_bias is not None else h,
        out, z, mean, rstd, mean_t if m_t else mean, rstd_t if m_t else rstd,
        n, d, rk, float(scaling), float(eps),
        h.stride(0), h.stride(1), r.stride(0), r.stride(1),
        w_down.stride(0), w_down.stride(1), w_up.stride(0), w_up.stride(1),
        PLACEMENT=PLACEMENT_IDS[placement], ACT=ACT_IDS[activation], HAS_BD=b_down is not None, HAS_BU=b_up is not None,
        HAS_LNW=ln_weight is not None, HAS_LNB=ln_bias is not None, PRECISION=_precision(h.dtype), UPCAST=_upcast(h.dtype),
        BLOCK_R=block_r(rk),
    )  # fmt: skip
    return out, z, mean, rstd, mean_t, rstd_t


def _ln_backward(dout, h, r, z, w_up, b_up, ln_weight, mean, rstd, add, activation, scaling, need_dlw, need_dlb, adapter,
                 programs_max):  # fmt: skip
    """(dv in h's dtype, dln_weight partial sum or None, dln_bias or None)."""
    import torch

    n, d = h.shape
    rk = w_up.shape[1]
    dev, f32 = h.device, torch.float32
    rows = rows_per_program(n, 1, need_dlw or need_dlb, programs_max)
    programs = triton.cdiv(n, rows)
    # the interpreter truncates fp32 -> bf16 casts where a GPU rounds to nearest: under it, dv
    # (the adapter backward's dy, and part of dh) is stored in fp32 and rounded by torch
    truncating = ROUND_DV_IN_TORCH and h.dtype == torch.bfloat16
    dv = torch.empty((n, d), dtype=f32 if truncating else h.dtype, device=dev)
    dlw_p = torch.empty((programs, d), dtype=f32, device=dev) if need_dlw else mean
    dlb_p = torch.empty((programs, d), dtype=f32, device=dev) if need_dlb else mean
    dout = _tile_addressable(dout)
    _ln_bwd[(programs,)](
        dout, h, r, z, w_up, b_up if b_up is not None else w_up, ln_weight if ln_weight is not None else h,
        mean, rstd, add if add is not None else dv, dv, dlw_p, dlb_p,
        n, d, rk, rows, float(scaling),
        dout.stride(0), dout.stride(1), h.stride(0), h.stride(1), r.stride(0), r.stride(1), w_up.stride(0), w_up.stride(1),
        ADAPTER=adapter, ACT=ACT_IDS[activation], HAS_BU=b_up is not None, HAS_LNW=ln_weight is not None,
        HAS_ADD=add is not None, NEED_DLW=need_dlw, NEED_DLB=need_dlb, PRECISION=_precision(h.dtype),
        UPCAST=_upcast(h.dtype), BLOCK_R=block_r(rk),
    )  # fmt: skip
    return dv.to(h.dtype), (dlw_p.sum(0) if need_dlw else None), (dlb_p.sum(0) if need_dlb else None)


def site_backward(dout, h, r, z, mean, rstd, mean_t, rstd_t, w_down, b_down, w_up, b_up, ln_weight, ln_bias, placement, eps,
                  activation, scaling, needs, programs_max=None):  # fmt: skip
    """(dh, dr, dw_down, db_down, dw_up, db_up, dln_weight, dln_bias), None where not needed."""
    import torch

    need_dh, need_dr, need_dwd, need_dbd, need_dwu, need_dbu, need_dlw, need_dlb = (bool(v) for v in needs)
    n, d = h.shape
    dev = h.device
    if n == 0:
        zeros = {i: torch.zeros_like(t, dtype=torch.float32) for i, t in enumerate((h, r, w_down, b_down, w_up, b_up,
                 ln_weight, ln_bias)) if t is not None}  # fmt: skip
        return tuple(zeros.get(i) if need else None for i, need in enumerate(needs))
    if programs_max is None and dev.type == "cuda":
        programs_max = torch.cuda.get_device_properties(dev).multi_processor_count
    h, r = _tile_addressable(h), _tile_addressable(r)
    dout = dout.to(h.dtype)
    dv, dlw, dlb = _ln_backward(dout, h, r, z, w_up, b_up, ln_weight, mean, rstd, None, activation, scaling, need_dlw, need_dlb,
                                True, programs_max)  # fmt: skip
    if placement == "pfeiffer":
        u = torch.empty((n, d), dtype=h.dtype, device=dev)
        bm, bk, w, s = _ROWS_CONFIG if not INTERPRET else (16, 32, 4, 2)
        _site_ln_rows_kernel[(triton.cdiv(n, bm),)](
            h, r, ln_weight if ln_weight is not None else h, ln_bias if ln_bias is not None else h, mean_t, rstd_t, u, n, d,
            h.stride(0), h.stride(1), r.stride(0), r.stride(1), HAS_LNW=ln_weight is not None, HAS_LNB=ln_bias is not None,
            BLOCK_M=bm, BLOCK_K=bk, num_warps=w, num_stages=s,
        )  # fmt: skip
        need_du = need_dh or need_dr or need_dlw or need_dlb
        du, dwd, dbd, dwu, dbu = adapter_backward(
            dv, u, z, w_down, b_down, w_up, b_up, activation, scaling, False, (need_du, need_dwd, need_dbd, need_dwu, need_dbu),
            programs_max,
        )  # fmt: skip
        dh = dr = None
        if need_du:
            dt, dlw1, dlb1 = _ln_backward(du, h, r, z, w_up, b_up, ln_weight, mean_t, rstd_t, dv, activation, scaling,
                                          need_dlw, need_dlb, False, programs_max)  # fmt: skip
            dh, dr = dt, (dt.clone() if need_dh and need_dr else dt)
            dlw = None if dlw is None else dlw + dlw1
            dlb = None if dlb is None else dlb + dlb1
    else:
        # houlsby: dh = dv + du (the adapter's residual), dr = dv; parallel the other way round
        u = h if placement == "houlsby" else r
        need_dx = need_dh if placement == "houlsby" else need_dr
        dx, dwd, dbd, dwu, dbu = adapter_backward(
            dv, u, z, w_down, b_down, w_up, b_up, activation, scaling, True, (need_dx, need_dwd, need_dbd, need_dwu, need_dbu),
            programs_max,
        )  # fmt: skip
        dh, dr = (dx, dv) if placement == "houlsby" else (dv, dx)
    return (
        dh if need_dh else None, dr if need_dr else None, dwd, dbd, dwu, dbu,
        dlw if need_dlw else None, dlb if need_dlb else None,
    )  # fmt: skip


__all__ = ["MAX_BLOCK_M", "site_backward", "site_forward"]
