"""Activation names shared by every backend, and their PyTorch reference math.

Each backend implements the same canonical names; aliases are resolved here once,
before the operator is called, so backends only ever see canonical names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "tanh", "identity")
ALIASES = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "swish": "silu", "linear": "identity"}


def canonical_activation(name: str) -> str:
    """Return the canonical activation name, or raise ValueError naming the valid ones."""
    if not isinstance(name, str):
        raise TypeError(f"activation must be a string, got {type(name).__name__}")
    key = name.lower()
    key = ALIASES.get(key, key)
    if key not in ACTIVATIONS:
        valid = ", ".join(ACTIVATIONS + tuple(ALIASES))
        raise ValueError(f"unknown activation {name!r}; expected one of: {valid}")
    return key


def act(z: torch.Tensor, name: str) -> torch.Tensor:
    """act(z) for a canonical activation name, in z's dtype: the ATen op an eager model runs."""
    if name == "relu":
        return torch.relu(z)
    if name == "gelu":
        return F.gelu(z)
    if name == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if name == "silu":
        return F.silu(z)
    if name == "tanh":
        return torch.tanh(z)
    if name == "identity":
        return z
    raise ValueError(f"unknown activation {name!r}")


def act_backward(grad: torch.Tensor, z: torch.Tensor, name: str) -> torch.Tensor:
    """grad * act'(z) for a canonical activation name, by the ATen backward op that eager
    autograd runs for it, so a backend that forms this product the same way rounds it the
    same way. NaN in z passes like autograd's (relu: a NaN pre-activation keeps the gradient)."""
    aten = torch.ops.aten
    if name == "relu":
        return aten.threshold_backward(grad, z, 0)
    if name == "gelu":
        return aten.gelu_backward(grad, z, approximate="none")
    if name == "gelu_tanh":
        return aten.gelu_backward(grad, z, approximate="tanh")
    if name == "silu":
        return aten.silu_backward(grad, z)
    if name == "tanh":
        return aten.tanh_backward(grad, torch.tanh(z))
    if name == "identity":
        return grad
    raise ValueError(f"unknown activation {name!r}")
