"""The ``cpp`` backend (CPU) and the ``cuda`` backend (GPU fallback) of the extension in csrc/."""

from __future__ import annotations

from typing import Optional

import torch

from ..activations import ACTIVATIONS
from . import Backend, extension, register, register_op

ACT_INDEX = {name: i for i, name in enumerate(ACTIVATIONS)}
CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CUDA_MAX_BOTTLENECK = 256


def _module():
    module, reason = extension.load()
    if module is None:
        raise RuntimeError(reason)
    return module


# --------------------------------------------------------------------------- cpp


def cpp_status() -> Optional[str]:
    return extension.load()[1]


def cpp_check(device: torch.device, dtype: torch.dtype, r: int) -> Optional[str]:
    if device.type != "cpu":
        return f"the cpp backend runs on CPU tensors, not {device.type}"
    if dtype not in CPU_DTYPES:
        return f"the cpp backend takes float32, float16, bfloat16 or float64 x, not {dtype}"
    return cpp_status()


def _forward(suffix):
    def forward(x, w_down, b_down, w_up, b_up, residual, activation, scaling, residual_is_x):
        fn = getattr(_module(), f"adapter_forward_{suffix}")
        y, z = fn(x, w_down, b_down, w_up, b_up, residual, ACT_INDEX[activation], float(scaling), bool(residual_is_x))
        return y, z

    return forward


def _backward(suffix):
    def backward(dy, x, z, w_down, b_down, w_up, b_up, activation, scaling, residual_is_x, needs):
        fn = getattr(_module(), f"adapter_backward_{suffix}")
        args = (ACT_INDEX[activation], float(scaling), bool(residual_is_x), list(needs))
        return tuple(fn(dy, x, z, w_down, b_down, w_up, b_up, *args))

    return backward


register(Backend("cpp", _forward("cpu"), _backward("cpu"), check=cpp_check, status=cpp_status))


# --------------------------------------------------------------------------- cuda


def cuda_status() -> Optional[str]:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not extension.want_cuda():
        return "torch has no CUDA toolkit to build with (CUDA_HOME unset or FASTADAPTER_NO_CUDA_EXT=1)"
    module, reason = extension.load()
    if module is None:
        return reason
    if not module.with_cuda:
        return "the extension was built without CUDA"
    return None


def cuda_check(device: torch.device, dtype: torch.dtype, r: int) -> Optional[str]:
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, not {device.type}"
    if dtype not in CUDA_DTYPES:
        return f"the cuda backend takes float32, float16 or bfloat16 x, not {dtype}"
    if r > CUDA_MAX_BOTTLENECK:
        return f"the cuda backend takes bottleneck sizes up to {CUDA_MAX_BOTTLENECK}, got r={r}"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"the cuda backend needs sm_80 or newer, this GPU is sm_{major}x"
    return cuda_status()


register(Backend("cuda", _forward("cuda"), _backward("cuda"), check=cuda_check, status=cuda_status))


# --------------------------------------------------------------------------- adapter_layernorm on the CPU


PLACEMENT_INDEX = {"houlsby": 0, "parallel": 1, "pfeiffer": 2}


def _cpu_site_forward(h, r, w_down, b_down, w_up, b_up, ln_weight, ln_bias, placement, eps, activation, scaling):
    """fp32 with the AVX2 kernel (r >= 8): csrc/adapter_layernorm_cpu.cpp, the residual adds
    and the LayerNorm in the up-projection's epilogue. Elsewhere v = base + s * f(u) by the
    cpp adapter kernels with base as their residual, then ATen's fused LayerNorm. v (fp32)
    is kept for the backward either way."""
    from .reference import accumulation_dtype, site_forward

    dtype, acc = h.dtype, accumulation_dtype(h.dtype)
    if acc != torch.float32:  # float64: the reference composition
        return site_forward(h, r, w_down, b_down, w_up, b_up, ln_weight, ln_bias, placement, eps, activation, scaling)
    if dtype == torch.float32:
        fused = _module().adapter_layernorm_forward_cpu(
            h, r, w_down, b_down, w_up, b_up, ln_weight, ln_bias, PLACEMENT_INDEX[placement], float(eps),
            ACT_INDEX[activation], float(scaling),
        )  # fmt: skip
        if fused:
            return tuple(fused)
    d = h.shape[1]
    base = h.to(acc) + r.to(acc) if dtype != acc else h + r
    mean_t, rstd_t = base.new_empty(0), base.new_empty(0)
    lw, lb = _widened(ln_weight, acc), _widened(ln_bias, acc)
    if placement == "pfeiffer":
        u, mean_t, rstd_t = torch.native_layer_norm(base, (d,), lw, lb, eps)
        mean_t, rstd_t = mean_t.view(-1), rstd_t.view(-1)
        u = u.to(dtype)
    else:
        u = h if placement == "houlsby" else r
    # operands rounded to h's dtype and widened: the kernels then run in fp32 and return v in fp32
    ops = [None if t is None else t.to(dtype).to(acc) for t in (u, w_down, w_up)]
    fwd = _forward("cpu")
    v, z = fwd(ops[0], ops[1], _widened(b_down, acc), ops[2], _widened(b_up, acc), base, activation, scaling, False)
    out, mean, rstd = torch.native_layer_norm(v, (d,), lw, lb, eps)
    return out.to(dtype), z, v, mean.view(-1), rstd.view(-1), mean_t, rstd_t


