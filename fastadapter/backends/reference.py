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
from . import Backend, register


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
