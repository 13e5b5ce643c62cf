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


def _cpu_site_forward(h, r, w_down, b_down, w_up, b_up, ln_weight, ln_bias, placement, eps, activation, scaling):
    """v = base + s * f(u) by the cpp adapter kernels with base as their residual (v kept in
    fp32), then ATen's fused LayerNorm for out and the statistics."""
    from .reference import accumulation_dtype, site_forward

    dtype, acc = h.dtype, accumulation_dtype(h.dtype)
    if acc != torch.float32:  # float64: the reference composition
        return site_forward(h, r, w_down, b_down, w_up, b_up, ln_weight, ln_bias, placement, eps, activation, scaling)
    d = h.shape[1]
    base = h.to(acc) + r.to(acc) if dtype != acc else h + r
    mean_t, rstd_t = base.new_empty(0), base.new_empty(0)
    lw = None if ln_weight is None else ln_weight.to(acc)
    lb = None if ln_bias is None else ln_bias.to(acc)
    if placement == "pfeiffer":
        u, mean_t, rstd_t = torch.native_layer_norm(base, (d,), lw, lb, eps)
        mean_t, rstd_t = mean_t.view(-1), rstd_t.view(-1)
        u = u.to(dtype)
    else:
        u = h if placement == "houlsby" else r
    # operands rounded to h's dtype and widened: the kernels then run in fp32 and return v in fp32
    ops = [None if t is None else t.to(dtype).to(acc) for t in (u, w_down, w_up)]
    fwd = _forward("cpu")
    v, z = fwd(ops[0], ops[1], None if b_down is None else b_down.to(acc), ops[2], None if b_up is None else b_up.to(acc), base,
               activation, scaling, False)  # fmt: skip
    out, mean, rstd = torch.native_layer_norm(v, (d,), lw, lb, eps)
    return out.to(dtype), z, mean.view(-1), rstd.view(-1), mean_t, rstd_t


def _cpu_site_backward(*args):
    from .reference import site_backward_with

    return site_backward_with(_backward("cpu"), *args)


register_op("adapter_layernorm", "cpp", _cpu_site_forward, _cpu_site_backward)


def _reference_site_forward(*args):
    from .reference import site_forward

    return site_forward(*args)


def _reference_site_backward(*args):
    from .reference import site_backward

    return site_backward(*args)


register_op(
    "adapter_layernorm", "cuda", _reference_site_forward, _reference_site_backward,
    composition="the reference composition in PyTorch ops (no fused CUDA kernel for the adapter + LayerNorm site)",
)  # fmt: skip