def _widened(t, dtype):
    return None if t is None else t.to(dtype)


def _cpu_site_backward(dout, h, r, z, v, mean, rstd, mean_t, rstd_t, w_down, b_down, w_up, b_up, ln_weight, ln_bias,
                       placement, eps, activation, scaling, needs):  # fmt: skip
    """For fp32 with the AVX2 kernel and the LayerNorm frozen, one C++ call
    (csrc/adapter_layernorm_cpu.cpp): dv and db_up's per-tile sums formed tile by tile in
    the prologue of the da = dv W_up product, dz and du following in the same tiles where du
    is needed, then the rest of the adapter backward. Elsewhere the LayerNorm
    backward on the kept v (one pass of the same file where frozen, else ATen's), then the
    cpp adapter backward with dy = dv. For houlsby and parallel dv is the adapter's residual
    (dx = dv + du in one GEMM epilogue); pfeiffer's du then goes through the LayerNorm
    backward of t."""
    from .reference import accumulation_dtype, site_backward_with

    args = (dout, h, r, z, v, mean, rstd, mean_t, rstd_t, w_down, b_down, w_up, b_up, ln_weight, ln_bias, placement, eps,
            activation, scaling, needs)  # fmt: skip
    dtype, acc = dout.dtype, accumulation_dtype(dout.dtype)
    if acc != torch.float32 or v.dim() != 2:
        return site_backward_with(_backward("cpu"), *args)
    need_dh, need_dr, need_dwd, need_dbd, need_dwu, need_dbu, need_dlw, need_dlb = needs
    n, d = dout.shape
    lw, lb = _widened(ln_weight, acc), _widened(ln_bias, acc)
    mask = [True, bool(need_dlw) and lw is not None, bool(need_dlb) and lb is not None]
    frozen = not mask[1] and not mask[2]
    g = dout.to(acc)
    # the adapter's input u and whether its gradient is needed
    if placement != "pfeiffer":
        u = h if placement == "houlsby" else r
        need_du = need_dh if placement == "houlsby" else need_dr
    else:
        t = h.to(acc) + r.to(acc)
        u = torch.native_layer_norm(t, (d,), lw, lb, eps)[0].to(dtype)  # recomputed: the forward's u bit for bit
        need_du = need_dh or need_dr or need_dlw or need_dlb
    adapter_needs = [need_du, need_dwd, need_dbd, need_dwu, need_dbu]
    residual_is_x = placement != "pfeiffer"  # houlsby, parallel: du = dv + the adapter's own
    fused = None
    if frozen:
        fused = _module().adapter_layernorm_backward_cpu(
            g, u, z, v, mean, rstd, w_down, b_down, w_up, b_up, lw, ACT_INDEX[activation], float(scaling),
            residual_is_x, adapter_needs,
        )  # fmt: skip
    dlw = dlb = None
    if fused:
        dv, du, dwd, dbd, dwu, dbu = fused
    else:
        dv = _module().layernorm_backward_input_cpu(g, v, mean, rstd, lw) if frozen else None  # None: not here
        if dv is None:
            dv, dlw, dlb = torch.ops.aten.native_layer_norm_backward(g, v, [d], mean.view(n, 1), rstd.view(n, 1), lw, lb, mask)
        du, dwd, dbd, dwu, dbu = _backward("cpu")(dv, u, z, w_down, b_down, w_up, b_up, activation, scaling, residual_is_x,
                                                  tuple(adapter_needs))  # fmt: skip
    if placement != "pfeiffer":
        # houlsby: dh = dv + du (the adapter's residual), dr = dv; parallel the other way round
        dh, dr = (du, dv) if placement == "houlsby" else (dv, du)
    else:
        dh = dr = None
        if need_du:
            dt, dlw1, dlb1 = torch.ops.aten.native_layer_norm_backward(
                du.to(acc), t, [d], mean_t.view(n, 1), rstd_t.view(n, 1), lw, lb, mask
            )
            dh = dv.add_(dt)
            dr = dh.clone() if need_dh and need_dr else dh  # the same gradient, not the same tensor
            dlw = None if dlw is None else dlw + dlw1
            dlb = None if dlb is None else dlb + dlb1
    return (
        dh if need_dh else None, dr if need_dr else None, dwd, dbd, dwu, dbu,
        dlw if mask[1] else None, dlb if mask[2] else None,
    )  # fmt: skip


register_op("adapter_layernorm", "cpp", _cpu_site_forward, _cpu_site_backward, keeps_ln_input=True)


# --------------------------------------------------------------------------- adapter_rmsnorm on the CPU


