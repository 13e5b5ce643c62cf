"""Triton kernels for the mixed-adapter op (fastadapter/ops/mixed_adapter.py): row i of x
through adapter index[i], every adapter in one launch, forward and backward.

Rows are grouped by a stable sort of index, as mixture-of-experts kernels group tokens by
expert: ``perm`` lists the rows in adapter order, segment s (0 for index -1, s for
adapter s - 1) holding the sorted positions bounds[s] .. bounds[s + 1]. Each program takes
a run of sorted positions of one segment, aligned to the segment's start (a segment's
last run is short, never mixed with the next adapter's rows), finds its segment from the
bounds alone (a cumulative sum over the segments inside the kernel: no device-to-host
sync), and runs the adapter op's own block code (kernels/adapter.py: ``_fwd_rows``,
``_bwd_rows``) on rows addressed through perm. So x, dy and dx are read and written in
place, with no gather or scatter pass; z and the backward's dz are kept in sorted
order, contiguous per program. Rows of segment 0 take the residual (y = x, the residual
tensor or zeros; dx = dy or zeros) and no product.

The backward's programs each write their weight-gradient partials to their own slice,
as the adapter op's do; ``_segment_sum_kernel`` adds each adapter's slices in program
order (deterministic; an adapter no row uses gets zeros).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .adapter import (
    _BWD_CONFIGS,
    _FWD_CONFIGS,
    _NEEDS,
    ACT_IDS,
    INTERPRET,
    MAX_BLOCK_K,
    RES_NONE,
    RES_TENSOR,
    RES_X,
    _bwd_rows,
    _configs,
    _fwd_rows,
    _precision,
    _prune_bwd,
    _prune_fwd,
    _tile_addressable,
    _upcast,
    block_r,
    r_chunk,
    rows_per_program,
    run_backward_launches,
)

MAX_ADAPTERS = 4096  # the segment search holds one [A + 1] vector in registers
OFFSET32_LIMIT = 2**31  # row offsets below it are 32-bit (tests/test_mixed_adapter.py lowers it)


@triton.jit
def _segment_run(BOUNDS, S, pid, UNIT, BLOCK_S: tl.constexpr):
    """(segment, first, last): the segment of program ``pid`` and its run of sorted positions
    first .. last, where each segment s (positions BOUNDS[s] .. BOUNDS[s + 1]) takes
    cdiv(count, UNIT) programs in segment order. Past the last run: segment S, first == last."""
    s = tl.arange(0, BLOCK_S)
    lo = tl.load(BOUNDS + s, mask=s < S, other=0)
    hi = tl.load(BOUNDS + 1 + s, mask=s < S, other=0)
    runs = (hi - lo + UNIT - 1) // UNIT
    end = tl.cumsum(runs, 0)
    seg = tl.sum((end <= pid).to(tl.int32), 0)
    here = s == seg
    first = tl.sum(tl.where(here, lo + (pid - (end - runs)) * UNIT, 0), 0)
    last = tl.minimum(first + UNIT, tl.sum(tl.where(here, hi, 0), 0))
    return seg, first.to(tl.int64), last.to(tl.int64)


@triton.jit
def _rows(PERM, first, m, mask_m, OFFSET64: tl.constexpr):
    """The rows at sorted positions first + m: int32, whose offsets (row * stride) the
    launcher has checked fit 32 bits, unless OFFSET64. With 32-bit offsets an offset tile
    takes one register an element, as in the adapter op's kernels."""
    rows = tl.load(PERM + first + m, mask=mask_m, other=0)
    if OFFSET64:
        rows = rows.to(tl.int64)
    return rows


