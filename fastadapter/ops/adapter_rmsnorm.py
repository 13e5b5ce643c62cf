"""The decoder site as one op: adapter + residual + the RMSNorm after it, ``fastadapter::adapter_rmsnorm_*``.

In a pre-norm decoder (Llama, Mistral, Qwen2, Qwen3) an adapter site sits on the residual
stream, and the model's RMSNorm that follows it (the layer's ``post_attention_layernorm``
after the attention site, the next layer's ``input_layernorm`` or the final norm after the
feed-forward site) normalizes the new stream for the next sub-layer. With r the stream
before the sub-layer, h the sub-layer's output, f the adapter without its residual and s
its scaling (AdapterHub's math)::

    houlsby   y = r + h + s * f(h)
    parallel  y = r + h + s * f(r)
    pfeiffer  y = r + h + s * f(r + h)

    y_normed = w * (y * rsqrt(mean(y^2) + eps))

The op returns both: y is the next residual stream, y_normed the next sub-layer's input.
Gradients reach y from both outputs.

Numerics (every backend), in the convention of Llama's RMSNorm: sums and the adapter's
accumulation in fp32 (fp64 for float64 inputs); the adapter's GEMM operands (its input u,
for pfeiffer ``r + h`` rounded to h's dtype, and the activation a) rounded to h's dtype, as
for the adapter op; y rounded once to h's dtype; the statistics taken of that rounded y in
fp32; ``y * rstd`` rounded to h's dtype before the weight, and the product with the weight
rounded to h's dtype (Llama's ``weight * x.to(input_dtype)``; where Llama's weight is fp32
and the stream half precision, Llama's product is fp32: this op returns h's dtype). The
forward returns ``(y, y_normed, z, rstd)``: z ([N, r]) and rstd ([N]) in the accumulation
dtype, saved for the backward with y and the adapter's input (h, r, or both for
pfeiffer).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import backends
from ..activations import canonical_activation
from .adapter import FLOAT_DTYPES, _acc_dtype, _shape, as_shape, backend_arg, check_inputs, checked_grads, fake_grads
from .adapter_layernorm import canonical_placement

OP = "adapter_rmsnorm"
_GRAD_NAMES = ("dh", "dr", "dw_down", "db_down", "dw_up", "db_up", "dnorm_weight")


def check_rms_site_inputs(h, r, w_down, b_down, w_up, b_up, norm_weight, eps, scaling) -> None:
    """Raise TypeError/ValueError naming the argument when the inputs do not fit together."""
    for name, t in (("h", h), ("r", r)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if h.dtype not in FLOAT_DTYPES:
        raise TypeError(f"h must be a float32, float16, bfloat16 or float64 tensor, got {h.dtype}")
    if r.dtype != h.dtype:
        raise TypeError(f"r must have h's dtype ({h.dtype}), got {r.dtype}")
    if r.shape != h.shape:
        raise ValueError(f"r must have h's shape {_shape(h)}, got {_shape(r)}")
    if r.device != h.device:
        raise ValueError(f"r is on {r.device} but h is on {h.device}; all inputs must be on one device")
    check_inputs(h, w_down, b_down, w_up, b_up, None, scaling)
    if norm_weight is not None:
        d = h.shape[-1]
        if not isinstance(norm_weight, Tensor):
            raise TypeError(f"norm_weight must be a torch.Tensor or None, got {type(norm_weight).__name__}")
        if norm_weight.dim() != 1 or norm_weight.shape[0] != d:
            raise ValueError(f"norm_weight must have shape [{d}] (d = h.shape[-1]), got {_shape(norm_weight)}")
        if norm_weight.dtype not in (h.dtype, torch.float32):
            raise TypeError(f"norm_weight must have h's dtype ({h.dtype}) or float32, got {norm_weight.dtype}")
        if norm_weight.device != h.device:
            raise ValueError(f"norm_weight is on {norm_weight.device} but h is on {h.device}; all inputs must be on one device")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")


def _implementation(backend: str, h: Tensor, r_dim: int):
    name = backends.resolve(backend, h.device, h.dtype, r_dim, op=OP)
    return name, backends.implementation(OP, name)


@torch.library.custom_op("fastadapter::adapter_rmsnorm_forward", mutates_args=())
def adapter_rmsnorm_forward(
    h: Tensor,
    r: Tensor,
    w_down: Tensor,
    b_down: Optional[Tensor],
    w_up: Tensor,
    b_up: Optional[Tensor],
    norm_weight: Optional[Tensor],
    placement: str,
    eps: float,
    activation: str,
    scaling: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The site over 2-D h, r [N, d]: (y [N, d], y_normed [N, d], both in h's dtype, z [N, r],
    rstd [N], both in the accumulation dtype)."""
    if h.dim() != 2:
        raise ValueError(f"fastadapter::adapter_rmsnorm_forward takes 2-D h [N, d], got {_shape(h)}")
    check_rms_site_inputs(h, r, w_down, b_down, w_up, b_up, norm_weight, eps, scaling)
    _, (forward, _) = _implementation(backend, h, w_down.shape[0])
    return forward(
        h, r, w_down, b_down, w_up, b_up, norm_weight, canonical_placement(placement), eps, canonical_activation(activation),
        scaling,
    )  # fmt: skip