def _cpu_rms_site_forward(h, r, w_down, b_down, w_up, b_up, norm_weight, placement, eps, activation, scaling):
    """fp32 with the AVX2 kernel (r >= 8): csrc/adapter_rmsnorm_cpu.cpp, the residual adds
    and the RMSNorm in the up-projection's epilogue. Elsewhere y by the cpp adapter kernels
    with h + r as their residual, then the RMSNorm in ATen ops (float64: the reference)."""
    from .reference import accumulation_dtype, rms_site_forward, rms_site_forward_with

    if accumulation_dtype(h.dtype) != torch.float32:
        return rms_site_forward(h, r, w_down, b_down, w_up, b_up, norm_weight, placement, eps, activation, scaling)
    if h.dtype == torch.float32:
        fused = _module().adapter_rmsnorm_forward_cpu(
            h, r, w_down, b_down, w_up, b_up, norm_weight, PLACEMENT_INDEX[placement], float(eps), ACT_INDEX[activation],
            float(scaling),
        )  # fmt: skip
        if fused:
            return tuple(fused)
    return rms_site_forward_with(_forward("cpu"), h, r, w_down, b_down, w_up, b_up, norm_weight, placement, eps, activation,
                                 scaling)  # fmt: skip


def _cpu_rms_site_backward(dy, dn, h, r, y, z, rstd, w_down, b_down, w_up, b_up, norm_weight, placement, eps, activation,
                           scaling, needs):  # fmt: skip
    """fp32 with the AVX2 kernel: one C++ call (csrc/adapter_rmsnorm_cpu.cpp) forms dv = dy +
    RMSNorm'(dn) tile by tile in the prologue of the da = dv W_up product and runs the
    adapter backward from it, du = dv + the adapter's own in one GEMM epilogue; the norm
    weight's gradient, where asked for, by ATen. Elsewhere dv in ATen ops, then the cpp
    adapter backward."""
    from .reference import (
        accumulation_dtype,
        rms_norm_weight_grad,
        rms_site_backward_with,
        rms_site_input,
        rms_site_input_grads,
    )

    need_dh, need_dr, need_dwd, need_dbd, need_dwu, need_dbu, need_dnw = needs
    fused = None
    if accumulation_dtype(y.dtype) == torch.float32:
        u = rms_site_input(h, r, placement)
        need_du = {"houlsby": need_dh, "parallel": need_dr}.get(placement, need_dh or need_dr)
        fused = _module().adapter_rmsnorm_backward_cpu(
            dy, dn, u, y, z, rstd, w_down, b_down, w_up, b_up, norm_weight, ACT_INDEX[activation], float(scaling),
            [need_du, need_dwd, need_dbd, need_dwu, need_dbu],
        )  # fmt: skip
    if not fused:
        return rms_site_backward_with(_backward("cpu"), dy, dn, h, r, y, z, rstd, w_down, b_down, w_up, b_up, norm_weight,
                                      placement, eps, activation, scaling, needs)  # fmt: skip
    dv, du, dwd, dbd, dwu, dbu = fused
    dnw = rms_norm_weight_grad(dn, y, rstd) if need_dnw else None
    return (*rms_site_input_grads(placement, dv, du, need_dh, need_dr), dwd, dbd, dwu, dbu, dnw)


register_op("adapter_rmsnorm", "cpp", _cpu_rms_site_forward, _cpu_rms_site_backward)


# --------------------------------------------------------------------------- mixed_adapter on the CPU


def _cpu_mixed_forward(x, index, w_down, b_down, w_up, b_up, residual, activation, scaling, residual_is_x):
    fn = _module().mixed_adapter_forward_cpu
    y, z = fn(x, index, w_down, b_down, w_up, b_up, residual, ACT_INDEX[activation], float(scaling), bool(residual_is_x))
    return y, z


def _cpu_mixed_backward(dy, x, index, z, w_down, b_down, w_up, b_up, activation, scaling, residual_is_x, needs):
    fn = _module().mixed_adapter_backward_cpu
    args = (ACT_INDEX[activation], float(scaling), bool(residual_is_x), list(needs))
    return tuple(fn(dy, x, index, z, w_down, b_down, w_up, b_up, *args))


register_op("mixed_adapter", "cpp", _cpu_mixed_forward, _cpu_mixed_backward)


def _reference_site_forward(*args):
    from .reference import site_forward

    return site_forward(*args)


def _reference_site_backward(*args):
    from .reference import site_backward

    return site_backward(*args)


def _reference_rms_site_forward(*args):
    from .reference import rms_site_forward

    return rms_site_forward(*args)


def _reference_rms_site_backward(*args):
    from .reference import rms_site_backward

    return rms_site_backward(*args)


register_op(
    "adapter_rmsnorm",
    "cuda",
    _reference_rms_site_forward,
    _reference_rms_site_backward,
    composition="the reference composition in PyTorch ops (no fused CUDA kernel for the adapter + RMSNorm site)",
)
register_op(
    "adapter_layernorm", "cuda", _reference_site_forward, _reference_site_backward,
    composition="the reference composition in PyTorch ops (no fused CUDA kernel for the adapter + LayerNorm site)",
    keeps_ln_input=True,
)  # fmt: skip