@triton.jit
def _mixed_fwd_kernel(
    X, PERM, BOUNDS, WD, BD, WU, BU, RES_PTR, Y, Z,
    S, D, R, scaling,
    stride_xm, stride_xd, stride_rm, stride_rd,
    stride_wda, stride_wdr, stride_wdd, stride_wua, stride_wud, stride_wur, stride_bda, stride_bua,
    ACT: tl.constexpr, RES: tl.constexpr, HAS_BD: tl.constexpr, HAS_BU: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, OFFSET64: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    seg, first, last = _segment_run(BOUNDS, S, tl.program_id(0), BLOCK_M, BLOCK_S)
    m = tl.arange(0, BLOCK_M)
    mask_m = m < last - first
    rows = _rows(PERM, first, m, mask_m, OFFSET64)
    z_rows = Z + first * R
    if seg == 0:  # no adapter: y = the residual, z = 0
        k = tl.arange(0, BLOCK_K)
        rr = tl.arange(0, BLOCK_R)
        tl.store(z_rows + (m[:, None] * R + rr[None, :]), tl.zeros((BLOCK_M, BLOCK_R), tl.float32),
                 mask=mask_m[:, None] & (rr < R)[None, :])  # fmt: skip
        for k0 in range(0, D, BLOCK_K):
            mask = mask_m[:, None] & (k < D - k0)[None, :]
            out = tl.zeros((BLOCK_M, BLOCK_K), Y.dtype.element_ty)
            if RES == 1:
                out = tl.load(X + k0 * stride_xd + (rows[:, None] * stride_xm + k[None, :] * stride_xd), mask=mask)
            elif RES == 2:
                out = tl.load(RES_PTR + k0 * stride_rd + (rows[:, None] * stride_rm + k[None, :] * stride_rd), mask=mask)
            tl.store(Y + k0 + (rows[:, None] * D + k[None, :]), out, mask=mask)
    elif seg < S:
        a = (seg - 1).to(tl.int64)
        _fwd_rows(
            X, rows * stride_xm, RES_PTR, rows * stride_rm, Y, rows * D, z_rows, m, mask_m,
            WD + a * stride_wda, BD + a * stride_bda, WU + a * stride_wua, BU + a * stride_bua,
            D, R, scaling, stride_xd, stride_rd, stride_wdr, stride_wdd, stride_wud, stride_wur,
            ACT, RES, HAS_BD, HAS_BU, PRECISION, UPCAST, BLOCK_R, BLOCK_M, BLOCK_K,
        )  # fmt: skip


@triton.jit
def _mixed_bwd_kernel(
    DY, X, PERM, BOUNDS, Z, WD, WU, DX, DZS, DWU_P, DWD_P, DBU_P, DBD_P,
    S, D, R, rows_per_program, scaling,
    stride_dym, stride_dyd, stride_xm, stride_xd,
    stride_wda, stride_wdr, stride_wdd, stride_wua, stride_wud, stride_wur,
    ACT: tl.constexpr, RES_X: tl.constexpr, PHASE1: tl.constexpr, PHASE2: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DWD: tl.constexpr, NEED_DBD: tl.constexpr,
    NEED_DWU: tl.constexpr, NEED_DBU: tl.constexpr, STORE_DZ: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, OFFSET64: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    seg, first, last = _segment_run(BOUNDS, S, pid, rows_per_program, BLOCK_S)
    m = tl.arange(0, BLOCK_M)
    k = tl.arange(0, BLOCK_K)
    c = tl.arange(0, R_CHUNK)
    if seg == 0:  # no adapter: dx = dy (residual x) or zeros
        if NEED_DX and PHASE2:
            for row0 in range(first, last, BLOCK_M):
                mask_m = m < last - row0
                rows = _rows(PERM, row0, m, mask_m, OFFSET64)
                for k0 in range(0, D, BLOCK_K):
                    mask = mask_m[:, None] & (k < D - k0)[None, :]
                    dx = tl.zeros((BLOCK_M, BLOCK_K), DX.dtype.element_ty)
                    if RES_X:
                        dx = tl.load(DY + k0 * stride_dyd + (rows[:, None] * stride_dym + k[None, :] * stride_dyd), mask=mask)
                    tl.store(DX + k0 + (rows[:, None] * D + k[None, :]), dx, mask=mask)
    elif seg < S:
        a = (seg - 1).to(tl.int64)
        # the program's own slices of the partial sums, as in the adapter op's backward
        dwu_slice = DWU_P + pid * R * D
        dwd_slice = DWD_P + pid * R * D
        dbu_slice = DBU_P + pid * D
        dbd_slice = DBD_P + pid * R
        for row0 in range(first, last, BLOCK_M):
            mask_m = m < last - row0
            rows = _rows(PERM, row0, m, mask_m, OFFSET64)
            _bwd_rows(
                DY, rows * stride_dym, X, rows * stride_xm, DX, rows * D, Z + row0 * R, DZS + row0 * BLOCK_R, m, mask_m,
                row0 > first, WD + a * stride_wda, WU + a * stride_wua, dwu_slice, dwd_slice, dbu_slice, dbd_slice, c, k,
                D, R, scaling, stride_dyd, stride_xd, stride_wdr, stride_wdd, stride_wud, stride_wur,
                ACT, RES_X, PHASE1, PHASE2, NEED_DX, NEED_DWD, NEED_DBD, NEED_DWU, NEED_DBU, STORE_DZ, PRECISION, UPCAST,
                BLOCK_R, R_CHUNK, BLOCK_M, BLOCK_K,
            )  # fmt: skip


@triton.jit
def _segment_sum_kernel(P, OUT, BOUNDS, S, UNIT, SIZE, BLOCK_S: tl.constexpr, BLOCK: tl.constexpr):
    """OUT[a, j] = the sum over adapter a's programs p, in order, of P[p, j] (zeros where
    the adapter has no rows); one program per adapter and BLOCK elements."""
    a = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    lo = tl.load(BOUNDS + s, mask=s < S, other=0)
    hi = tl.load(BOUNDS + 1 + s, mask=s < S, other=0)
    runs = (hi - lo + UNIT - 1) // UNIT
    end = tl.cumsum(runs, 0)
    here = s == a + 1  # adapter a is segment a + 1
    p_end = tl.sum(tl.where(here, end, 0), 0)
    p_first = p_end - tl.sum(tl.where(here, runs, 0), 0)
    j = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = j < SIZE
    acc = tl.zeros((BLOCK,), tl.float32)
    slice_ = P + p_first.to(tl.int64) * SIZE  # 64-bit base of the program's slice
    for _ in range(p_first, p_end):
        acc += tl.load(slice_ + j, mask=mask, other=0.0)
        slice_ += SIZE
    tl.store(OUT + a.to(tl.int64) * SIZE + j, acc, mask=mask)


_fwd = triton.autotune(
    configs=_configs(_FWD_CONFIGS),
    key=["D", "R", "S", "RES", "ACT", "HAS_BD", "HAS_BU", "PRECISION"],
    prune_configs_by={"early_config_prune": _prune_fwd},
)(_mixed_fwd_kernel)
_bwd = triton.autotune(
    configs=_configs(_BWD_CONFIGS),
    key=["D", "R", "S", "ACT", "RES_X", "PHASE1", "PHASE2", "STORE_DZ", "PRECISION", *_NEEDS],
    prune_configs_by={"early_config_prune": _prune_bwd},
)(_mixed_bwd_kernel)
SUM_BLOCK, SUM_WARPS = (1024, 4) if not INTERPRET else (256, 4)


def _grouping(index: torch.Tensor, adapters: int):
    """(perm, bounds): the rows in segment order (a stable sort of index: -1 first) and the
    segments' bounds in it, [A + 2] int32 (bounds[s] .. bounds[s + 1] for segment s)."""
    if adapters + 1 > MAX_ADAPTERS:
        raise ValueError(f"the triton backend's mixed kernels take up to {MAX_ADAPTERS - 1} adapters, got "
                         f"{adapters} (w_down.shape[0])")  # fmt: skip
    ordered, perm = torch.sort(index, stable=True)
    edges = torch.arange(-1, adapters + 1, device=index.device, dtype=index.dtype)
    bounds = torch.searchsorted(ordered, edges).to(torch.int32)
    return perm.to(torch.int32), bounds


def _offset64(*tensors) -> bool:
    """Whether a row's offset in one of the [N, d] tensors (row * stride plus a chunk's
    columns) can pass 2**31 elements: then the kernels compute offsets in 64 bits."""
    return any(t.shape[0] * t.stride(0) + MAX_BLOCK_K * t.stride(1) >= OFFSET32_LIMIT for t in tensors)


def _stacked(b, w):
    """b (or w, as an unused pointer), with contiguous rows."""
    return b.contiguous() if b is not None else w


def mixed_forward(x, index, w_down, b_down, w_up, b_up, residual, activation, scaling, residual_is_x):
    """Over 2-D x [N, d] and index [N]: (y [N, d] in x's dtype, z [N, r] fp32 in sorted order)."""
    n, d = x.shape
    adapters, r = w_down.shape[0], w_down.shape[1]
    y = torch.empty((n, d), dtype=x.dtype, device=x.device)
    z = torch.empty((n, r), dtype=torch.float32, device=x.device)
    if n == 0:
        return y, z
    x = _tile_addressable(x)
    residual = None if residual is None else _tile_addressable(residual)
    perm, bounds = _grouping(index, adapters)
    res_mode = RES_X if residual_is_x else (RES_TENSOR if residual is not None else RES_NONE)
    res = residual if residual is not None else x
    bd, bu = _stacked(b_down, w_down), _stacked(b_up, w_up)
    segments = adapters + 1
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]) + segments,)  # noqa: E731  (each segment's last run may be short)
    _fwd[grid](
        x, perm, bounds, w_down, bd, w_up, bu, res, y, z,
        segments, d, r, float(scaling),
        x.stride(0), x.stride(1), res.stride(0), res.stride(1),
        *w_down.stride(), *w_up.stride(), bd.stride(0), bu.stride(0),
        ACT=ACT_IDS[activation], RES=res_mode, HAS_BD=b_down is not None, HAS_BU=b_up is not None,
        PRECISION=_precision(x.dtype), UPCAST=_upcast(x.dtype), OFFSET64=_offset64(x, res, y),
        BLOCK_S=triton.next_power_of_2(segments), BLOCK_R=block_r(r),
    )  # fmt: skip
    return y, z


