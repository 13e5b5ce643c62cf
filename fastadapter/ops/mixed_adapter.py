"""Many adapters in one call: ``fastadapter::mixed_adapter_forward`` / ``_backward``.

A batch that mixes tasks runs each row through its own task's adapter (stacked weights,
one set per adapter), in one op, forward and backward::

    y_i = R_i + s * (act(x_i @ W_down[k].T + b_down[k]) @ W_up[k].T + b_up[k]),  k = index[i]
    y_i = R_i                                                                 where index[i] == -1

Every adapter's weight gradients come from the one backward call (zeros for an adapter
no row uses). Adapters of different bottleneck sizes are stacked by
:func:`stack_adapters`, which zero-pads them to the largest r: a padded unit has z = 0,
act(0) = 0 for every activation here, and a zero column of W_up, so the result is exact.

z ([N, r], fp32, or fp64 for float64 x) is saved for the backward besides x and index;
its row order is the backend's own (the cpp backend keeps it grouped by adapter).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import backends
from ..activations import canonical_activation
from .adapter import (
    _GRAD_NAMES,
    FLOAT_DTYPES,
    _acc_dtype,
    _needs,
    _shape,
    as_shape,
    backend_arg,
    checked_grads,
    fake_grads,
    residual_arg,
)

OP = "mixed_adapter"
INDEX_DTYPES = (torch.int64, torch.int32)


def check_mixed_inputs(x, index, w_down, b_down, w_up, b_up, residual, scaling, check_range: bool = True) -> None:
    """Raise TypeError/ValueError naming the argument when the inputs do not fit together.
    ``check_range`` reads index's values (a device sync on a GPU): -1 <= index < A."""
    for name, t in (("x", x), ("index", index), ("w_down", w_down), ("w_up", w_up)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be a float32, float16, bfloat16 or float64 tensor, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., d], got a 0-d tensor")
    if index.dtype not in INDEX_DTYPES:
        raise TypeError(f"index must be an int64 or int32 tensor, got {index.dtype}")
    if tuple(index.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"index must have x's leading shape {list(x.shape[:-1])}, got {_shape(index)}")
    d = x.shape[-1]
    if w_down.dim() != 3:
        raise ValueError(f"w_down must be 3-D [A, r, d] (one [r, d] per adapter), got shape {_shape(w_down)}")
    a, r = w_down.shape[0], w_down.shape[1]
    if w_down.shape[2] != d:
        raise ValueError(f"w_down must have shape [A, r, d] with d = x.shape[-1] = {d}, got {_shape(w_down)}")
    if a == 0 or r == 0 or d == 0:
        raise ValueError(f"the number of adapters A, r and d must be positive, got A={a}, r={r}, d={d}")
    if w_up.dim() != 3 or tuple(w_up.shape[1:]) != (d, r):
        raise ValueError(f"w_up must have shape [A, d, r] = [{a}, {d}, {r}], got {_shape(w_up)}")
    if w_up.shape[0] != a:
        raise ValueError(f"w_up holds {w_up.shape[0]} adapters but w_down holds {a}")
    for name, b, n in (("b_down", b_down, r), ("b_up", b_up, d)):
        if b is None:
            continue
        if not isinstance(b, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(b).__name__}")
        if b.dim() != 2 or b.shape[1] != n:
            raise ValueError(f"{name} must have shape [A, {n}], got {_shape(b)}")
        if b.shape[0] != a:
            raise ValueError(f"{name} holds {b.shape[0]} adapters but w_down holds {a}")
    for name, t in (("w_down", w_down), ("b_down", b_down), ("w_up", w_up), ("b_up", b_up)):
        if t is not None and t.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{name} must have x's dtype ({x.dtype}) or float32, got {t.dtype}")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"residual must be True, False or a tensor, got {type(residual).__name__}")
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {_shape(x)}, got {_shape(residual)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual must have x's dtype ({x.dtype}), got {residual.dtype}")
    for name, t in (("index", index), ("w_down", w_down), ("b_down", b_down), ("w_up", w_up), ("b_up", b_up),
                    ("residual", residual)):  # fmt: skip
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all inputs must be on one device")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a Python float, got {type(scaling).__name__}")
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be finite, got {scaling}")
    if check_range and index.numel() > 0:
        lo, hi = int(index.min()), int(index.max())
        if lo < -1 or hi >= a:
            bad = lo if lo < -1 else hi
            raise ValueError(f"index holds {bad}, outside [-1, A) = [-1, {a}) (-1: no adapter for that row)")


