"""Adapter composition: ``Stack``, ``Average``, ``Fuse``, ``Parallel`` and ``BatchSplit``.

A composition says how several adapters of one placement act together at each site. With
x the site's stream (BERT: the sub-layer's residual input), F the sub-layer's output, u(F)
the adapter input of the placement (houlsby F, parallel x, pfeiffer x + F, or the layer's
norm of it in BERT) and A_i adapter i's branch s_i * f_i(u), each block maps F to a new F;
the site adds x (and its norm) once at the end:

    name                   F -> F + A(u(F))
    Stack(a, b, ...)       each child in turn, on the F the previous one left
    Average(a, ...; w)     F -> F + sum_i w_i (F_i - F), F_i the child's result; for adapters
                           that is one adapter of bottleneck sum r_i (the W_down stacked,
                           the W_up scaled by w_i s_i side by side): one op, no loop
    Average(..., form="adapterhub")
                           F -> mean_i(w_i F_i), AdapterHub's form: it scales F by
                           sum(w) / n, so Average(a, a) is not a; kept for checkpoint parity
    Fuse(a, b, ...)        AdapterFusion: F -> F + sum_i p_i W_v D_i, D_i = F_i - F, with
                           p = softmax_i((W_q q + b_q) . (W_k D_i + b_k) / T), q = u(F)
    BatchSplit(a, b; sizes) rows [s_0, s_0 + s_1) ... of the batch, one child each
    Parallel(a, b)         the model runs the batch once per child (replicated at its
                           input), copy i through child i: a BatchSplit of equal parts

Nesting follows AdapterHub's rules (``ALLOWED``); a Stack may hold blocks only at its top.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .activations import act


class Block:
    """A composition of adapter names and nested blocks."""

    def __init__(self, *children):
        if not children:
            raise ValueError(f"{type(self).__name__} needs at least one adapter")
        self.children = [parse(c) for c in children]

    def __iter__(self):
        return iter(self.children)

    def __len__(self):
        return len(self.children)

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.children == other.children and self._kwargs() == other._kwargs()

    def __hash__(self):
        return hash((type(self).__name__, tuple(map(_hashable, self.children))))

    def __repr__(self):
        kw = "".join(f", {k}={v!r}" for k, v in self._kwargs().items())
        return f"{type(self).__name__}({', '.join(map(repr, self.children))}{kw})"

    def _kwargs(self) -> dict:
        return {}

    def names(self) -> list[str]:
        """Every adapter name in the block, in order, once each."""
        out = []
        for c in self.children:
            for n in [c] if isinstance(c, str) else c.names():
                if n not in out:
                    out.append(n)
        return out

    def last(self) -> str:
        c = self.children[-1]
        return c if isinstance(c, str) else c.last()

    def to_dict(self) -> dict:
        kids = [{"type": "single", "children": [c]} if isinstance(c, str) else c.to_dict() for c in self.children]
        out = {"type": type(self).__name__, "children": kids}
        if self._kwargs():
            out["kwargs"] = self._kwargs()
        return out

    @staticmethod
    def from_dict(data: dict) -> Union[str, Block]:
        if data["type"] == "single":
            return data["children"][0]
        cls = BLOCKS.get(data["type"])
        if cls is None:
            raise ValueError(f"unknown composition block {data['type']!r}; fastadapter has: {', '.join(BLOCKS)}")
        return cls(*[Block.from_dict(c) for c in data["children"]], **data.get("kwargs", {}))


def _hashable(c):
    return c if isinstance(c, str) else hash(c)


class Stack(Block):
    """Each child in turn, on the sub-layer output the previous one left (MAD-X)."""


class Average(Block):
    """The children's outputs averaged with ``weights`` (default equal; normalized to sum 1
    unless ``normalize_weights=False``). ``form="sum"`` (default) is F + sum_i w_i (F_i - F),
    so weights summing to 1 over one adapter give that adapter; ``form="adapterhub"`` is
    AdapterHub's mean_i(w_i F_i), which also scales F by sum(w) / n."""

    FORMS = ("sum", "adapterhub")

    def __init__(self, *children, weights: Optional[Sequence[float]] = None, normalize_weights: bool = True,
                 form: str = "sum"):  # fmt: skip
        super().__init__(*children)
        if form not in self.FORMS:
            raise ValueError(f"unknown Average form {form!r}; expected one of: {', '.join(self.FORMS)}")
        if weights is None:
            weights = [1.0 / len(self.children)] * len(self.children)
        else:
            weights = [float(w) for w in weights]
            if len(weights) != len(self.children):
                raise ValueError(f"Average has {len(self.children)} children but {len(weights)} weights")
            if not all(math.isfinite(w) for w in weights):
                raise ValueError(f"Average weights must be finite, got {weights}")
            if normalize_weights:
                total = sum(weights)
                if total == 0:
                    raise ValueError(f"Average weights sum to 0 and cannot be normalized: {weights}")
                weights = [w / total for w in weights]
        self.weights = weights
        self.form = form

    def _kwargs(self) -> dict:
        out = {"weights": self.weights}
        if self.form != "sum":
            out["form"] = self.form
        return out


