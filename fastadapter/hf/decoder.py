"""Adapters in decoder LLMs: Llama, Mistral, Qwen2, Qwen3 and GPT-2.

With x the residual stream before a sub-layer, F the sub-layer's output and A the adapter
branch s * f(.) (AdapterHub's math for its bottleneck configs)::

    pfeiffer (feed-forward only):       x + F + A(x + F)
    houlsby  (attention, feed-forward): x + F + A(F)
    parallel (feed-forward only):       x + F + A(x)

In the Llama family each site and the RMSNorm that follows it run as one op,
:func:`fastadapter.adapter_rmsnorm`, which returns the new stream y and its norm: the
layer's ``forward`` is replaced, on that instance only, by :func:`_layer_forward`, which
runs the module's own forward whenever no adapter is active in the layer. The attention
site's norm is the layer's ``post_attention_layernorm``, whose output feeds the MLP. The
feed-forward site's norm is the next layer's ``input_layernorm`` (the final norm after the
last layer): the op's normed output is handed over to that norm module, whose ``forward``
returns it when called on the very tensor y the site returned (same object, unchanged
since), and computes the norm itself otherwise. No handover under gradient checkpointing
(a recomputed layer then computes its own norm) or torch.compile; there the next norm
runs as the model's own module.

GPT-2's LayerNorms stay the model's own: each site runs the adapter op from hooks, with
the residual in its epilogue (the block then adds x): houlsby F + A(F) on ``attn`` and
``mlp``; pfeiffer F + A(x + F) and parallel F + A(x) on ``mlp``, x taken from ``ln_2``'s
input.

Several active adapters (inside ``adapter_routing``) run the mixed-adapter op at each
site, and the model's own norm after it. Under FSDP2 (a layer that is an ``FSDPModule``) there is
no handover either: the feed-forward site's norm belongs to the next unit, sharded while
this one runs, and FSDP2 starts a unit's backward from its output. Where there is no
handover, the feed-forward site is the adapter op with x + F its residual.
"""

from __future__ import annotations

import functools
import inspect
import weakref

import torch
from torch import nn

from ..ops.adapter_rmsnorm import adapter_rmsnorm
from . import compose
from .sites import Site

try:
    from torch.distributed.fsdp import FSDPModule as _FSDPModule
except ImportError:  # a torch built without distributed
    _FSDPModule = None

_HANDOFF = "_fastadapter_handoff"  # norm module attribute: (weakref to y, y's version, y_normed)
_OWNER_NORM = "_fastadapter_norm_after"  # Llama mlp attribute: the norm after its site
_STREAM = "_fastadapter_stream"  # GPT-2 mlp attribute: ln_2's input x, for pfeiffer and parallel
_STATE_MLP = "_fastadapter_mlp"  # GPT-2 ln_2 attribute: the mlp whose site reads its input


def _state():
    from . import model

    return model


def _site(owner: nn.Module, names, f: torch.Tensor, x: torch.Tensor, norm: nn.Module | None):
    """(y, y_normed or None) of a Llama-family site: the active adapter or composition with its
    last adapter step and the norm as one adapter_rmsnorm op, or several routed adapters through
    the mixed-adapter op (y_normed None: the model's norm computes it). With no norm given, the
    last step is the adapter op with x + F its residual."""
    state = _state()
    placement = state._placement_of(owner, names)
    if isinstance(names, tuple):
        return state._Routed(owner, names, f)(compose.adapter_input(placement, f, x), x + f), None
    f, step = compose.site(owner, names, f, x)
    if step is None:
        return x + f, None
    if norm is None:
        return compose.run(step, compose.adapter_input(placement, f, x), x + f), None
    return adapter_rmsnorm(
        f, x, step.w_down, step.b_down, step.w_up, step.b_up, norm.weight, placement=placement,
        eps=norm.variance_epsilon, activation=step.activation, scaling=step.scaling, backend=step.backend,
    )  # fmt: skip


def _handover(layer: nn.Module) -> bool:
    """Whether the feed-forward site may hand its normed output to the next norm. Not under
    gradient checkpointing (a recomputed layer computes its own norm), torch.compile, or
    FSDP2: a unit's backward starts from a hook on its output, which the gradient would then
    bypass, and the next norm's weight is another unit's, sharded while this one runs."""
    if getattr(layer, "gradient_checkpointing", False) and layer.training:
        return False
    return not torch.compiler.is_compiling() and not (_FSDPModule is not None and isinstance(layer, _FSDPModule))


