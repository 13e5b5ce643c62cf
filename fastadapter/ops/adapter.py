"""The fused adapter operator: ``fastadapter::adapter_forward`` / ``adapter_backward``.

One registered PyTorch operator pair, with fake (meta) kernels and autograd, so
``torch.compile``, ``gradcheck`` and ``torch.library.opcheck`` see a single opaque op.
The op works on 2-D ``[N, d]`` inputs and asks :mod:`fastadapter.backends` which
implementation runs; :func:`fused_adapter` is the public functional form over any
leading shape.

Math (DESIGN.md)::

    z = x @ W_down.T + b_down;  a = act(z);  y = R + s * (a @ W_up.T + b_up)

The forward returns ``(y, z)``; z (pre-activation, fp32, or fp64 for float64 x) is
the only activation saved for the backward besides x.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .. import backends
from ..activations import canonical_activation

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _shape(t: Tensor) -> str:
    return str(list(t.shape))


def check_inputs(
    x: Tensor,
    w_down: Tensor,
    b_down: Optional[Tensor],
    w_up: Tensor,
    b_up: Optional[Tensor],
    residual: Optional[Tensor],
    scaling: float,
) -> None:
    """Raise TypeError/ValueError naming the argument when the inputs do not fit together."""
    for name, t in (("x", x), ("w_down", w_down), ("w_up", w_up)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be a float32, float16, bfloat16 or float64 tensor, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., d], got a 0-d tensor")
    d = x.shape[-1]
    if w_down.dim() != 2:
        raise ValueError(f"w_down must be 2-D [r, d], got shape {_shape(w_down)}")
    r = w_down.shape[0]
    if w_down.shape[1] != d:
        raise ValueError(f"w_down must have shape [r, d] with d = x.shape[-1] = {d}, got {_shape(w_down)} (x: {_shape(x)})")
    if d == 0 or r == 0:
        raise ValueError(f"hidden size d and bottleneck size r must be positive, got d={d}, r={r}")
    if w_up.dim() != 2 or w_up.shape[0] != d or w_up.shape[1] != r:
        raise ValueError(f"w_up must have shape [d, r] = [{d}, {r}], got {_shape(w_up)}")
    for name, b, n in (("b_down", b_down, r), ("b_up", b_up, d)):
        if b is None:
            continue
        if not isinstance(b, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(b).__name__}")
        if b.dim() != 1 or b.shape[0] != n:
            raise ValueError(f"{name} must have shape [{n}], got {_shape(b)}")
    for name, t in (("w_down", w_down), ("b_down", b_down), ("w_up", w_up), ("b_up", b_up)):
        if t is not None and t.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{name} must have x's dtype ({x.dtype}) or float32, got {t.dtype}")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"residual must be True, False or a tensor, got {type(residual).__name__}")
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {_shape(x)}, got {_shape(residual)}")
        if residual.dtype not in FLOAT_DTYPES:
            raise TypeError(f"residual must be a floating-point tensor, got {residual.dtype}")
    for name, t in (("w_down", w_down), ("b_down", b_down), ("w_up", w_up), ("b_up", b_up), ("residual", residual)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all inputs must be on one device")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a Python float, got {type(scaling).__name__}")
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be finite, got {scaling}")


def backend_arg(backend: Optional[str]) -> str:
    """The ``backend`` argument of a public op: None becomes "auto"; an unknown name fails
    here, before any work."""
    if backend is None:
        return backends.AUTO
    if backend != backends.AUTO:
        backends.get(backend)
    return backend


def residual_arg(residual: Union[bool, Tensor]) -> tuple[bool, Optional[Tensor]]:
    """(residual_is_x, residual tensor or None) of a public op's ``residual`` argument."""
    if isinstance(residual, bool):
        return residual, None
    if isinstance(residual, Tensor):
        return False, residual
    raise TypeError(f"residual must be True, False or a tensor, got {type(residual).__name__}")