@adapter_rmsnorm_forward.register_fake
def _(h, r, w_down, b_down, w_up, b_up, norm_weight, placement, eps, activation, scaling, backend):
    if h.dim() != 2:
        raise ValueError(f"fastadapter::adapter_rmsnorm_forward takes 2-D h [N, d], got {_shape(h)}")
    check_rms_site_inputs(h, r, w_down, b_down, w_up, b_up, norm_weight, eps, scaling)
    canonical_placement(placement)
    canonical_activation(activation)
    n, acc = h.shape[0], _acc_dtype(h.dtype)
    return h.new_empty(h.shape), h.new_empty(h.shape), h.new_empty((n, w_down.shape[0]), dtype=acc), h.new_empty((n,), dtype=acc)


@torch.library.custom_op("fastadapter::adapter_rmsnorm_backward", mutates_args=())
def adapter_rmsnorm_backward(
    dy: Tensor,
    dn: Tensor,
    h: Tensor,
    r: Tensor,
    y: Tensor,
    z: Tensor,
    rstd: Tensor,
    w_down: Tensor,
    b_down: Optional[Tensor],
    w_up: Tensor,
    b_up: Optional[Tensor],
    norm_weight: Optional[Tensor],
    placement: str,
    eps: float,
    activation: str,
    scaling: float,
    needs: Sequence[bool],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dh, dr, dw_down, db_down, dw_up, db_up, dnorm_weight) from dy (the gradient
    of y) and dn (that of y_normed), either of which may be empty [0] (its output did not
    reach the loss); each gradient in its input's dtype, empty where ``needs`` does not ask
    for it. h or r may be empty where the placement's adapter does not read it."""
    needs = _needs(needs, b_down, b_up, norm_weight)
    placement = canonical_placement(placement)
    _check_saved(dy, dn, h, r, y, z, rstd, placement)
    name, (_, backward) = _implementation(backend, y, w_down.shape[0])
    grads = backward(
        dy, dn, h, r, y, z, rstd, w_down, b_down, w_up, b_up, norm_weight, placement, eps, canonical_activation(activation),
        scaling, needs,
    )  # fmt: skip
    likes = (y, y, w_down, b_down, w_up, b_up, norm_weight)
    return checked_grads(name, needs, grads, likes, _GRAD_NAMES, y)


@adapter_rmsnorm_backward.register_fake
def _(dy, dn, h, r, y, z, rstd, w_down, b_down, w_up, b_up, norm_weight, placement, eps, activation, scaling, needs,
      backend):  # fmt: skip
    needs = _needs(needs, b_down, b_up, norm_weight)
    _check_saved(dy, dn, h, r, y, z, rstd, canonical_placement(placement))
    return fake_grads(needs, (y, y, w_down, b_down, w_up, b_up, norm_weight), y)


def _check_saved(dy, dn, h, r, y, z, rstd, placement) -> None:
    if y.dim() != 2:
        raise ValueError(f"fastadapter::adapter_rmsnorm_backward takes 2-D y [N, d], got {_shape(y)}")
    shape = tuple(y.shape)
    if dy.dim() != 2 and dn.dim() != 2:
        raise ValueError("dy and dn are both empty: at least one output's gradient is needed")
    for name, t in (("dy", dy), ("dn", dn)):
        if tuple(t.shape) not in (shape, (0,)):
            raise ValueError(f"{name} must have y's shape {_shape(y)} or be empty [0], got {_shape(t)}")
    for name, t, needed in (("h", h, placement != "parallel"), ("r", r, placement != "houlsby")):
        if tuple(t.shape) != shape and (needed or t.numel() > 0):
            raise ValueError(f"{name} must have y's shape {_shape(y)}, got {_shape(t)}")
    if z.dim() != 2 or z.shape[0] != shape[0]:
        raise ValueError(f"z must be [N, r] with N = {shape[0]}, got {_shape(z)}")
    if tuple(rstd.shape) != (shape[0],):
        raise ValueError(f"rstd must be [N] with N = {shape[0]}, got {_shape(rstd)}")


