"""Backend registry and dispatch.

A backend is a pair of functions (forward, backward) over 2-D inputs plus a check
that says why it cannot run for a given device and dtype (``None`` when it can).
The operator in :mod:`fastadapter.ops.adapter` asks :func:`resolve` which backend
to run; backends register themselves with :func:`register`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
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


_REGISTRY: dict[str, Backend] = {}
_LOGGED: set[str] = set()  # fallback messages already logged (log once, not per call)
_RESOLVED: dict[tuple, str] = {}  # cache of automatic choices


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend
    _RESOLVED.clear()


def get(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(_REGISTRY)}") from None


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def available_backends() -> dict[str, Optional[str]]:
    """Each backend's name mapped to None (it can run here) or the reason it cannot."""
    return {name: backend.status() for name, backend in _REGISTRY.items()}


def _log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.warning(message)


def resolve(name: Optional[str], device: torch.device, dtype: torch.dtype, r: int) -> str:
    """The backend to run for x on ``device`` with ``dtype`` and an adapter of bottleneck ``r``.

    ``None`` or ``"auto"`` picks automatically unless FASTADAPTER_BACKEND names a
    backend; a named backend that cannot run raises RuntimeError with the reason.
    """
    source = "backend"
    if name is None or name == AUTO:
        env = os.environ.get(ENV_VAR, "").strip()
        if env and env != AUTO:
            name, source = env, ENV_VAR
    if name is None or name == AUTO:
        return _auto(device, dtype, r)
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string or None, got {type(name).__name__}")
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r} (from {source}); known backends: {', '.join(_REGISTRY)}")
    reason = _REGISTRY[name].check(device, dtype, r)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} (from {source}) cannot run on {device} with {dtype}: {reason}")
    return name


def _auto(device: torch.device, dtype: torch.dtype, r: int) -> str:
    key = (device.type, dtype, r)
    cached = _RESOLVED.get(key)
    if cached is not None:
        return cached
    skipped = []
    for candidate in AUTO_ORDER.get(device.type, _DEFAULT_ORDER):
        backend = _REGISTRY.get(candidate)
        if backend is None:
            continue
        reason = backend.check(device, dtype, r)
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