def checked_grads(backend: str, needs, grads, likes, names, base: Tensor) -> tuple[Tensor, ...]:
    """A backward op's outputs: each needed gradient in its input's dtype (a backend that
    returns a missing or misshapen one is an error), an empty tensor like ``base`` where
    not needed (one per output: a custom op's outputs may not alias each other)."""
    out = []
    for need, grad, like, gname in zip(needs, grads, likes, names):
        if not need:
            out.append(base.new_empty(0))
            continue
        if grad is None or grad.shape != like.shape:
            raise RuntimeError(f"backend {backend!r} returned a bad {gname}: {None if grad is None else _shape(grad)}")
        out.append(grad.to(like.dtype))
    return tuple(out)


def fake_grads(needs, likes, base: Tensor) -> tuple[Tensor, ...]:
    """The fake (meta) outputs of a backward op: a tensor like each needed input, else an
    empty tensor like ``base``."""
    return tuple(torch.empty_like(like) if need else base.new_empty(0) for need, like in zip(needs, likes))


def as_shape(t: Tensor, shape) -> Tensor:
    """``t`` (an op's fresh output that its backward does not save) in ``shape``, as a tensor
    of its own rather than an autograd view of the 2-D output: an in-place op on it then
    keeps hooks on it (FSDP2's pre-backward hook on a layer's output) and its own version
    counter is the only one that matters."""
    return torch.ops.aten._unsafe_view(t, shape)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("fastadapter::adapter_forward", mutates_args=())
