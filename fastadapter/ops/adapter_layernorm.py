"""The adapter site as one op: adapter + residual + LayerNorm, ``fastadapter::adapter_layernorm_*``.

Where AdapterHub places a bottleneck adapter in a BERT layer, the layer computes (h the
sub-layer output, r the sub-layer input, f the adapter without its residual, LN the
layer's own LayerNorm with weight, bias and eps)::

    houlsby   out = LN(h + r + s * f(h))
    parallel  out = LN(h + r + s * f(r))
    pfeiffer  out = LN(t + s * f(LN(t))),  t = h + r   (the same LN twice)

Numerics (every backend): sums, LayerNorm statistics and the adapter's accumulation in
fp32 (fp64 for float64 inputs); the adapter's GEMM operands (its input u and the
activation a) rounded to h's dtype, as for the adapter op; out rounded once to h's dtype.
The forward returns out and what the backward needs besides h and r: the adapter's
pre-activation z ([N, r], fp32), the statistics of the LayerNorm's input v (mean and 1/std
per row, fp32), and for pfeiffer those of t too. Where a backend's GEMMs are its cost (the
CPU backends) the forward also returns v itself ([N, d], fp32), and the backward reads it
in place of recomputing s * f(u) by a GEMM; the saved tensors are then v and the adapter's
input (h for houlsby, r for parallel, both for pfeiffer). Where bytes are the cost (the
triton kernels) v is not kept: the backward recomputes it from h, r and z, and h and r
are saved.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import backends
from ..activations import canonical_activation
from .adapter import FLOAT_DTYPES, _shape, as_shape, backend_arg, check_inputs, checked_grads, fake_grads

OP = "adapter_layernorm"
PLACEMENTS = ("houlsby", "parallel", "pfeiffer")
PLACEMENT_ALIASES = {"double_seq_bn": "houlsby", "par_bn": "parallel", "seq_bn": "pfeiffer"}
_GRAD_NAMES = ("dh", "dr", "dw_down", "db_down", "dw_up", "db_up", "dln_weight", "dln_bias")


def canonical_placement(placement: str) -> str:
    if not isinstance(placement, str):
        raise TypeError(f"placement must be a string, got {type(placement).__name__}")
    key = PLACEMENT_ALIASES.get(placement, placement)
    if key not in PLACEMENTS:
        names = ", ".join(PLACEMENTS + tuple(PLACEMENT_ALIASES))
        raise ValueError(f"unknown placement {placement!r}; expected one of: {names}")
    return key


def check_site_inputs(h, r, w_down, b_down, w_up, b_up, ln_weight, ln_bias, eps, scaling) -> None:
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
    d = h.shape[-1]
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.dim() != 1 or t.shape[0] != d:
            raise ValueError(f"{name} must have shape [{d}] (d = h.shape[-1]), got {_shape(t)}")
        if t.dtype not in (h.dtype, torch.float32):
            raise TypeError(f"{name} must have h's dtype ({h.dtype}) or float32, got {t.dtype}")
        if t.device != h.device:
            raise ValueError(f"{name} is on {t.device} but h is on {h.device}; all inputs must be on one device")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _resolve(backend: str, h: Tensor, r_dim: int):
    name = backends.resolve(backend, h.device, h.dtype, r_dim, op=OP)
    return name, backends.implementation(OP, name)


def keeps_ln_input(backend: str, h: Tensor, r_dim: int) -> bool:
    """Whether the backend that runs for h returns the LayerNorm's input v for the backward."""
    name = backends.resolve(backend, h.device, h.dtype, r_dim, op=OP)
    return bool(backends.trait(OP, name, "keeps_ln_input", False))