_ARG_NAMES: dict = {}  # a cache: layer class -> its forward's parameter names after hidden_states


def _arg_names(cls) -> tuple[str, ...]:
    """The names of a layer class's forward parameters after hidden_states (for positional calls)."""
    if cls not in _ARG_NAMES:
        params = list(inspect.signature(cls.forward).parameters.values())[2:]
        _ARG_NAMES[cls] = tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    return _ARG_NAMES[cls]


def _layer_forward(layer: nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
    """A Llama-family decoder layer with adapters: each active site and the norm after it as one op."""
    state = _state()
    attn, mlp = layer.self_attn, layer.mlp
    a_names, m_names = state._active_names(attn), state._active_names(mlp)
    if a_names is None and m_names is None:
        return type(layer).forward(layer, hidden_states, *args, **kwargs)
    names = _arg_names(type(layer))
    if len(args) > len(names):
        raise TypeError(f"{type(layer).__name__} takes at most {len(names) + 1} positional arguments, got {len(args) + 1}")
    kwargs.update(zip(names, args))
    x = hidden_states
    f, _ = attn(hidden_states=layer.input_layernorm(x), **kwargs)
    norm = layer.post_attention_layernorm
    y, normed = _site(attn, a_names, f, x, norm) if a_names is not None else (x + f, None)
    f = mlp(norm(y) if normed is None else normed)
    if m_names is None:
        return y + f
    after = mlp.__dict__[_OWNER_NORM] if _handover(layer) else None
    out, normed = _site(mlp, m_names, f, y, after)
    if normed is not None:
        after.__dict__[_HANDOFF] = (weakref.ref(out, functools.partial(_drop, weakref.ref(after))), out._version, normed)
    return out


def _drop(norm_ref, dead) -> None:
    """y died before its norm was asked for: let go of the normed output held for it."""
    norm = norm_ref()
    handoff = None if norm is None else norm.__dict__.get(_HANDOFF)
    if handoff is not None and handoff[0] is dead:
        del norm.__dict__[_HANDOFF]


def _norm_forward(norm: nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
    """The norm after a feed-forward site: the site's normed output where called on its y."""
    handoff = norm.__dict__.pop(_HANDOFF, None)
    if handoff is not None and not args and not kwargs:
        ref, version, normed = handoff
        if ref() is hidden_states and hidden_states._version == version:
            return normed
    return type(norm).forward(norm, hidden_states, *args, **kwargs)


def _gpt2_stream_hook(module, args):  # ln_2's pre-hook: keep the stream x for the mlp's site
    module.__dict__[_STATE_MLP].__dict__[_STREAM] = args[0]


def _gpt2_hook(module, args, output):  # on attn or mlp: F -> F + A(u)
    state = _state()
    x = module.__dict__.pop(_STREAM, None)
    names = state._active_names(module)
    if names is None:
        return None
    f = output[0] if isinstance(output, tuple) else output
    placement = state._placement_of(module, names)
    if placement != "houlsby" and x is None:
        raise RuntimeError(f"the {placement} adapter of {type(module).__name__} needs the stream before ln_2, which was not seen")
    if isinstance(names, tuple):
        f = state._Routed(module, names, f)(compose.adapter_input(placement, f, x), f)
    else:
        f = compose.apply(module, names, f, x)
    return (f, *output[1:]) if isinstance(output, tuple) else f


def install(site: Site) -> None:
    """Hooks or forwards for a decoder site (once per site owner)."""
    owner = site.owner
    if owner.__dict__.get("_fastadapter_hooked"):
        return
    if site.style == "decoder":
        layer = site.block
        if not layer.__dict__.get("_fastadapter_hooked"):
            layer.forward = functools.partial(_layer_forward, layer)
            layer.__dict__["_fastadapter_hooked"] = True
        if site.kind == "output":
            owner.__dict__[_OWNER_NORM] = site.layer_norm
            if not site.layer_norm.__dict__.get("_fastadapter_hooked"):
                site.layer_norm.forward = functools.partial(_norm_forward, site.layer_norm)
                site.layer_norm.__dict__["_fastadapter_hooked"] = True
    else:
        owner.register_forward_hook(_gpt2_hook)
        if site.kind == "output":
            site.block.ln_2.__dict__[_STATE_MLP] = owner
            site.block.ln_2.register_forward_pre_hook(_gpt2_stream_hook)
    owner.__dict__["_fastadapter_hooked"] = True
