"""Backend registry and dispatch.

A backend is a pair of functions (forward, backward) of the adapter op over 2-D inputs,
plus a check that says why it cannot run for a given device and dtype (``None`` when it
can), and the implementations of the other ops (``Backend.ops``: op name -> (forward,
backward)). The operators in :mod:`fastadapter.ops` ask :func:`resolve` which backend to
run; backends register themselves with :func:`register` and their other ops with
:func:`register_op`. A backend that has no fused implementation of an op may run the
reference composition for it (``composition`` in :func:`register_op`): the automatic choice
then passes it over, an explicit request runs it and logs that once.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

logger = logging.getLogger("fastadapter")

ENV_VAR = "FASTADAPTER_BACKEND"
AUTO = "auto"

# Automatic choice per device type, best first.
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpp", "reference"),
}
_DEFAULT_ORDER = ("reference",)


@dataclass(frozen=True)
class Backend:
    name: str
    # forward(x, w_down, b_down, w_up, b_up, residual, activation, scaling, residual_is_x) -> (y, z)
    forward: Callable
    # backward(dy, x, z, w_down, b_down, w_up, b_up, activation, scaling, residual_is_x, needs)
    #   -> (dx, dw_down, db_down, dw_up, db_up), each None when needs says so
    backward: Callable
    # check(device, dtype, r) -> None when the backend can run there, else the reason
    check: Callable[[torch.device, torch.dtype, int], Optional[str]]
    # status() -> None when the backend can run on this machine at all, else the reason
    status: Callable[[], Optional[str]]
    # other ops: name -> (forward, backward, composition note or None)
    ops: dict = field(default_factory=dict)


_REGISTRY: dict[str, Backend] = {}
_LOGGED: set[str] = set()  # fallback messages already logged (log once, not per call)
_RESOLVED: dict[tuple, str] = {}  # cache of automatic choices


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend
    _RESOLVED.clear()


def register_op(op: str, backend: str, forward: Callable, backward: Callable, composition: Optional[str] = None,
                **traits) -> None:  # fmt: skip
    """Register ``backend``'s implementation of ``op``. ``composition``: why it is not fused
    (it runs the reference composition), or None for a fused implementation. ``traits``:
    what the op's fake (meta) implementation must know of this backend's outputs (for
    ``adapter_layernorm``: ``keeps_ln_input``, the forward returns the LayerNorm's input)."""
    _REGISTRY[backend].ops[op] = (forward, backward, composition, traits)
    _RESOLVED.clear()


def implementation(op: str, name: str) -> tuple[Callable, Callable]:
    """(forward, backward) of ``op`` on backend ``name``; logs once where it is a composition."""
    forward, backward, composition, _ = get(name).ops[op]
    if composition is not None:
        _log_once(f"fastadapter: {op} on backend {name!r} runs {composition}")
    return forward, backward


def trait(op: str, name: str, key: str, default=None):
    """A trait ``backend`` ``name`` registered for ``op`` (see :func:`register_op`)."""
    return get(name).ops[op][3].get(key, default)


def get(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(_REGISTRY)}") from None


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def available_backends(op: str = "adapter") -> dict[str, Optional[str]]:
    """Each backend's name mapped to None (it can run ``op`` here) or the reason it cannot;
    for an op a backend runs only as the reference composition, that is the reason (it runs
    when asked for by name, and the automatic choice passes it over)."""
    out = {}
    for name, backend in _REGISTRY.items():
        reason = backend.status()
        if reason is None and op != "adapter":
            if op not in backend.ops:
                reason = f"no implementation of {op}"
            elif backend.ops[op][2] is not None:
                reason = f"no fused kernel for {op}: runs {backend.ops[op][2]}"
        out[name] = reason
    return out


def _log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.warning(message)


def resolve(name: Optional[str], device: torch.device, dtype: torch.dtype, r: int, op: str = "adapter") -> str:
    """The backend to run ``op`` for x on ``device`` with ``dtype`` and an adapter of bottleneck ``r``.

    ``None`` or ``"auto"`` picks automatically unless FASTADAPTER_BACKEND names a
    backend; a named backend that cannot run raises RuntimeError with the reason.
    """
    source = "backend"
    if name is None or name == AUTO:
        env = os.environ.get(ENV_VAR, "").strip()
        if env and env != AUTO:
            name, source = env, ENV_VAR
    if name is None or name == AUTO:
        return _auto(device, dtype, r, op)
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string or None, got {type(name).__name__}")
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r} (from {source}); known backends: {', '.join(_REGISTRY)}")
    reason = _REGISTRY[name].check(device, dtype, r)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} (from {source}) cannot run on {device} with {dtype}: {reason}")
    if op != "adapter" and op not in _REGISTRY[name].ops:
        raise RuntimeError(f"backend {name!r} (from {source}) has no implementation of {op}")
    return name


def _auto(device: torch.device, dtype: torch.dtype, r: int, op: str) -> str:
    key = (device.type, dtype, r, op)
    cached = _RESOLVED.get(key)
    if cached is not None:
        return cached
    skipped = []
    for candidate in AUTO_ORDER.get(device.type, _DEFAULT_ORDER):
        backend = _REGISTRY.get(candidate)
        if backend is None:
            continue
        reason = backend.check(device, dtype, r)
        if reason is None and op != "adapter":
            if op not in backend.ops:
                reason = f"no implementation of {op}"
            elif backend.ops[op][2] is not None:
                reason = f"no fused {op} kernel"
        if reason is None:
            if skipped:
                why = "; ".join(f"{name}: {reason}" for name, reason in skipped)
                _log_once(f"fastadapter: using backend {candidate!r} for {device.type} {dtype} ({why})")
            _RESOLVED[key] = candidate
            return candidate
        skipped.append((candidate, reason))
    raise RuntimeError(f"no fastadapter backend can run on {device} with {dtype}: {skipped}")


# Importing the backend modules registers them (cpp also registers cuda).
from . import cpp, reference, triton  # noqa: E402,F401