def _segment_sum(partials, bounds, adapters, unit):
    """[A, *partials.shape[1:]]: each adapter's program slices added in order."""
    size = partials[0].numel()
    out = torch.empty((adapters, *partials.shape[1:]), dtype=torch.float32, device=partials.device)
    _segment_sum_kernel[(adapters, triton.cdiv(size, SUM_BLOCK))](
        partials, out, bounds, adapters + 1, unit, size, BLOCK_S=triton.next_power_of_2(adapters + 1), BLOCK=SUM_BLOCK,
        num_warps=SUM_WARPS,
    )  # fmt: skip
    return out


def mixed_backward(dy, x, index, z, w_down, b_down, w_up, b_up, activation, scaling, residual_is_x, needs, programs_max=None):
    """(dx, dw_down, db_down, dw_up, db_up) from the forward's z (sorted order), None where
    not needed; weight gradients fp32, stacked [A, ...]. ``programs_max``: as for the adapter
    op's backward (it sets how many rows a program takes)."""
    need_dx, need_dwd, need_dbd, need_dwu, need_dbu = (bool(v) for v in needs)
    n, d = x.shape
    adapters, r = w_down.shape[0], w_down.shape[1]
    dev = x.device
    f32 = torch.float32
    if n == 0 or not any(needs):
        shapes = ((adapters, r, d), (adapters, r), (adapters, d, r), (adapters, d))
        zeros = [torch.zeros(s, dtype=f32, device=dev) for s in shapes]
        dx = torch.empty((n, d), dtype=x.dtype, device=dev) if need_dx else None
        return (dx, *(t if need else None for t, need in zip(zeros, (need_dwd, need_dbd, need_dwu, need_dbu))))
    if dy.dtype != x.dtype:
        dy = dy.to(x.dtype)
    dy, x = _tile_addressable(dy), _tile_addressable(x)
    perm, bounds = _grouping(index, adapters)
    segments = adapters + 1
    if programs_max is None and dev.type == "cuda":
        programs_max = torch.cuda.get_device_properties(dev).multi_processor_count
    weight_grads = need_dwd or need_dwu or need_dbu
    rows = rows_per_program(n, r, weight_grads, programs_max)
    br, rc = block_r(r), r_chunk(r, x.dtype)

    def programs(unit):  # an upper bound: each segment's last run may be short
        return triton.cdiv(n, unit) + segments

    slots = programs(rows)
    dx = torch.empty((n, d), dtype=x.dtype, device=dev) if need_dx else z
    offset64 = _offset64(dy, x, *([dx] if need_dx else []))
    dwu_p = torch.empty((slots, r, d), dtype=f32, device=dev) if need_dwu else z  # dW_up.T per program
    dwd_p = torch.empty((slots, r, d), dtype=f32, device=dev) if need_dwd else z
    dbu_p = torch.empty((slots, d), dtype=f32, device=dev) if need_dbu else z
    dbd_p = torch.empty((slots, r), dtype=f32, device=dev) if need_dbd else z

    def launch(unit, phase1, phase2, dzs, flags):
        _bwd[(programs(unit),)](
            dy, x, perm, bounds, z, w_down, w_up, dx, z if dzs is None else dzs, dwu_p, dwd_p, dbu_p, dbd_p,
            segments, d, r, unit, float(scaling),
            dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), *w_down.stride(), *w_up.stride(),
            ACT=ACT_IDS[activation], RES_X=bool(residual_is_x), PHASE1=phase1, PHASE2=phase2, **flags,
            PRECISION=_precision(x.dtype), UPCAST=_upcast(x.dtype), OFFSET64=offset64,
            BLOCK_S=triton.next_power_of_2(segments), BLOCK_R=br, R_CHUNK=rc,
        )  # fmt: skip

    # the adapter op's launch plan; a stored dz is in sorted order
    run_backward_launches(
        launch, rows, rows_per_program(n, r, False, programs_max), br == rc,
        (need_dx, need_dwd, need_dbd, need_dwu, need_dbu), lambda: torch.empty((n, br), dtype=x.dtype, device=dev),
    )  # fmt: skip
    return (
        dx if need_dx else None,
        _segment_sum(dwd_p, bounds, adapters, rows) if need_dwd else None,
        _segment_sum(dbd_p, bounds, adapters, rows) if need_dbd else None,
        (_segment_sum(dwu_p, bounds, adapters, rows) * scaling).transpose(1, 2).contiguous() if need_dwu else None,
        _segment_sum(dbu_p, bounds, adapters, rows) * scaling if need_dbu else None,
    )