def _resolve(backend: str, x: Tensor, r: int):
    name = backends.resolve(backend, x.device, x.dtype, r, op=OP)
    return name, backends.implementation(OP, name)


@torch.library.custom_op("fastadapter::mixed_adapter_forward", mutates_args=())
def mixed_adapter_forward(
    x: Tensor,
    index: Tensor,
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
    """Over 2-D x [N, d] and index [N]: (y [N, d] in x's dtype, z [N, r] fp32 in the backend's row order)."""
    if x.dim() != 2:
        raise ValueError(f"fastadapter::mixed_adapter_forward takes 2-D x [N, d], got {_shape(x)}")
    check_mixed_inputs(x, index, w_down, b_down, w_up, b_up, residual, scaling)
    _, (forward, _) = _resolve(backend, x, w_down.shape[1])
    return forward(x, index, w_down, b_down, w_up, b_up, residual, canonical_activation(activation), scaling, residual_is_x)


@mixed_adapter_forward.register_fake
def _(x, index, w_down, b_down, w_up, b_up, residual, activation, scaling, residual_is_x, backend):
    if x.dim() != 2:
        raise ValueError(f"fastadapter::mixed_adapter_forward takes 2-D x [N, d], got {_shape(x)}")
    check_mixed_inputs(x, index, w_down, b_down, w_up, b_up, residual, scaling, check_range=False)
    canonical_activation(activation)
    return x.new_empty(x.shape), x.new_empty((x.shape[0], w_down.shape[1]), dtype=_acc_dtype(x.dtype))


@torch.library.custom_op("fastadapter::mixed_adapter_backward", mutates_args=())
def mixed_adapter_backward(
    dy: Tensor,
    x: Tensor,
    index: Tensor,
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
    """(dx, dw_down, db_down, dw_up, db_up), each in its input's dtype, the weight gradients
    stacked [A, ...] like the weights; one that ``needs`` does not ask for is empty."""
    needs = _needs(needs, b_down, b_up)
    name, (_, backward) = _resolve(backend, x, w_down.shape[1])
    grads = backward(dy, x, index, z, w_down, b_down, w_up, b_up, canonical_activation(activation), scaling, residual_is_x,
                     needs)  # fmt: skip
    return checked_grads(name, needs, grads, (x, w_down, b_down, w_up, b_up), _GRAD_NAMES, x)


@mixed_adapter_backward.register_fake
def _(dy, x, index, z, w_down, b_down, w_up, b_up, activation, scaling, residual_is_x, needs, backend):
    return fake_grads(_needs(needs, b_down, b_up), (x, w_down, b_down, w_up, b_up), x)


def _setup_context(ctx, inputs, output):
    x, index, w_down, b_down, w_up, b_up, residual, activation, scaling, residual_is_x, backend = inputs
    _, z = output
    ctx.mark_non_differentiable(z)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, index, z, w_down, b_down, w_up, b_up)
    ctx.args = (activation, scaling, residual_is_x)
    ctx.backend = backend
    ctx.residual_dtype = None if residual is None else residual.dtype


def _backward(ctx, dy, _dz):
    x, index, z, w_down, b_down, w_up, b_up = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], *ctx.needs_input_grad[2:6]]
    grads = [None] * 5
    if dy is None:
        return (None,) * 11
    if any(needs):
        computed = mixed_adapter_backward(dy, x, index, z, w_down, b_down, w_up, b_up, *ctx.args, needs, ctx.backend)
        grads = [g if need else None for g, need in zip(computed, _needs(needs, b_down, b_up))]
    d_residual = dy.to(ctx.residual_dtype) if ctx.needs_input_grad[6] else None
    return (grads[0], None, *grads[1:], d_residual, None, None, None, None)


mixed_adapter_forward.register_autograd(_backward, setup_context=_setup_context)


