"""Running an adapter composition (:mod:`fastadapter.composition`) at one site.

Every site of every model family computes the same thing: with f the sub-layer output and x
the stream, a composition maps f to a new f, and the site adds x (and its norm) once. Each
adapter step is one adapter op with f in its epilogue; an Average of adapters is one op of
the merged adapter; a BatchSplit of adapters is one mixed-adapter op; a Fuse of adapters is
:func:`fastadapter.composition.fuse_adapters`. :func:`site` stops short of the last step
when that step is one adapter op, so the caller runs it as its site op with the residual
and the norm (``adapter_layernorm``, ``adapter_rmsnorm``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..composition import Average, BatchSplit, Block, Fuse, Parallel, Stack, fuse_adapters, fuse_outputs, merge
from ..ops.adapter import fused_adapter
from ..ops.mixed_adapter import mixed_adapter, stack_adapters

COPIES = "_fastadapter_copies"  # site owner attribute: the batch size before Parallel replicated it


class Step(NamedTuple):
    """One adapter op's weights: an adapter's own, or several merged into one."""

    w_down: Tensor
    b_down: Optional[Tensor]
    w_up: Tensor
    b_up: Optional[Tensor]
    activation: str
    scaling: float
    backend: Optional[str]


def adapter_input(placement: str, f: Tensor, x: Optional[Tensor], norm: Optional[Callable] = None) -> Tensor:
    """u: F (houlsby), x (parallel) or x + F (pfeiffer; its norm where the site's adapter reads
    the normed stream, as in BERT). x None: f already holds the stream (DistilBERT's pfeiffer)."""
    if placement == "houlsby":
        return f
    if placement == "parallel":
        return x
    t = f if x is None else x + f
    return t if norm is None else norm(t)


def _placement(owner: nn.Module, setup) -> str:
    placements = owner.__dict__["_fastadapter_placement"]
    names = [setup] if isinstance(setup, str) else setup.names()
    return next(placements[n] for n in names if n in placements)


def _present(owner: nn.Module, names) -> list:
    adapters = getattr(owner, "adapters", {})
    return [adapters[n] for n in names if n in adapters]


def run(step: Step, u: Tensor, residual: Tensor) -> Tensor:
    """residual + the step's branch on u, as one adapter op."""
    return fused_adapter(u, step.w_down, step.b_down, step.w_up, step.b_up, activation=step.activation,
                         scaling=step.scaling, residual=True if residual is u else residual, backend=step.backend)  # fmt: skip


def _own(adapter) -> Step:
    return Step(adapter.down.weight, adapter.down.bias, adapter.up.weight, adapter.up.bias, adapter.activation,
                adapter.scaling, adapter.backend)  # fmt: skip


def _merged(owner: nn.Module, block: Average, scale: float = 1.0) -> Optional[Step]:
    """The Average of adapter names as one adapter (weights times ``scale``); None when a
    child is a block or the adapters' activations differ. A name the site lacks adds nothing."""
    if not all(isinstance(c, str) for c in block):
        return None
    pairs = [(owner.adapters[c], w * scale) for c, w in zip(block, block.weights) if c in getattr(owner, "adapters", {})]
    if not pairs or len({a.activation for a, _ in pairs}) > 1:
        return None
    adapters, weights = zip(*pairs)
    w_down, b_down, w_up, b_up = merge(adapters, weights)
    return Step(w_down, b_down, w_up, b_up, adapters[0].activation, 1.0, adapters[0].backend)


def site(owner: nn.Module, setup, f: Tensor, x: Optional[Tensor], norm: Optional[Callable] = None):
    """(f, step): ``setup`` applied up to its last step, and that step when it is one adapter op
    reading u(f) with f its residual (an adapter name, or an Average of adapter names); else
    (the final f, None). The site's result is then x + f + step(u(f)), or x + f."""
    if isinstance(setup, str):
        adapters = getattr(owner, "adapters", {})
        return f, (_own(adapters[setup]) if setup in adapters else None)
    if isinstance(setup, Stack):
        for child in setup.children[:-1]:
            f = apply(owner, child, f, x, norm)
        return site(owner, setup.children[-1], f, x, norm)
    if isinstance(setup, Average) and setup.form == "sum":
        step = _merged(owner, setup)
        if step is not None:
            return f, step
    return apply(owner, setup, f, x, norm), None


def apply(owner: nn.Module, setup, f: Tensor, x: Optional[Tensor], norm: Optional[Callable] = None) -> Tensor:
    """The sub-layer output after ``setup`` at this site (the stream x not added); a block none
    of whose adapters the site has (``leave_out``) leaves it as it is."""
    if not _present(owner, [setup] if isinstance(setup, str) else setup.names()):
        return f
    placement = _placement(owner, setup)
    if isinstance(setup, (str, Stack)):
        f, step = site(owner, setup, f, x, norm)
        return f if step is None else run(step, adapter_input(placement, f, x, norm), f)
    if isinstance(setup, Average) and setup.form == "sum":
        step = _merged(owner, setup)
        if step is not None:
            return run(step, adapter_input(placement, f, x, norm), f)
        return f + sum((apply(owner, c, f, x, norm) - f) * w for c, w in zip(setup, setup.weights))
    if isinstance(setup, Average):  # AdapterHub's form: mean_i(w_i F_i)
        n = len(setup)
        step = _merged(owner, setup, 1.0 / n) if len(_present(owner, setup.names())) == n else None
        if step is not None:
            return run(step, adapter_input(placement, f, x, norm), f * (sum(setup.weights) / n))
        return sum(apply(owner, c, f, x, norm) * (w / n) for c, w in zip(setup, setup.weights))
    if isinstance(setup, (BatchSplit, Parallel)):
        return _split(owner, setup, placement, f, x, norm)
    if isinstance(setup, Fuse):
        return _fuse(owner, setup, placement, f, x, norm)
    raise TypeError(f"unknown composition {setup!r}")


def _split(owner, block: Block, placement: str, f: Tensor, x: Optional[Tensor], norm) -> Tensor:
    rows = f.shape[0]
    if isinstance(block, Parallel):
        batch = owner.__dict__.get(COPIES)
        if batch is None or batch * len(block) != rows:
            raise RuntimeError(f"{block!r} is active, but this forward's batch ({rows}) was not replicated for it: call "
                               "the model on which set_active_adapter was called")  # fmt: skip
        sizes = [batch] * len(block)
    else:
        sizes = block.batch_sizes
        if sum(sizes) != rows:
            raise ValueError(f"BatchSplit batch_sizes {sizes} cover {sum(sizes)} examples, the batch has {rows}")
    kids = list(block)
    adapters = getattr(owner, "adapters", {})
    if all(isinstance(c, str) for c in kids):
        present = [adapters[c] for c in kids if c in adapters]
        if present and len({(a.activation, a.scaling) for a in present}) == 1:
            slot = [present.index(adapters[c]) if c in adapters else -1 for c in kids]
            ids = torch.repeat_interleave(torch.tensor(slot, device=f.device), torch.tensor(sizes, device=f.device))
            index = ids.view(-1, *([1] * (f.dim() - 2))).expand(f.shape[:-1])
            u = adapter_input(placement, f, x, norm)
            return mixed_adapter(u, index, *stack_adapters(present), activation=present[0].activation,
                                 scaling=present[0].scaling, residual=True if u is f else f)  # fmt: skip
    parts, start = [], 0
    for child, size in zip(kids, sizes):
        rows_ = slice(start, start + size)
        parts.append(apply(owner, child, f[rows_], None if x is None else x[rows_], norm))
        start += size
    return torch.cat(parts)


def _fuse(owner, block: Fuse, placement: str, f: Tensor, x: Optional[Tensor], norm) -> Tensor:
    fusions = getattr(owner, "adapter_fusion_layer", {})
    if block.name not in fusions:
        raise ValueError(f"no fusion layer {block.name!r} at {type(owner).__name__}: fastadapter.add_fusion(model, "
                         f"{block!r}) first")  # fmt: skip
    fusion = fusions[block.name]
    u = adapter_input(placement, f, x, norm)
    kids = [c for c in block if not isinstance(c, str) or c in getattr(owner, "adapters", {})]
    if not kids:
        return f
    if all(isinstance(c, str) for c in kids):
        return f + fuse_adapters(u, [owner.adapters[c] for c in kids], fusion)
    branches = [apply(owner, c, f, x, norm) - f for c in kids]
    return f + fuse_outputs(u, branches, fusion)