@torch.library.custom_op("fastadapter::adapter_layernorm_forward", mutates_args=())
def adapter_layernorm_forward(
    h: Tensor,
    r: Tensor,
    w_down: Tensor,
    b_down: Optional[Tensor],
    w_up: Tensor,
    b_up: Optional[Tensor],
    ln_weight: Optional[Tensor],
    ln_bias: Optional[Tensor],
    placement: str,
    eps: float,
    activation: str,
    scaling: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The site over 2-D h, r [N, d]: returns (out [N, d] in h's dtype, z [N, r], v [N, d]
    where the backend keeps it (:func:`keeps_ln_input`) else empty, mean [N], rstd [N],
    mean_t [N] and rstd_t [N] of t for pfeiffer, else empty); z, v and statistics fp32."""
    if h.dim() != 2:
        raise ValueError(f"fastadapter::adapter_layernorm_forward takes 2-D h [N, d], got {_shape(h)}")
    check_site_inputs(h, r, w_down, b_down, w_up, b_up, ln_weight, ln_bias, eps, scaling)
    _, (forward, _) = _resolve(backend, h, w_down.shape[0])
    return forward(
        h, r, w_down, b_down, w_up, b_up, ln_weight, ln_bias, canonical_placement(placement), eps,
        canonical_activation(activation), scaling,
    )  # fmt: skip


@adapter_layernorm_forward.register_fake
def _(h, r, w_down, b_down, w_up, b_up, ln_weight, ln_bias, placement, eps, activation, scaling, backend):
    if h.dim() != 2:
        raise ValueError(f"fastadapter::adapter_layernorm_forward takes 2-D h [N, d], got {_shape(h)}")
    check_site_inputs(h, r, w_down, b_down, w_up, b_up, ln_weight, ln_bias, eps, scaling)
    placement = canonical_placement(placement)
    canonical_activation(activation)
    n, rd = h.shape[0], w_down.shape[0]
    sd = _stat_dtype(h.dtype)
    m_t = n if placement == "pfeiffer" else 0
    v_shape = h.shape if keeps_ln_input(backend, h, rd) else (0,)
    return (
        h.new_empty(h.shape), h.new_empty((n, rd), dtype=sd), h.new_empty(v_shape, dtype=sd), h.new_empty((n,), dtype=sd),
        h.new_empty((n,), dtype=sd), h.new_empty((m_t,), dtype=sd), h.new_empty((m_t,), dtype=sd),
    )  # fmt: skip


@torch.library.custom_op("fastadapter::adapter_layernorm_backward", mutates_args=())
def adapter_layernorm_backward(
    dout: Tensor,
    h: Tensor,
    r: Tensor,
    z: Tensor,
    v: Tensor,
    mean: Tensor,
    rstd: Tensor,
    mean_t: Tensor,
    rstd_t: Tensor,
    w_down: Tensor,
    b_down: Optional[Tensor],
    w_up: Tensor,
    b_up: Optional[Tensor],
    ln_weight: Optional[Tensor],
    ln_bias: Optional[Tensor],
    placement: str,
    eps: float,
    activation: str,
    scaling: float,
    needs: Sequence[bool],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dh, dr, dw_down, db_down, dw_up, db_up, dln_weight, dln_bias), each in its
    input's dtype; one that ``needs`` does not ask for (or whose tensor is None) is empty.
    v is the forward's (empty where the backend does not keep it); where it is kept, the
    one of h and r that the placement's adapter does not read may be empty too."""
    needs = _needs(needs, b_down, b_up, ln_weight, ln_bias)
    placement = canonical_placement(placement)
    _check_saved(dout, h, r, z, v, placement)
    name, (_, backward) = _resolve(backend, dout, w_down.shape[0])
    grads = backward(
        dout, h, r, z, v, mean, rstd, mean_t, rstd_t, w_down, b_down, w_up, b_up, ln_weight, ln_bias, placement, eps,
        canonical_activation(activation), scaling, needs,
    )  # fmt: skip
    likes = (dout, dout, w_down, b_down, w_up, b_up, ln_weight, ln_bias)
    return checked_grads(name, needs, grads, likes, _GRAD_NAMES, h)


@adapter_layernorm_backward.register_fake
def _(dout, h, r, z, v, mean, rstd, mean_t, rstd_t, w_down, b_down, w_up, b_up, ln_weight, ln_bias, placement, eps,
      activation, scaling, needs, backend):  # fmt: skip
    needs = _needs(needs, b_down, b_up, ln_weight, ln_bias)
    _check_saved(dout, h, r, z, v, canonical_placement(placement))
    likes = (dout, dout, w_down, b_down, w_up, b_up, ln_weight, ln_bias)
    return fake_grads(needs, likes, h)


def _check_saved(dout, h, r, z, v, placement) -> None:
    """The backward's inputs fit together: h and r of dout's shape (or empty where v is
    kept and the placement's adapter does not read them), v of dout's shape or empty."""
    shape = tuple(dout.shape)
    if dout.dim() != 2:
        raise ValueError(f"fastadapter::adapter_layernorm_backward takes 2-D dout [N, d], got {_shape(dout)}")
    kept = v.dim() == 2  # kept: [N, d]; not kept: [0]
    if tuple(v.shape) != (shape if kept else (0,)):
        raise ValueError(f"v must have dout's shape {_shape(dout)} or be empty [0], got {_shape(v)}")
    need_h = not kept or placement != "parallel"
    need_r = not kept or placement != "houlsby"
    for name, t, needed in (("h", h, need_h), ("r", r, need_r)):
        if tuple(t.shape) != shape and (needed or t.numel() > 0):
            raise ValueError(f"{name} must have dout's shape {_shape(dout)}, got {_shape(t)}")
    if z.dim() != 2 or z.shape[0] != shape[0]:
        raise ValueError(f"z must be [N, r] with N = {shape[0]}, got {_shape(z)}")


def _needs(needs, b_down, b_up, ln_weight, ln_bias) -> tuple[bool, ...]:
    if len(needs) != 8:
        raise ValueError(f"needs must have 8 flags ({', '.join(_GRAD_NAMES)}), got {len(needs)}")
    n = [bool(v) for v in needs]
    for i, t in ((3, b_down), (5, b_up), (6, ln_weight), (7, ln_bias)):
        n[i] = n[i] and t is not None
    return tuple(n)


def _setup_context(ctx, inputs, output):
    h, r, w_down, b_down, w_up, b_up, ln_weight, ln_bias, placement, eps, activation, scaling, backend = inputs
    _, z, v, mean, rstd, mean_t, rstd_t = output
    ctx.mark_non_differentiable(z, v, mean, rstd, mean_t, rstd_t)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for z, v and the statistics
    if v.dim() == 2:  # v kept: only the adapter's input of h and r is read again
        placement = canonical_placement(placement)
        if placement == "houlsby":
            r = r.new_empty(0)
        elif placement == "parallel":
            h = h.new_empty(0)
    ctx.save_for_backward(h, r, z, v, mean, rstd, mean_t, rstd_t, w_down, b_down, w_up, b_up, ln_weight, ln_bias)
    ctx.args = (placement, eps, activation, scaling)
    ctx.backend = backend


def _backward(ctx, dout, *_):
    saved = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:8])
    grads = [None] * 8
    if any(needs) and dout is not None:  # dout None: out did not reach the loss
        computed = adapter_layernorm_backward(dout, *saved, *ctx.args, needs, ctx.backend)
        b_down, b_up, ln_weight, ln_bias = saved[9], saved[11], saved[12], saved[13]
        grads = [g if need else None for g, need in zip(computed, _needs(needs, b_down, b_up, ln_weight, ln_bias))]
    return (*grads, None, None, None, None, None)