def adapter_forward(
    x: Tensor,
    w_down: Tensor,
    b_down: Optional[Tensor],
    w_up: Tensor,
    b_up: Optional[Tensor],
    residual: Optional[Tensor],
    activation: str,
    scaling: float,
    residual_is_x: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Fused adapter forward over 2-D x: returns (y [N, d] in x's dtype, z [N, r] fp32)."""
    if x.dim() != 2:
        raise ValueError(f"fastadapter::adapter_forward takes 2-D x [N, d], got {_shape(x)}")
    check_inputs(x, w_down, b_down, w_up, b_up, residual, scaling)
    name = backends.resolve(backend, x.device, x.dtype, w_down.shape[0])
    impl = backends.get(name)
    activation = canonical_activation(activation)
    return impl.forward(x, w_down, b_down, w_up, b_up, residual, activation, scaling, residual_is_x)


@adapter_forward.register_fake
def _(x, w_down, b_down, w_up, b_up, residual, activation, scaling, residual_is_x, backend):
    if x.dim() != 2:
        raise ValueError(f"fastadapter::adapter_forward takes 2-D x [N, d], got {_shape(x)}")
    check_inputs(x, w_down, b_down, w_up, b_up, residual, scaling)
    canonical_activation(activation)
    n, r = x.shape[0], w_down.shape[0]
    return x.new_empty(x.shape), x.new_empty((n, r), dtype=_acc_dtype(x.dtype))


_GRAD_NAMES = ("dx", "dw_down", "db_down", "dw_up", "db_up")


@torch.library.custom_op("fastadapter::adapter_backward", mutates_args=())
def adapter_backward(
    dy: Tensor,
    x: Tensor,
    z: Tensor,
    w_down: Tensor,
    b_down: Optional[Tensor],
    w_up: Tensor,
    b_up: Optional[Tensor],
    activation: str,
    scaling: float,
    residual_is_x: bool,
    needs: Sequence[bool],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused adapter backward from dy, x and z only.

    Returns (dx, dw_down, db_down, dw_up, db_up), each in its input's dtype; a gradient
    that ``needs`` does not ask for (or whose bias is None) is an empty tensor and is
    never computed.
    """
    needs = _needs(needs, b_down, b_up)
    name = backends.resolve(backend, x.device, x.dtype, w_down.shape[0])
    grads = backends.get(name).backward(
        dy, x, z, w_down, b_down, w_up, b_up, canonical_activation(activation), scaling, residual_is_x, needs
    )
    return checked_grads(name, needs, grads, (x, w_down, b_down, w_up, b_up), _GRAD_NAMES, x)


@adapter_backward.register_fake
def _(dy, x, z, w_down, b_down, w_up, b_up, activation, scaling, residual_is_x, needs, backend):
    return fake_grads(_needs(needs, b_down, b_up), (x, w_down, b_down, w_up, b_up), x)


def _needs(needs, b_down, b_up) -> tuple[bool, ...]:
    if len(needs) != 5:
        raise ValueError(f"needs must have 5 flags ({', '.join(_GRAD_NAMES)}), got {len(needs)}")
    n = [bool(v) for v in needs]
    n[2] = n[2] and b_down is not None
    n[4] = n[4] and b_up is not None
    return tuple(n)


def _setup_context(ctx, inputs, output):
    x, w_down, b_down, w_up, b_up, residual, activation, scaling, residual_is_x, backend = inputs
    _, z = output
    ctx.mark_non_differentiable(z)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for z
    ctx.save_for_backward(x, z, w_down, b_down, w_up, b_up)
    ctx.activation = activation
    ctx.scaling = scaling
    ctx.residual_is_x = residual_is_x
    ctx.backend = backend
    ctx.residual_dtype = None if residual is None else residual.dtype


def _backward(ctx, dy, _dz):
    x, z, w_down, b_down, w_up, b_up = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:5])
    grads = [None] * 5
    if dy is None:  # y did not reach the loss
        return (*grads, None, None, None, None, None)
    if any(needs):
        computed = adapter_backward(
            dy, x, z, w_down, b_down, w_up, b_up, ctx.activation, ctx.scaling, ctx.residual_is_x, needs, ctx.backend
        )
        grads = [g if need else None for g, need in zip(computed, _needs(needs, b_down, b_up))]
    d_residual = dy.to(ctx.residual_dtype) if ctx.needs_input_grad[5] else None
    return (*grads, d_residual, None, None, None, None)


adapter_forward.register_autograd(_backward, setup_context=_setup_context)


def fused_adapter(
    x: Tensor,
    w_down: Tensor,
    b_down: Optional[Tensor],
    w_up: Tensor,
    b_up: Optional[Tensor],
    activation: str = "relu",
    scaling: float = 1.0,
    residual: Union[bool, Tensor] = True,
    backend: Optional[str] = None,
) -> Tensor:
    """``y = R + scaling * (act(x @ w_down.T + b_down) @ w_up.T + b_up)`` as one fused op.

    Args:
        x: ``[..., d]`` float32, float16, bfloat16 (or float64) input.
        w_down, b_down: down-projection in ``nn.Linear(d, r)`` layout ([r, d], [r] or None).
        w_up, b_up: up-projection in ``nn.Linear(r, d)`` layout ([d, r], [d] or None).
            Weights may be float32 while x is half precision.
        activation: relu, gelu, gelu_tanh (gelu_new), silu (swish), tanh, identity (linear).
        scaling: the scalar s.
        residual: True adds x, False adds nothing, a tensor of x's shape is added instead.
        backend: None/"auto" chooses (FASTADAPTER_BACKEND overrides), or a name from
            :func:`fastadapter.available_backends`.

    Returns y with x's shape and dtype. Under autocast, x is cast to the autocast
    dtype first; the weights keep theirs.
    """
    activation = canonical_activation(activation)
    residual_is_x, residual_t = residual_arg(residual)
    backend = backend_arg(backend)
    check_inputs(x, w_down, b_down, w_up, b_up, residual_t, scaling)
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
        if residual_t is not None:
            residual_t = residual_t.to(x.dtype)
    shape = x.shape
    d = shape[-1]
    y, _ = adapter_forward(
        x.reshape(-1, d),
        w_down,
        b_down,
        w_up,
        b_up,
        None if residual_t is None else residual_t.reshape(-1, d),
        activation,
        float(scaling),
        residual_is_x,
        backend,
    )
    return as_shape(y, shape)