def mixed_adapter(
    x: Tensor,
    index: Tensor,
    w_down: Tensor,
    b_down: Optional[Tensor],
    w_up: Tensor,
    b_up: Optional[Tensor],
    *,
    activation: str = "relu",
    scaling: float = 1.0,
    residual: Union[bool, Tensor] = True,
    backend: Optional[str] = None,
) -> Tensor:
    """Row i of x through adapter ``index[i]`` (-1: none), every adapter in one op.

    Args:
        x: ``[..., d]`` float32, float16, bfloat16 (or float64) input.
        index: int64 or int32, x's leading shape: the adapter of each row, -1 for none.
        w_down, b_down: ``[A, r, d]`` and ``[A, r]`` (or None): the down-projections stacked
            in ``nn.Linear`` layout. w_up, b_up: ``[A, d, r]`` and ``[A, d]`` (or None).
            :func:`stack_adapters` stacks FusedAdapter modules (zero-padding r).
        activation, scaling: as for :func:`fastadapter.fused_adapter`, shared by the adapters.
        residual: True adds x, False nothing, a tensor of x's shape is added instead; a
            row with index -1 is its residual (zero for False).
        backend: None/"auto" chooses (FASTADAPTER_BACKEND overrides), or a backend name.

    Returns y with x's shape and dtype; gradients reach x, the stacked weights (every
    adapter's, from one backward call) and a residual tensor.
    """
    activation = canonical_activation(activation)
    residual_is_x, residual_t = residual_arg(residual)
    backend = backend_arg(backend)
    check_mixed_inputs(x, index, w_down, b_down, w_up, b_up, residual_t, scaling, check_range=False)
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
        if residual_t is not None:
            residual_t = residual_t.to(x.dtype)
    shape, d = x.shape, x.shape[-1]
    y, _ = mixed_adapter_forward(
        x.reshape(-1, d), index.reshape(-1), w_down, b_down, w_up, b_up,
        None if residual_t is None else residual_t.reshape(-1, d), activation, float(scaling), residual_is_x, backend,
    )  # fmt: skip
    return as_shape(y, shape)


def stack_adapters(adapters: Sequence[nn.Module]) -> tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]]:
    """(w_down [A, r, d], b_down [A, r], w_up [A, d, r], b_up [A, d]) from FusedAdapter
    modules (anything with ``down`` and ``up`` Linear layers), r the largest bottleneck:
    smaller ones are zero-padded, which leaves their output unchanged (act(0) = 0 for
    every activation). Biases are None only when no adapter has one (a missing one is
    zeros). The result is a differentiable function of the modules' parameters. The
    adapters must share d, dtype, device, activation and scaling."""
    if len(adapters) == 0:
        raise ValueError("stack_adapters needs at least one adapter")
    first = adapters[0]
    d = first.down.weight.shape[1]
    r = max(m.down.weight.shape[0] for m in adapters)
    for i, m in enumerate(adapters):
        if m.down.weight.shape[1] != d:
            raise ValueError(f"adapter {i} has d = {m.down.weight.shape[1]}, adapter 0 has d = {d}")
        for attr in ("activation", "scaling"):
            if hasattr(first, attr) and getattr(m, attr, None) != getattr(first, attr):
                raise ValueError(f"adapter {i} has {attr} {getattr(m, attr, None)!r}, adapter 0 has {getattr(first, attr)!r}")

    def pad(t, size, dim):
        extra = size - t.shape[dim]
        if extra == 0:
            return t
        shape = list(t.shape)
        shape[dim] = extra
        return torch.cat([t, t.new_zeros(shape)], dim=dim)

    w_down = torch.stack([pad(m.down.weight, r, 0) for m in adapters])
    w_up = torch.stack([pad(m.up.weight, r, 1) for m in adapters])
    b_down = b_up = None
    if any(m.down.bias is not None for m in adapters):
        b_down = torch.stack([pad(m.down.bias if m.down.bias is not None else m.down.weight.new_zeros(m.down.weight.shape[0]),
                                  r, 0) for m in adapters])  # fmt: skip
    if any(m.up.bias is not None for m in adapters):
        b_up = torch.stack([m.up.bias if m.up.bias is not None else m.up.weight.new_zeros(d) for m in adapters])
    return w_down, b_down, w_up, b_up
