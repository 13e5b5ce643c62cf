"""Activation names shared by every backend, and their PyTorch reference math.

Each backend implements the same canonical names; aliases are resolved here once,
before the operator is called, so backends only ever see canonical names.
"""

from __future__ import annotations

import math

import torch

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "tanh", "identity")
ALIASES = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "swish": "silu", "linear": "identity"}

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_C = 0.044715


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
    """act(z) for a canonical activation name, in z's dtype."""
    if name == "relu":
        return torch.relu(z)
    if name == "gelu":
        return 0.5 * z * (1.0 + torch.erf(z * _INV_SQRT_2))
    if name == "gelu_tanh":
        return 0.5 * z * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_C * z * z * z)))
    if name == "silu":
        return z * torch.sigmoid(z)
    if name == "tanh":
        return torch.tanh(z)
    if name == "identity":
        return z
    raise ValueError(f"unknown activation {name!r}")


def act_grad(z: torch.Tensor, name: str) -> torch.Tensor:
    """d act(z) / dz for a canonical activation name, in z's dtype."""
    if name == "relu":
        # like torch.relu's backward: NaN in z passes the gradient on
        return torch.where(z <= 0, 0.0, 1.0).to(z.dtype)
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * _INV_SQRT_2))
        pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
        return cdf + z * pdf
    if name == "gelu_tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_C * z * z * z))
        dinner = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_C * z * z)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * dinner
    if name == "silu":
        s = torch.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    if name == "tanh":
        t = torch.tanh(z)
        return 1.0 - t * t
    if name == "identity":
        return torch.ones_like(z)
    raise ValueError(f"unknown activation {name!r}")
