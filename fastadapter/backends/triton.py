"""The ``triton`` backend: the fused kernels of :mod:`fastadapter.kernels.adapter`.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests
the kernels without a GPU).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional

import torch

from . import Backend, register, register_op

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_BOTTLENECK = 256  # the kernels keep [BLOCK_M, next_pow2(r)] fp32 tiles in registers


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _installed() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    return None


def status() -> Optional[str]:
    reason = _installed()
    if reason is None and not _interpret() and not torch.cuda.is_available():
        reason = "no CUDA device (TRITON_INTERPRET=1 runs the kernels on CPU tensors through the Triton interpreter)"
    return reason


def check(device: torch.device, dtype: torch.dtype, r: int) -> Optional[str]:
    reason = _installed()
    if reason is not None:
        return reason
    if device.type == "cpu" and not _interpret():
        return "CPU tensors run through Triton only under TRITON_INTERPRET=1"
    if device.type not in ("cpu", "cuda"):
        return f"Triton kernels do not run on {device.type} tensors"
    if dtype not in DTYPES:
        return f"the Triton kernels take float32, float16 or bfloat16 x, not {dtype}"
    if r > MAX_BOTTLENECK:
        return f"the Triton kernels take bottleneck sizes up to {MAX_BOTTLENECK}, got r={r}"
    return None


def _kernels():
    from ..kernels import adapter

    return adapter


def forward(*args):
    return _kernels().adapter_forward(*args)


def backward(*args):
    return _kernels().adapter_backward(*args)


register(Backend("triton", forward, backward, check=check, status=status))


def _site_kernels():
    from ..kernels import adapter_layernorm

    return adapter_layernorm


def site_forward(*args):
    """The kernels keep no v (the LayerNorm's input): the backward recomputes it from h, r
    and z, which costs FLOPs where the GPU has them to spare and saves an N x d write."""
    out, z, mean, rstd, mean_t, rstd_t = _site_kernels().site_forward(*args)
    return out, z, z.new_empty(0), mean, rstd, mean_t, rstd_t


def site_backward(dout, h, r, z, v, *rest):
    return _site_kernels().site_backward(dout, h, r, z, *rest)


register_op("adapter_layernorm", "triton", site_forward, site_backward, keeps_ln_input=False)


def _rms_site_kernels():
    from ..kernels import adapter_rmsnorm

    return adapter_rmsnorm


def rms_site_forward(*args):
    return _rms_site_kernels().rms_site_forward(*args)


def rms_site_backward(dy, dn, h, r, y, z, rstd, w_down, b_down, w_up, b_up, norm_weight, placement, eps, activation, scaling,
                      needs):  # fmt: skip
    """dv (the norm's backward, one kernel) and the adapter's backward kernel from it with
    the adapter's input u as its residual; pfeiffer's u = h + r is made again (one add)."""
    from .reference import rms_site_input, rms_site_input_grads

    need_dh, need_dr, need_dwd, need_dbd, need_dwu, need_dbu, need_dnw = needs
    need_du = {"houlsby": need_dh, "parallel": need_dr}.get(placement, need_dh or need_dr)
    dv, du, dwd, dbd, dwu, dbu, dnw = _rms_site_kernels().rms_site_backward(
        dy if dy.dim() == 2 else None, dn if dn.dim() == 2 else None, rms_site_input(h, r, placement), y, z, rstd, w_down,
        b_down, w_up, b_up, norm_weight, activation, scaling, (need_du, need_dwd, need_dbd, need_dwu, need_dbu, need_dnw),
    )  # fmt: skip
    return (*rms_site_input_grads(placement, dv, du, need_dh, need_dr), dwd, dbd, dwu, dbu, dnw)


register_op("adapter_rmsnorm", "triton", rms_site_forward, rms_site_backward)


def _mixed_kernels():
    from ..kernels import mixed_adapter

    return mixed_adapter


def mixed_forward(*args):
    """z comes back in the kernels' sorted row order (rows grouped by adapter)."""
    return _mixed_kernels().mixed_forward(*args)


def mixed_backward(*args):
    return _mixed_kernels().mixed_backward(*args)


register_op("mixed_adapter", "triton", mixed_forward, mixed_backward)