adapter_layernorm_forward.register_autograd(_backward, setup_context=_setup_context)


def adapter_layernorm(
    h: Tensor,
    r: Tensor,
    w_down: Tensor,
    b_down: Optional[Tensor],
    w_up: Tensor,
    b_up: Optional[Tensor],
    ln_weight: Optional[Tensor],
    ln_bias: Optional[Tensor],
    *,
    placement: str,
    eps: float = 1e-12,
    activation: str = "relu",
    scaling: float = 1.0,
    backend: Optional[str] = None,
) -> Tensor:
    """An adapter site as one op: ``LN(h + r + s*f(h))`` (houlsby), ``LN(h + r + s*f(r))``
    (parallel) or ``LN(t + s*f(LN(t)))`` with ``t = h + r`` (pfeiffer).

    Args:
        h: the sub-layer's output ``[..., d]`` (float32, float16, bfloat16 or float64).
        r: the sub-layer's input (the residual), h's shape and dtype.
        w_down, b_down, w_up, b_up: the adapter in ``nn.Linear`` layout, as for
            :func:`fastadapter.fused_adapter` (f is the adapter without its residual).
        ln_weight, ln_bias: the LayerNorm's affine parameters ``[d]`` (or None).
        placement: ``"houlsby"``, ``"parallel"`` or ``"pfeiffer"`` (or AdapterHub's
            ``"double_seq_bn"``, ``"par_bn"``, ``"seq_bn"``).
        eps: the LayerNorm's eps. activation, scaling: the adapter's.
        backend: None/"auto" chooses (FASTADAPTER_BACKEND overrides), or a backend name.

    Returns out with h's shape and dtype. Gradients reach h, r, the adapter's weights and
    the LayerNorm's, each computed only when asked for.
    """
    placement = canonical_placement(placement)
    activation = canonical_activation(activation)
    backend = backend_arg(backend)
    check_site_inputs(h, r, w_down, b_down, w_up, b_up, ln_weight, ln_bias, eps, scaling)
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
        h, r = h.to(dtype), r.to(dtype)
    shape, d = h.shape, h.shape[-1]
    out = adapter_layernorm_forward(
        h.reshape(-1, d), r.reshape(-1, d), w_down, b_down, w_up, b_up, ln_weight, ln_bias, placement, float(eps),
        activation, float(scaling), backend,
    )[0]  # fmt: skip
    return as_shape(out, shape)
