"""The reference backend: plain PyTorch, the ground truth every backend is tested against.

It spells out the numerics contract the fused kernels implement: GEMM operands in
x's dtype (fp32 weights are cast to it), products accumulated in fp32 (fp64 for
float64 x), z kept in the accumulation dtype, the activation computed there, ``a``
rounded to x's dtype before the up-projection (as an eager bf16 model would), and
``y = R + s * (a @ W_up.T + b_up)`` formed in fp32 and rounded once.
The backward uses only x and z from the forward. Activations, their derivatives and the
reductions over N (bias sums, weight-gradient GEMMs in autograd's orientation) are the
ATen ops eager autograd runs, so the reference rounds as an eager model does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..activations import act, act_backward
from . import Backend, register, register_op


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _operand(t: torch.Tensor, dtype: torch.dtype, acc: torch.dtype) -> torch.Tensor:
    """t rounded to the GEMM operand dtype, then widened to the accumulation dtype."""
    return t.to(dtype).to(acc)


def forward(x, w_down, b_down, w_up, b_up, residual, activation, scaling, residual_is_x):
    acc = accumulation_dtype(x.dtype)
    xa = x.to(acc)
    z = F.linear(xa, _operand(w_down, x.dtype, acc), None if b_down is None else b_down.to(acc))
    a = _operand(act(z, activation), x.dtype, acc)
    u = F.linear(a, _operand(w_up, x.dtype, acc), None if b_up is None else b_up.to(acc))
    y = u * scaling
    if residual_is_x:
        y = y + xa
    elif residual is not None:
        y = y + residual.to(acc)
    return y.to(x.dtype), z


def backward(dy, x, z, w_down, b_down, w_up, b_up, activation, scaling, residual_is_x, needs):
    need_dx, need_dw_down, need_db_down, need_dw_up, need_db_up = needs
    acc = z.dtype
    g = dy.to(acc)
    dx = dw_down = db_down = dw_up = db_up = None
    if need_dw_up:
        a = _operand(act(z, activation), x.dtype, acc)
        dw_up = (g.t() @ a) * scaling
    if need_db_up:
        db_up = g.sum(0) * scaling
    if need_dx or need_dw_down or need_db_down:
        dz = act_backward(g @ _operand(w_up, x.dtype, acc), z, activation) * scaling
        if need_db_down:
            db_down = dz.sum(0)
        dz = _operand(dz, x.dtype, acc)
        if need_dw_down:
            dw_down = dz.t() @ x.to(acc)
        if need_dx:
            dx = dz @ _operand(w_down, x.dtype, acc)
            if residual_is_x:
                dx = dx + g
    return dx, dw_down, db_down, dw_up, db_up


def _check(device: torch.device, dtype: torch.dtype, r: int):
    return None


register(Backend("reference", forward, backward, check=_check, status=lambda: None))


# ----------------------------------------------------------------------------- adapter_layernorm


def _straight_through(t: torch.Tensor, dtype: torch.dtype, acc: torch.dtype) -> torch.Tensor:
    """t rounded to ``dtype`` (as a GEMM operand) in value, with its gradient passed on
    unrounded: a weight's gradient keeps the weight's own precision."""
    return t + (t.to(dtype).to(acc) - t).detach()


def _layer_norm(v, weight, bias, eps):
    var, mean = torch.var_mean(v, dim=-1, unbiased=False)
    rstd = torch.rsqrt(var + eps)
    out = (v - mean[:, None]) * rstd[:, None]
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out, mean, rstd


def site_math(h, r, w_down, b_down, w_up, b_up, ln_weight, ln_bias, placement, eps, activation, scaling):
    """The site in the accumulation dtype: (out, z, v, mean, rstd, mean_t, rstd_t), differentiable;
    v is the LayerNorm's input."""
    dtype, acc = h.dtype, accumulation_dtype(h.dtype)
    ha, ra = h.to(acc), r.to(acc)
    lw = None if ln_weight is None else ln_weight.to(acc)
    lb = None if ln_bias is None else ln_bias.to(acc)
    mean_t, rstd_t = ha.new_empty(0), ha.new_empty(0)
    if placement == "pfeiffer":
        base = ha + ra
        u, mean_t, rstd_t = _layer_norm(base, lw, lb, eps)
        u = _operand(u, dtype, acc)
    else:
        base = ha + ra
        u = ha if placement == "houlsby" else ra
    z = F.linear(u, _straight_through(w_down.to(acc), dtype, acc), None if b_down is None else b_down.to(acc))
    a = _operand(act(z, activation), dtype, acc)
    f = F.linear(a, _straight_through(w_up.to(acc), dtype, acc), None if b_up is None else b_up.to(acc))
    v = base + scaling * f
    out, mean, rstd = _layer_norm(v, lw, lb, eps)
    return out.to(dtype), z, v, mean, rstd, mean_t, rstd_t