class Fuse(Block):
    """AdapterFusion over the children (adapters, or Stacks of them): add its parameters with
    :func:`fastadapter.add_fusion`. ``name`` defaults to the children's last adapters joined by
    commas, as AdapterHub names fusion layers."""

    def __init__(self, *children, name: Optional[str] = None):
        super().__init__(*children)
        self._name = name

    @property
    def name(self) -> str:
        return self._name or ",".join(c if isinstance(c, str) else c.last() for c in self.children)

    def _kwargs(self) -> dict:
        return {"name": self._name} if self._name else {}


class BatchSplit(Block):
    """Contiguous slices of the batch, ``batch_sizes[i]`` rows through child i."""

    def __init__(self, *children, batch_sizes: Union[int, Sequence[int]]):
        super().__init__(*children)
        sizes = [batch_sizes] * len(self.children) if isinstance(batch_sizes, int) else list(batch_sizes)
        if len(sizes) != len(self.children):
            raise ValueError(f"BatchSplit has {len(self.children)} children but {len(sizes)} batch sizes")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in sizes):
            raise ValueError(f"BatchSplit batch_sizes must be non-negative integers, got {sizes}")
        self.batch_sizes = sizes

    def _kwargs(self) -> dict:
        return {"batch_sizes": self.batch_sizes}


class Parallel(Block):
    """The whole batch through every child: the model replicates its input batch once per
    child, and its output holds child i's results in rows [i*B, (i+1)*B)."""


BLOCKS = {c.__name__: c for c in (Stack, Average, Fuse, BatchSplit, Parallel)}

# What may sit inside what (AdapterHub's rules, less the blocks fastadapter does not have).
ALLOWED = {
    Stack: (str, Fuse, Parallel, BatchSplit, Average),
    Fuse: (str, Stack),
    Parallel: (str, Stack, BatchSplit, Average),
    BatchSplit: (str, Stack, BatchSplit, Average),
    Average: (str, Stack, BatchSplit),
}


def parse(setup) -> Union[str, Block]:
    """A name or a block, as given; anything else is refused by name."""
    if isinstance(setup, (str, Block)):
        return setup
    raise TypeError(f"a composition holds adapter names and blocks (Stack, Average, Fuse, BatchSplit, Parallel), "
                    f"got {type(setup).__name__} {setup!r}")  # fmt: skip