def _needs(needs, b_down, b_up, norm_weight) -> tuple[bool, ...]:
    if len(needs) != 7:
        raise ValueError(f"needs must have 7 flags ({', '.join(_GRAD_NAMES)}), got {len(needs)}")
    n = [bool(v) for v in needs]
    for i, t in ((3, b_down), (5, b_up), (6, norm_weight)):
        n[i] = n[i] and t is not None
    return tuple(n)


def _setup_context(ctx, inputs, output):
    h, r, w_down, b_down, w_up, b_up, norm_weight, placement, eps, activation, scaling, backend = inputs
    y, _, z, rstd = output
    ctx.mark_non_differentiable(z, rstd)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for an output that did not reach the loss
    placement = canonical_placement(placement)
    if placement == "houlsby":  # only the adapter's input is read again
        r = r.new_empty(0)
    elif placement == "parallel":
        h = h.new_empty(0)
    ctx.save_for_backward(h, r, y, z, rstd, w_down, b_down, w_up, b_up, norm_weight)
    ctx.args = (placement, eps, activation, scaling)
    ctx.backend = backend


def _backward(ctx, dy, dn, *_):
    saved = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:7])
    grads = [None] * 7
    if any(needs) and (dy is not None or dn is not None):
        y = saved[2]
        empty = y.new_empty(0)
        computed = adapter_rmsnorm_backward(
            empty if dy is None else dy, empty if dn is None else dn, *saved, *ctx.args, needs, ctx.backend
        )
        b_down, b_up, norm_weight = saved[6], saved[8], saved[9]
        grads = [g if need else None for g, need in zip(computed, _needs(needs, b_down, b_up, norm_weight))]
    return (*grads, None, None, None, None, None)


adapter_rmsnorm_forward.register_autograd(_backward, setup_context=_setup_context)


def adapter_rmsnorm(
    h: Tensor,
    r: Tensor,
    w_down: Tensor,
    b_down: Optional[Tensor],
    w_up: Tensor,
    b_up: Optional[Tensor],
    norm_weight: Optional[Tensor],
    *,
    placement: str,
    eps: float = 1e-6,
    activation: str = "relu",
    scaling: float = 1.0,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """A decoder's adapter site and the RMSNorm after it as one op: returns ``(y, y_normed)``
    with ``y = r + h + s*f(h)`` (houlsby), ``r + h + s*f(r)`` (parallel) or ``r + h +
    s*f(r + h)`` (pfeiffer) and ``y_normed = norm_weight * y * rsqrt(mean(y^2) + eps)``
    (Llama's RMSNorm).

    Args:
        h: the sub-layer's output ``[..., d]`` (float32, float16, bfloat16 or float64).
        r: the residual stream before the sub-layer, h's shape and dtype.
        w_down, b_down, w_up, b_up: the adapter in ``nn.Linear`` layout, as for
            :func:`fastadapter.fused_adapter` (f is the adapter without its residual).
        norm_weight: the RMSNorm's weight ``[d]`` (h's dtype or float32), or None.
        placement: ``"houlsby"``, ``"parallel"`` or ``"pfeiffer"`` (or AdapterHub's
            ``"double_seq_bn"``, ``"par_bn"``, ``"seq_bn"``).
        eps: the RMSNorm's eps. activation, scaling: the adapter's.
        backend: None/"auto" chooses (FASTADAPTER_BACKEND overrides), or a backend name.

    Both outputs have h's shape and dtype. Gradients reach h, r, the adapter's weights and
    the norm's weight, each computed only when asked for, from either output or both.
    """
    placement = canonical_placement(placement)
    activation = canonical_activation(activation)
    backend = backend_arg(backend)
    check_rms_site_inputs(h, r, w_down, b_down, w_up, b_up, norm_weight, eps, scaling)
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
        h, r = h.to(dtype), r.to(dtype)
    shape, d = h.shape, h.shape[-1]
    y, y_normed, _, _ = adapter_rmsnorm_forward(
        h.reshape(-1, d), r.reshape(-1, d), w_down, b_down, w_up, b_up, norm_weight, placement, float(eps), activation,
        float(scaling), backend,
    )  # fmt: skip
    return y.view(shape), as_shape(y_normed, shape)  # y is saved for the backward: a view keeps its version