def site_forward(h, r, w_down, b_down, w_up, b_up, ln_weight, ln_bias, placement, eps, activation, scaling):
    with torch.no_grad():
        return site_math(h, r, w_down, b_down, w_up, b_up, ln_weight, ln_bias, placement, eps, activation, scaling)


def layer_norm_backward(dout, xhat, rstd, weight):
    """(dx, dweight, dbias) of out = xhat * weight + bias, xhat = (x - mean) * rstd, all in
    dout's dtype (the accumulation dtype); dweight and dbias sum over the rows."""
    g = dout if weight is None else dout * weight
    dx = rstd[:, None] * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    return dx, (dout * xhat).sum(0), dout.sum(0)


def site_backward_with(adapter_backward, dout, h, r, z, v, mean, rstd, mean_t, rstd_t, w_down, b_down, w_up, b_up,
                       ln_weight, ln_bias, placement, eps, activation, scaling, needs):  # fmt: skip
    """The site's backward from the LayerNorm's backward (here, in torch ops) and
    ``adapter_backward`` (a backend's adapter-op backward) with dy = dv and x = the adapter's
    input u; u is recomputed from h, r and the saved statistics, and v too where the
    forward did not keep it (v empty)."""
    need_dh, need_dr, need_dwd, need_dbd, need_dwu, need_dbu, need_dlw, need_dlb = needs
    dtype, acc = dout.dtype, accumulation_dtype(dout.dtype)
    lw = None if ln_weight is None else ln_weight.to(acc)
    lb = None if ln_bias is None else ln_bias.to(acc)
    if placement == "pfeiffer" or v.dim() != 2:
        base = h.to(acc) + r.to(acc)
    if placement == "pfeiffer":
        t_hat = (base - mean_t[:, None]) * rstd_t[:, None]
        u = t_hat if lw is None else t_hat * lw
        u = (u if lb is None else u + lb).to(dtype)
    else:
        u = h if placement == "houlsby" else r
    if v.dim() != 2:
        a = _operand(act(z, activation), dtype, acc)
        v = base + scaling * F.linear(a, _operand(w_up, dtype, acc), None if b_up is None else b_up.to(acc))
    v_hat = (v - mean[:, None]) * rstd[:, None]
    dv, dlw, dlb = layer_norm_backward(dout.to(acc), v_hat, rstd, lw)
    need_du = {"houlsby": need_dh, "parallel": need_dr}.get(placement, need_dh or need_dr or need_dlw or need_dlb)
    du, dwd, dbd, dwu, dbu = adapter_backward(
        dv, u, z, w_down, b_down, w_up, b_up, activation, scaling, False, (need_du, need_dwd, need_dbd, need_dwu, need_dbu)
    )
    dh = dr = None
    if placement == "houlsby":
        dh, dr = (dv + du.to(acc) if need_dh else None), dv
    elif placement == "parallel":
        dh, dr = dv, (dv + du.to(acc) if need_dr else None)
    elif need_du:
        dt, dlw1, dlb1 = layer_norm_backward(du.to(acc), t_hat, rstd_t, lw)
        dh = dv + dt
        dr = dh.clone() if need_dh and need_dr else dh  # the same gradient, not the same tensor
        dlw, dlb = dlw + dlw1, dlb + dlb1
    return (
        dh if need_dh else None, dr if need_dr else None, dwd, dbd, dwu, dbu,
        dlw if need_dlw else None, dlb if need_dlb else None,
    )  # fmt: skip


def site_backward(*args):
    return site_backward_with(backward, *args)