def validate(block: Block, level: int = 0) -> None:
    """Raise ValueError naming the nesting AdapterHub does not allow."""
    for child in block:
        if isinstance(child, str):
            continue
        if type(child) not in ALLOWED[type(block)]:
            allowed = ", ".join("adapter names" if t is str else t.__name__ for t in ALLOWED[type(block)])
            raise ValueError(f"{type(child).__name__} cannot sit inside {type(block).__name__} (it takes: {allowed})")
        if isinstance(block, Stack) and level >= 1:
            raise ValueError(f"a Stack inside another block holds adapter names only, got {child!r}")
        if isinstance(child, Parallel) or (isinstance(child, Stack) and any(isinstance(g, Parallel) for g in child)):
            if level >= 1 or not isinstance(block, Stack):
                raise ValueError("Parallel may only be the whole composition or a child of the top-level Stack")
        validate(child, level + 1)


def parallel_channels(setup) -> int:
    """How many copies of the batch the composition runs (1 without a Parallel)."""
    if isinstance(setup, str):
        return 1
    inner = max(parallel_channels(c) for c in setup)
    return max(len(setup), inner) if isinstance(setup, Parallel) else inner


def merge(adapters: Sequence, weights: Sequence[float]):
    """(w_down, b_down, w_up, b_up) of one adapter, scaling 1, equal to sum_i w_i A_i:
    the W_down stacked [sum r_i, d], the W_up side by side [d, sum r_i] each times w_i s_i,
    b_up = sum_i w_i s_i b_up_i. The adapters must share their activation. Gradients flow
    back to every adapter's parameters."""
    w_down = torch.cat([a.down.weight for a in adapters])
    b_down = torch.cat([_bias(a.down, a.down.weight.shape[0]) for a in adapters])
    w_up = torch.cat([a.up.weight * (w * a.scaling) for a, w in zip(adapters, weights)], dim=1)
    b_up = sum(_bias(a.up, a.up.weight.shape[0]) * (w * a.scaling) for a, w in zip(adapters, weights))
    return w_down, b_down, w_up, b_up


def _bias(linear, n: int) -> Tensor:
    b = linear.bias
    return b if b is not None else linear.weight.new_zeros(n)


def fuse_adapters(u: Tensor, adapters: Sequence, fusion) -> Tensor:
    """AdapterFusion's output sum_i p_i W_v A_i(u) for adapters that all read u, with query u,
    without forming the n branch outputs: with P_i = s_i W_up_i and z_i = act(W_down_i u +
    b_down_i), the score of adapter i is (P_i^T W_k^T q') . z_i + q' . W_k s_i b_up_i with
    q' = W_q u + b_q (W_k's bias adds the same to every score and cancels in the softmax), and
    the output is sum_i p_i (W_v P_i z_i + W_v s_i b_up_i). The products of W_q, W_k, W_v with
    the adapters' W_up ([d, sum r_i] each) are formed once per call where autograd records and
    kept under no_grad (:func:`_fold`), so every per-token product is d x sum r_i wide instead
    of AdapterHub's three d x d projections and n branch outputs."""
    sizes = [a.down.weight.shape[0] for a in adapters]
    units = sum(sizes)
    m, c, valued = _fold(u, adapters, fusion)
    # one product of u for the pre-activations and the score columns: [..., R] and [..., R + n]
    w = torch.cat([torch.cat([a.down.weight for a in adapters]), m.to(u.dtype)])
    b = torch.cat([torch.cat([_bias(a.down, r) for a, r in zip(adapters, sizes)]),
                   c.to(u.dtype) if c is not None else u.new_zeros(m.shape[0])])  # fmt: skip
    pre, g = F.linear(u, w, b).split([units, units + len(adapters)], dim=-1)
    z = torch.cat([act(t, a.activation) for t, a in zip(pre.split(sizes, dim=-1), adapters)], dim=-1) \
        if len({a.activation for a in adapters}) > 1 else act(pre, adapters[0].activation)  # fmt: skip
    segments = torch.repeat_interleave(torch.arange(len(adapters), device=u.device), torch.tensor(sizes, device=u.device))
    ones = F.one_hot(segments, len(adapters)).to(u.dtype)  # [R, n]: which adapter each unit belongs to
    scores = (g[..., :units] * z) @ ones + g[..., units:]
    p = fusion.probabilities(scores)
    weights = torch.cat([(p @ ones.T) * z, p], dim=-1)  # [..., R + n]
    return F.linear(weights, valued.to(u.dtype))


