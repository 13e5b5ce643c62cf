"""The ``cpp`` backend (CPU) and the ``cuda`` backend (GPU fallback) of the extension in csrc/."""

from __future__ import annotations

from typing import Optional

import torch

from ..activations import ACTIVATIONS
from . import Backend, extension, register

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