register_op("adapter_layernorm", "reference", site_forward, site_backward, keeps_ln_input=True)


# ----------------------------------------------------------------------------- adapter_rmsnorm


def rms_site_input(h, r, placement):
    """The adapter's input u at a decoder site: h (houlsby), r (parallel) or h + r rounded to
    h's dtype (pfeiffer, as a model adds them)."""
    if placement == "houlsby":
        return h
    if placement == "parallel":
        return r
    return (h.to(accumulation_dtype(h.dtype)) + r).to(h.dtype)


def rms_norm(y, weight, eps):
    """(y_normed, rstd) in Llama's convention: statistics of y in the accumulation dtype,
    y * rstd rounded to y's dtype, then the product with the weight rounded to it."""
    acc = accumulation_dtype(y.dtype)
    ya = y.to(acc)
    rstd = torch.rsqrt(ya.pow(2).mean(-1) + eps)
    y_hat = (ya * rstd[:, None]).to(y.dtype)
    out = y_hat if weight is None else (weight.to(acc) * y_hat.to(acc)).to(y.dtype)
    return out, rstd


def rms_site_forward_with(adapter_forward, h, r, w_down, b_down, w_up, b_up, norm_weight, placement, eps, activation,
                          scaling):  # fmt: skip
    """(y, y_normed, z, rstd): y = h + r + s * f(u) by ``adapter_forward`` (a backend's
    adapter-op forward) on operands rounded to h's dtype and widened, with h + r as its
    residual, rounded once to h's dtype; then its RMSNorm."""
    dtype, acc = h.dtype, accumulation_dtype(h.dtype)
    u = rms_site_input(h, r, placement)
    u, wd, wu = (t.to(dtype).to(acc) for t in (u, w_down, w_up))
    bd, bu = (None if t is None else t.to(acc) for t in (b_down, b_up))
    y, z = adapter_forward(u, wd, bd, wu, bu, h.to(acc) + r.to(acc), activation, scaling, False)
    y = y.to(dtype)
    y_normed, rstd = rms_norm(y, norm_weight, eps)
    return y, y_normed, z, rstd


def rms_site_forward(*args):
    return rms_site_forward_with(forward, *args)


def rms_norm_weight_grad(dn, y, rstd):
    """The norm weight's gradient: the sum over rows of dn * y_hat, y_hat = y * rstd rounded
    to y's dtype as in the forward, in rstd's dtype."""
    acc = rstd.dtype
    return (dn.to(acc) * (y.to(acc) * rstd[:, None]).to(y.dtype).to(acc)).sum(0)


def rms_norm_backward(dy, dn, y, rstd, weight, need_dweight):
    """(dv, dweight): the gradient of the stream y from both outputs, dy + RMSNorm'(dn), in
    the accumulation dtype, and the norm weight's (sum over rows of dn * y_hat, y_hat rounded
    as in the forward). dy or dn may be empty [0]."""
    acc = rstd.dtype
    if dn.dim() != 2:  # y_normed did not reach the loss
        return dy.to(acc, copy=True), (torch.zeros(y.shape[-1], dtype=acc, device=y.device) if need_dweight else None)
    g = dn.to(acc)
    y_hat = y.to(acc) * rstd[:, None]
    dweight = rms_norm_weight_grad(dn, y, rstd) if need_dweight else None
    gw = g if weight is None else g * weight.to(acc)
    dv = rstd[:, None] * (gw - y_hat * (gw * y_hat).mean(-1, keepdim=True))
    if dy.dim() == 2:
        dv = dv + dy.to(acc)
    return dv, dweight