def _fold(u: Tensor, adapters: Sequence, fusion) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """(M, c, V) of :func:`fuse_adapters`: the score rows M = [W_k P_i, W_k s_i b_up_i]^T W_q
    ([R + n, d]), their bias c (or None) and the value columns V = W_v [P_i, s_i b_up_i]
    ([d, R + n]), in fp32 (fp64 for fp64 u). Formed once per call where autograd records
    (they are functions of trained weights), and under no_grad kept on the fusion layer until
    one of the weights they read changes (a parameter's in-place version counter, or another
    tensor object) or the adapters, their scalings or the dtype do: inference pays for them
    once, not per forward (outside torch.compile and process groups)."""
    acc = torch.promote_types(u.dtype, torch.float32)
    # not under torch.compile (no graph break), nor in a process group: FSDP2 refills the same
    # unsharded parameter objects, and whether every refill bumps their versions is its own
    # business; a fold recomputed there costs time, a stale one would be silently wrong
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or distributed:
        return _folded(u.shape[-1], adapters, fusion, acc)
    reads = [t for a in adapters for t in (a.up.weight, a.up.bias) if t is not None]
    reads += [t for layer in (fusion.query, fusion.key, fusion.value) if layer is not None for t in layer.parameters()]
    key = (acc, tuple(id(a) for a in adapters), tuple(a.scaling for a in adapters), tuple((t, t._version) for t in reads))
    cached = fusion.__dict__.get("_fold_cache")
    if cached is None or not _same_key(cached[0], key):
        cached = fusion.__dict__["_fold_cache"] = (key, _folded(u.shape[-1], adapters, fusion, acc))
    return cached[1]


def _folded(d: int, adapters: Sequence, fusion, acc: torch.dtype) -> tuple[Tensor, Optional[Tensor], Tensor]:
    p_up = torch.cat([a.up.weight.to(acc) * a.scaling for a in adapters], dim=1)  # [d, R]
    b_up = torch.stack([_bias(a.up, d).to(acc) * a.scaling for a in adapters], dim=1)  # [d, n]
    cols = torch.cat([p_up, b_up], dim=1)  # [d, R + n]: the n branches' columns and biases
    keyed = fusion.key.weight.to(acc) @ cols if fusion.key is not None else cols  # rows: W_k P_i, W_k s_i b_up_i
    m = keyed.T @ fusion.query.weight.to(acc) if fusion.query is not None else keyed.T  # [R + n, d]
    c = keyed.T @ fusion.query.bias.to(acc) if fusion.query is not None and fusion.query.bias is not None else None
    valued = fusion.value.weight.to(acc) @ cols if fusion.value is not None else cols  # [d, R + n]
    return m, c, valued


def _same_key(a: tuple, b: tuple) -> bool:
    """Equal fold keys: the same dtype, adapters and scalings, and every weight the same tensor
    object at the same version."""
    return a[:3] == b[:3] and len(a[3]) == len(b[3]) and all(x is y and vx == vy for (x, vx), (y, vy) in zip(a[3], b[3]))


def fuse_outputs(q: Tensor, branches: Sequence[Tensor], fusion) -> Tensor:
    """AdapterFusion over explicit branch outputs D_i [..., d] (children that are Stacks):
    sum_i p_i W_v D_i with p = softmax_i((W_q q + b_q) . (W_k D_i + b_k) / T)."""
    v = torch.stack(list(branches), dim=-2)  # [..., n, d]
    query = fusion.query(q) if fusion.query is not None else q
    key = fusion.key(v) if fusion.key is not None else v
    p = fusion.probabilities((key @ query.unsqueeze(-1)).squeeze(-1))
    context = (p.unsqueeze(-2) @ v).squeeze(-2)
    return fusion.value(context) if fusion.value is not None else context