def rms_site_backward_with(adapter_backward, dy, dn, h, r, y, z, rstd, w_down, b_down, w_up, b_up, norm_weight,
                           placement, eps, activation, scaling, needs):  # fmt: skip
    """The site's backward: dv from the RMSNorm's backward (torch ops here), then
    ``adapter_backward`` (a backend's adapter-op backward) with dy = dv, x = u and x as its
    residual, which gives dv + du for the adapter's input in one step; the other input's
    gradient is dv (both are dv + du for pfeiffer)."""
    need_dh, need_dr, need_dwd, need_dbd, need_dwu, need_dbu, need_dnw = needs
    dv, dnw = rms_norm_backward(dy, dn, y, rstd, norm_weight, need_dnw)
    u = rms_site_input(h, r, placement)
    need_du = {"houlsby": need_dh, "parallel": need_dr}.get(placement, need_dh or need_dr)
    du, dwd, dbd, dwu, dbu = adapter_backward(
        dv, u, z, w_down, b_down, w_up, b_up, activation, scaling, True,
        (need_du, need_dwd, need_dbd, need_dwu, need_dbu),
    )  # fmt: skip
    return (*rms_site_input_grads(placement, dv, du, need_dh, need_dr), dwd, dbd, dwu, dbu, dnw)


def rms_site_input_grads(placement, dv, du, need_dh, need_dr):
    """(dh, dr) from dv and du = dv + the adapter's own input gradient: du for the adapter's
    input, dv for the other (both du for pfeiffer); None where not needed."""
    if placement == "houlsby":
        dh, dr = du, dv
    elif placement == "parallel":
        dh, dr = dv, du
    else:
        dh = du
        dr = du.clone() if need_dh and need_dr else du  # the same gradient, not the same tensor
    return dh if need_dh else None, dr if need_dr else None


def rms_site_backward(*args):
    return rms_site_backward_with(backward, *args)


register_op("adapter_rmsnorm", "reference", rms_site_forward, rms_site_backward)


# ----------------------------------------------------------------------------- mixed_adapter


def _rows_of(index: torch.Tensor, a: int) -> torch.Tensor:
    return (index == a).nonzero().view(-1)


def mixed_forward(x, index, w_down, b_down, w_up, b_up, residual, activation, scaling, residual_is_x):
    """A loop over the adapters: gather each adapter's rows, run the adapter, scatter back;
    z in x's row order (zeros where index is -1)."""
    acc = accumulation_dtype(x.dtype)
    n, rk = x.shape[0], w_down.shape[1]
    base = x if residual_is_x else residual
    y = base.to(x.dtype).clone() if base is not None else torch.zeros_like(x)
    z = x.new_zeros((n, rk), dtype=acc)
    for a in range(w_down.shape[0]):
        rows = _rows_of(index, a)
        if rows.numel() == 0:
            continue
        res = None if residual is None or residual_is_x else residual.index_select(0, rows)
        ya, za = forward(x.index_select(0, rows), w_down[a], None if b_down is None else b_down[a], w_up[a],
                         None if b_up is None else b_up[a], res, activation, scaling, residual_is_x)  # fmt: skip
        y.index_copy_(0, rows, ya)
        z.index_copy_(0, rows, za)
    return y, z


def mixed_backward(dy, x, index, z, w_down, b_down, w_up, b_up, activation, scaling, residual_is_x, needs):
    need_dx, need_dwd, need_dbd, need_dwu, need_dbu = needs
    acc = z.dtype
    dx = (dy.to(acc).clone() if residual_is_x else dy.new_zeros(dy.shape, dtype=acc)) if need_dx else None
    dwd = torch.zeros(w_down.shape, dtype=acc, device=x.device) if need_dwd else None
    dbd = torch.zeros(b_down.shape, dtype=acc, device=x.device) if need_dbd else None
    dwu = torch.zeros(w_up.shape, dtype=acc, device=x.device) if need_dwu else None
    dbu = torch.zeros(b_up.shape, dtype=acc, device=x.device) if need_dbu else None
    for a in range(w_down.shape[0]):
        rows = _rows_of(index, a)
        if rows.numel() == 0:
            continue
        grads = backward(dy.index_select(0, rows), x.index_select(0, rows), z.index_select(0, rows), w_down[a],
                         None if b_down is None else b_down[a], w_up[a], None if b_up is None else b_up[a], activation,
                         scaling, residual_is_x, needs)  # fmt: skip
        if need_dx:
            dx.index_copy_(0, rows, grads[0].to(acc))
        for out, grad in zip((dwd, dbd, dwu, dbu), grads[1:]):
            if out is not None:
                out[a] = grad
    return dx, dwd, dbd, dwu, dbu


register_op("mixed_adapter", "reference", mixed_forward, mixed_backward)
