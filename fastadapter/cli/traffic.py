"""Bytes one adapter call moves, counted rather than guessed (KERNELS.md).

    python -m fastadapter.cli.traffic [--dtype bf16] [--d 768] [--r 64] [--n 512 1024 2048] [--at 32768] [--json FILE]

(also ``python benchmarks/traffic.py``, and ``fastadapter bench --traffic``)

Providers, for the forward and for forward+backward (residual x, gelu, scaling 1):

- ``eager``: the unfused module a user writes (two Linear layers, the activation, the
  residual add), counted per ATen op by a TorchDispatchMode: every op reads its tensor
  inputs and writes its outputs; views are free.
- ``compile``: ``torch.compile`` of the same module, counted by Inductor's own per-kernel
  byte count (each generated kernel's buffer reads and writes, GEMMs included, from
  ``GraphLowering.count_bytes``) of the graphs it compiles here. Inductor fuses the same
  way for a GPU, but the count comes from this machine's (CPU) compile.
- ``triton``: the fused Triton kernels run through the interpreter with every masked
  load and store counted, element by element (masked-out elements are no traffic).
  Launch choices that depend on the GPU (the backward's program count) are made for an
  H200 (132 SMs).
- ``cuda`` and ``cpp``: the C++/CUDA kernels from their loop structure (formulas below,
  written from csrc/); ``cpp`` runs in fp32 on the CPU and is counted in fp32.

Three figures each, in passes over an N x d tensor of x's dtype:
``requested`` (everything asked for: an upper bound on DRAM traffic), ``distinct`` (each
address once per launch: the floor if caches served every re-read) and ``model``: tensors
with N rows count each address once per program that touches it (a program's re-read of
its own tile is served by its cache; another program's read of it is not), weights,
biases and partial sums once per launch. The interpreter is slow, so the counts are
made at small N; the table shows that they grow linearly in N, and the figures at
``--at`` come from the straight line through them. The default N are multiples of the
rows each Triton backward program takes (512 at r = 64), so that the programs, and with
them the weight-gradient partials, grow with N as they do up to the H200's 132 programs. The predicted time is the model's
bytes over the H200's measured copy bandwidth (DESIGN.md, about 4.3 TB/s).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import warnings
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

H200_SMS = 132
H200_COPY_BYTES_PER_S = 4.3e12
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclasses.dataclass
class Count:
    """Bytes of one provider's forward or backward: requested, distinct, model, and reread
    (the model's blind spot: bytes of N-row tensors a program asks for again after its first
    read of them, which the model takes to hit a cache)."""

    requested: float = 0.0
    distinct: float = 0.0
    model: float = 0.0
    reread: float = 0.0

    def __add__(self, other):
        return Count(self.requested + other.requested, self.distinct + other.distinct, self.model + other.model,
                     self.reread + other.reread)  # fmt: skip

    def scaled(self, f: float) -> Count:
        return Count(self.requested * f, self.distinct * f, self.model * f, self.reread * f)


# ----------------------------------------------------------------------------- Triton, under the interpreter


@dataclasses.dataclass
class _Launch:
    kernel: str
    ranges: list  # (start, end, name, element size, has N rows)
    accesses: list = dataclasses.field(default_factory=list)  # (program, addresses, element size)


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The byte range [start, end) a (possibly strided) tensor view can touch."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    extent = sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0)
    return t.data_ptr(), t.data_ptr() + (extent + 1) * t.element_size()


class TritonCounter:
    """Counts the loads and stores of every Triton kernel launched under the interpreter,
    and (``aten``) the ATen ops the launchers run around them, such as the sums of the
    partials (the interpreter's own bookkeeping inside a launch is not counted)."""

    def __init__(self, per_launch=()):
        self.launches: list[_Launch] = []
        self.aten = EagerCounter()
        self.aten.skip_namespaces = ("fastadapter",)
        # tensors counted once per launch whatever their shape (the weights and biases); other
        # tensors whose first dimension is the kernel's N argument have N rows
        self.per_launch = {t.data_ptr() for t in per_launch if t is not None}

    @contextlib.contextmanager
    def counting(self):
        import inspect

        from triton.runtime import interpreter

        executor, builder = interpreter.GridExecutor, interpreter.InterpreterBuilder
        saved = (executor.__call__, builder.create_masked_load, builder.create_masked_store)
        launches = self.launches

        def call(ex, *args, **kwargs):
            bound = inspect.signature(ex.fn).bind_partial(*args, **{k: v for k, v in kwargs.items() if k in ex.arg_names})
            n = bound.arguments.get("N")
            ranges = []
            for name, value in bound.arguments.items():
                if isinstance(value, torch.Tensor):
                    start, end = _span(value)
                    n_rows = value.dim() >= 1 and value.shape[0] == n and value.data_ptr() not in self.per_launch
                    ranges.append((start, end, name, value.element_size(), n_rows))
            launches.append(_Launch(ex.fn.__name__, ranges))
            self.aten.paused += 1
            try:
                return saved[0](ex, *args, **kwargs)
            finally:
                self.aten.paused -= 1

        import numpy as np

        def record(b, ptrs, mask):
            addresses = np.asarray(ptrs.data)[np.asarray(mask.data, dtype=bool)].ravel().astype(np.uint64)
            size = ptrs.get_element_ty().primitive_bitwidth // 8
            launches[-1].accesses.append((b.grid_idx, addresses, size))

        def load(b, ptrs, mask, other, *rest):
            record(b, ptrs, mask)
            return saved[1](b, ptrs, mask, other, *rest)

        def store(b, ptrs, value, mask, *rest):
            record(b, ptrs, mask)
            return saved[2](b, ptrs, value, mask, *rest)

        executor.__call__, builder.create_masked_load, builder.create_masked_store = call, load, store
        try:
            with self.aten:
                yield self
        finally:
            executor.__call__, builder.create_masked_load, builder.create_masked_store = saved

    def count(self) -> Count:
        total = Count(self.aten.bytes, self.aten.bytes, self.aten.bytes)
        for launch in self.launches:
            total = total + _count_launch(launch)
        return total


def _count_launch(launch: _Launch) -> Count:
    import numpy as np

    starts = np.array([r[0] for r in launch.ranges], dtype=np.uint64)
    order = np.argsort(starts)
    requested = 0.0
    per_launch: dict[int, list] = defaultdict(list)  # range index -> address arrays
    per_program: dict[tuple, list] = defaultdict(list)  # (range index, program) -> address arrays
    for program, addresses, size in launch.accesses:
        if addresses.size == 0:
            continue
        requested += addresses.size * size
        slot = np.searchsorted(starts[order], addresses, side="right") - 1
        for j in np.unique(slot):
            idx = int(order[j])
            start, end, name, _, _ = launch.ranges[idx]
            mine = addresses[slot == j]
            if mine.min() < start or mine.max() >= end:
                raise RuntimeError(f"{launch.kernel}: an access outside {name}'s range")
            per_launch[idx].append(mine)
            per_program[(idx, program)].append(mine)
    distinct = model = 0.0
    for idx, arrays in per_launch.items():
        size, has_n_rows = launch.ranges[idx][3], launch.ranges[idx][4]
        d = np.unique(np.concatenate(arrays)).size * size
        distinct += d
        if not has_n_rows:
            model += d
    reread = 0.0
    for (idx, _), arrays in per_program.items():
        size, has_n_rows = launch.ranges[idx][3], launch.ranges[idx][4]
        if has_n_rows:
            every = np.concatenate(arrays)
            once = np.unique(every).size
            model += once * size
            reread += (every.size - once) * size
    return Count(requested, distinct, model, reread)


def count_triton(n, d, r, dtype, backward: bool, seed=0) -> tuple[Count, Count]:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("counting the Triton kernels needs TRITON_INTERPRET=1 before triton is imported: "
                           "run python -m fastadapter.cli.traffic")  # fmt: skip
    from fastadapter.kernels import adapter as kernels

    x, wd, bd, wu, bu = _inputs(n, d, r, dtype, seed)
    fwd = TritonCounter(per_launch=(wd, bd, wu, bu))
    with fwd.counting():
        y, z = kernels.adapter_forward(x, wd, bd, wu, bu, None, "gelu", 1.0, True)
    bwd = TritonCounter(per_launch=(wd, bd, wu, bu))
    if backward:
        dy = torch.randn_like(y)
        with bwd.counting():
            kernels.adapter_backward(dy, x, z, wd, bd, wu, bu, "gelu", 1.0, True, [True] * 5, H200_SMS)
    return fwd.count(), bwd.count()


# ----------------------------------------------------------------------------- eager PyTorch, per ATen op


class EagerCounter(TorchDispatchMode):
    """Each ATen op reads its tensor inputs and writes its tensor outputs; views are free."""

    # allocations (new_empty reads nothing of its tensor argument), views and no-op copies
    FREE = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias", "lift_fresh",
            "_to_copy_noop"}  # fmt: skip

    def __init__(self):
        super().__init__()
        self.bytes = 0.0
        self.ops: list[tuple[str, float]] = []
        self.paused = 0  # > 0: inside a Triton launch, whose traffic the interpreter counter has
        # ops not counted as a whole but by what they run inside: under a TritonCounter,
        # fastadapter's own ops (their kernels the interpreter counter sees)
        self.skip_namespaces: tuple[str, ...] = ()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in self.skip_namespaces and not self.paused:
            # not the op as a whole but what it does inside: its ATen ops (sums of partials,
            # sorts, casts) under this mode again, its kernels through the Triton counter
            device = "CUDA" if any(t.is_cuda for t in _tensors((args, kwargs))) else "CPU"
            with self:  # the op's own kernel, below this mode's dispatch key; what it calls, above
                return func.redispatch(torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, device)), *args,
                                       **(kwargs or {}))  # fmt: skip
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        view = func.is_view or name == "_unsafe_view"  # a view autograd does not track as one
        if self.paused or name in self.FREE or (view and _aliases(out, (args, kwargs))):
            return out
        moved = sum(t.numel() * t.element_size() for t in _tensors((args, kwargs)))
        moved += sum(t.numel() * t.element_size() for t in _tensors(out))
        self.bytes += moved
        self.ops.append((name, moved))
        return out


def _aliases(out, inputs) -> bool:
    """Whether every tensor of ``out`` shares storage with an input: a view. An op that may
    alias (``contiguous``, ``reshape``, as the ops inside a custom op see them) but copied
    moved bytes."""
    storages = {t.untyped_storage().data_ptr() for t in _tensors(inputs)}
    return all(t.untyped_storage().data_ptr() in storages for t in _tensors(out))


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for t in tree:
            yield from _tensors(t)
    elif isinstance(tree, dict):
        for t in tree.values():
            yield from _tensors(t)


def eager_adapter(x, w_down, b_down, w_up, b_up, scaling=1.0):
    """What a user writes by hand: down, activation, up, (scaling,) residual add."""
    u = F.linear(F.gelu(F.linear(x, w_down, b_down)), w_up, b_up)
    return x + u if scaling == 1.0 else torch.add(x, u, alpha=scaling)


def _count_module(fn, n, d, r, dtype, backward: bool) -> tuple[Count, Count]:
    params = [t.requires_grad_() for t in _inputs(n, d, r, dtype)]
    dy = torch.randn(n, d).to(dtype)
    fwd = EagerCounter()
    with fwd:
        y = fn(*params)
    bwd = EagerCounter()
    if backward:
        with bwd:
            torch.autograd.grad(y, params, dy)
    # per op, every input and output once: requested = distinct-per-op = model
    return Count(fwd.bytes, fwd.bytes, fwd.bytes), Count(bwd.bytes, bwd.bytes, bwd.bytes)


def count_eager(n, d, r, dtype, backward: bool) -> tuple[Count, Count]:
    return _count_module(eager_adapter, n, d, r, dtype, backward)


# ----------------------------------------------------------------------------- torch.compile, by Inductor's own count


def count_compile(n, d, r, dtype, backward: bool) -> tuple[Count, Count]:
    """Inductor's per-kernel byte count of the forward and backward graphs it compiles for
    these shapes (see ``_inductor_count``)."""
    return _inductor_count(eager_adapter, _inputs(n, d, r, dtype), trainable=5 if backward else 0)


def _inductor_count(fn, tensors, trainable: int) -> tuple[Count, Count]:
    """``GraphLowering.count_bytes`` (every generated kernel's buffer reads and writes, GEMMs
    included) summed over the forward and the backward graphs of ``torch.compile(fn)``, each
    graph compiled afresh (no cache); the first ``trainable`` tensors require grad."""
    from torch._inductor import compile_fx, config
    from torch._inductor.graph import GraphLowering

    counted = {False: 0, True: 0}  # is_backward -> bytes
    original = GraphLowering.count_bytes

    def count_bytes(self):
        out = original(self)
        counted[bool(self.is_backward)] += out[0]
        return out

    torch._dynamo.reset()
    GraphLowering.count_bytes = count_bytes
    log = compile_fx.inductor_metrics_log  # count_bytes runs where Inductor logs its metrics
    level, propagate = log.level, log.propagate
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        with config.patch(fx_graph_cache=False), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i, t in enumerate(tensors):
                t.requires_grad_(i < trainable)
            out = torch.compile(fn, dynamic=False)(*tensors)
            if trainable:
                outs = out if isinstance(out, tuple) else (out,)
                torch.autograd.grad(outs, tensors[:trainable], [torch.randn_like(o) for o in outs])
    finally:
        GraphLowering.count_bytes = original
        log.setLevel(level)
        log.propagate = propagate
        torch._dynamo.reset()
    fwd, bwd = counted[False], counted[True]
    return Count(fwd, fwd, fwd), Count(bwd, bwd, bwd)


# ----------------------------------------------------------------------------- C++/CUDA, from the loop structure


def count_cuda(n, d, r, dtype) -> tuple[Count, Count]:
    """csrc/adapter_cuda.cu at sm_90 with 132 SMs: forward per block of 16 rows (x staged
    through shared memory once, the residual re-read of the block's own rows, fp32 z and y
    written); backward a dz kernel per 16 rows (dy and z read, fp32 dz written) and a grad
    kernel over (row groups x 256-column blocks) in which every column block re-reads z and
    dz of its rows, and every group writes fp32 partials of dW_down, dW_up and db_up."""
    e, w = torch.finfo(dtype).bits // 8, 4 if dtype == torch.float32 else torch.finfo(dtype).bits // 8
    weights = 2 * d * r * w + (d + r) * w
    col_blocks = -(-d // 256)
    groups = max(1, min(n, -(-4 * H200_SMS // col_blocks)))
    groups = -(-n // -(-n // groups))
    x = y = dy = dx = n * d * e
    z = dz = n * r * 4
    # requested: the forward's x read twice (GEMM and residual); the grad kernel reads x
    # and dy once per 32-wide chunk of r (r / 32 passes over its rows) and z, dz per column block
    chunks = -(-r // 32)
    fwd_model = x + y + z + weights
    fwd_req = 2 * x + y + z + weights * -(-n // 16)
    partials = groups * (2 * d * r + d) * 4
    bwd_model = (dy + z + dz) + (dy + x + dx + col_blocks * (z + dz)) + 2 * weights + 2 * partials
    bwd_req = (dy + z + dz + weights * -(-n // 16)) + (chunks * (dy + x) + dy + dx + col_blocks * chunks * (z + dz))
    bwd_req += weights * groups + 2 * partials
    bwd_distinct = dy + z + dz + x + dx + 2 * weights + 2 * partials
    return Count(fwd_req, x + y + z + weights, fwd_model), Count(bwd_req, bwd_distinct, bwd_model)


def count_cpp(n, d, r) -> tuple[Count, Count]:
    """csrc/adapter_cpu.cpp in fp32 on an AVX-512 CPU, one op or kernel at a time: forward
    z = x W_d^T + b_d (x read), a = act(z), y = x + s (a W_u^T + b_u) (x read, y written);
    backward da = dy W_u (dy read), one pass for a and dz, dW_u = dy^T a (dy read),
    db_u = sum(dy) (dy read), db_d = sum(dz), dW_d = dz^T x (x read), dx = dy + dz W_d
    (dy read, dx written). Each of these is counted as one pass over its operands (the
    cache-blocked GEMMs re-read their small operand from cache)."""
    big, small, weight = n * d * 4, n * r * 4, d * r * 4
    fwd = (big + small + weight) + (2 * small) + (small + big + weight + big)
    bwd = (
        (big + small + weight)
        + (3 * small)
        + (big + small + weight)
        + big
        + small
        + (small + big + weight)
        + (small + big + weight + big)
    )
    return Count(fwd, fwd, fwd), Count(bwd, bwd, bwd)


# ----------------------------------------------------------------------------- the table


def _inputs(n, d, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    wd = (torch.randn(r, d, generator=g) / d**0.5).to(dtype)
    bd = (0.1 * torch.randn(r, generator=g)).to(dtype)
    wu = (torch.randn(d, r, generator=g) / r**0.5).to(dtype)
    bu = (0.1 * torch.randn(d, generator=g)).to(dtype)
    return x, wd, bd, wu, bu


FORMULAS = ("cuda", "cpp")  # evaluated at the reported N itself


# ----------------------------------------------------------------------------- the adapter site (adapter_layernorm)

SITE_EPS = 1e-12


def eager_site(h, r, w_down, b_down, w_up, b_up, ln_w, ln_b):
    """The houlsby site as a user writes it: the adapter, the residual adds, F.layer_norm."""
    return F.layer_norm(h + F.linear(F.gelu(F.linear(h, w_down, b_down)), w_up, b_up) + r, (h.shape[-1],), ln_w, ln_b, SITE_EPS)


def _site_inputs(n, d, r, dtype, seed=0):
    x, wd, bd, wu, bu = _inputs(n, d, r, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    res = torch.randn(n, d, generator=g).to(dtype)
    ln_w = (1 + 0.1 * torch.randn(d, generator=g)).to(dtype)
    ln_b = (0.1 * torch.randn(d, generator=g)).to(dtype)
    return x, res, wd, bd, wu, bu, ln_w, ln_b


def _count_site(fn, n, d, r, dtype, counter) -> tuple[Count, Count]:
    """fn(h, r, weights..., ln weights) forward and backward (h, r and the adapter train; the
    LayerNorm is frozen, as in a base model) under ``counter()``, a TritonCounter or EagerCounter."""
    ts = _site_inputs(n, d, r, dtype)
    for t in ts[:6]:
        t.requires_grad_()
    dout = torch.randn(n, d).to(dtype)
    per_launch = ts[2:]
    fwd = counter(per_launch)
    with fwd.counting() if isinstance(fwd, TritonCounter) else fwd:
        out = fn(*ts)
    bwd = counter(per_launch)
    with bwd.counting() if isinstance(bwd, TritonCounter) else bwd:
        torch.autograd.grad(out, ts[:6], dout)
    if isinstance(fwd, TritonCounter):
        return fwd.count(), bwd.count()
    return Count(fwd.bytes, fwd.bytes, fwd.bytes), Count(bwd.bytes, bwd.bytes, bwd.bytes)


def count_site(provider: str, n, d, r, dtype) -> tuple[Count, Count]:
    """One houlsby site (gelu, residual, LayerNorm), forward and backward, for ``provider``:
    eager (the composition, per ATen op), op+add+ln (the Triton adapter op, then the add and
    F.layer_norm as ATen ops) or triton (fastadapter.adapter_layernorm's Triton kernels)."""
    import fastadapter as fa

    if provider == "eager":
        return _count_site(eager_site, n, d, r, dtype, lambda _: EagerCounter())
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("counting the Triton kernels needs TRITON_INTERPRET=1 before triton is imported")

    def op_add_ln(h, res, wd, bd, wu, bu, lw, lb):
        y = fa.fused_adapter(h, wd, bd, wu, bu, activation="gelu", backend="triton")
        return F.layer_norm(y + res, (h.shape[-1],), lw, lb, SITE_EPS)

    def site(*t):
        return fa.adapter_layernorm(*t, placement="houlsby", eps=SITE_EPS, activation="gelu", backend="triton")

    from unittest import mock

    from fastadapter.kernels import adapter_layernorm as kernels

    fn = {"op+add+ln": op_add_ln, "triton": site}[provider]
    with mock.patch.object(kernels, "ROUND_DV_IN_TORCH", False):  # the bytes of the GPU path: dv stored in bf16
        return _count_site(fn, n, d, r, dtype, lambda per_launch: TritonCounter(per_launch=per_launch))


def count_site_compile(n, d, r, dtype) -> tuple[Count, Count]:
    return _inductor_count(eager_site, _site_inputs(n, d, r, dtype), trainable=6)


# ----------------------------------------------------------------------------- the decoder site (adapter_rmsnorm)

RMS_EPS = 1e-5


def _llama_rms_norm(y, w):
    """Llama's RMSNorm as its module writes it (statistics in fp32, cast before the weight)."""
    yf = y.to(torch.float32)
    return w * (yf * torch.rsqrt(yf.pow(2).mean(-1, keepdim=True) + RMS_EPS)).to(y.dtype)


def eager_rms_site(f, x, w_down, b_down, w_up, b_up, norm_w):
    """The houlsby decoder site as a user writes it: the adapter, the residual adds, Llama's RMSNorm."""
    y = x + f + F.linear(F.gelu(F.linear(f, w_down, b_down)), w_up, b_up)
    return y, _llama_rms_norm(y, norm_w)


def _rms_site_inputs(n, d, r, dtype, seed=0):
    f, wd, bd, wu, bu = _inputs(n, d, r, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, d, generator=g).to(dtype)
    return f, x, wd, bd, wu, bu, (1 + 0.1 * torch.randn(d, generator=g)).to(dtype)


def count_rms_site(provider: str, n, d, r, dtype) -> tuple[Count, Count]:
    """One houlsby decoder site (gelu, residual, RMSNorm; both outputs reach the loss, the norm
    frozen), forward and backward, for ``provider``: eager (the composition, per ATen op),
    op+add+rms (the Triton adapter op with x + F as its residual, then F.rms_norm as ATen
    ops) or triton (fastadapter.adapter_rmsnorm's Triton kernels)."""
    import fastadapter as fa

    def run(fn, counter):
        ts = _rms_site_inputs(n, d, r, dtype)
        for t in ts[:6]:
            t.requires_grad_()
        g = torch.Generator().manual_seed(7)
        grads = (torch.randn(n, d, generator=g).to(dtype), torch.randn(n, d, generator=g).to(dtype))
        fwd = counter(ts[2:])
        with fwd.counting() if isinstance(fwd, TritonCounter) else fwd:
            outs = fn(*ts)
        bwd = counter(ts[2:])
        with bwd.counting() if isinstance(bwd, TritonCounter) else bwd:
            torch.autograd.grad(outs, ts[:6], grads)
        if isinstance(fwd, TritonCounter):
            return fwd.count(), bwd.count()
        return Count(fwd.bytes, fwd.bytes, fwd.bytes), Count(bwd.bytes, bwd.bytes, bwd.bytes)

    if provider == "eager":
        return run(eager_rms_site, lambda _: EagerCounter())
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("counting the Triton kernels needs TRITON_INTERPRET=1 before triton is imported")

    def op_add_rms(f, x, wd, bd, wu, bu, w):
        y = fa.fused_adapter(f, wd, bd, wu, bu, activation="gelu", residual=x + f, backend="triton")
        return y, F.rms_norm(y, (d,), w, RMS_EPS)

    def site(*t):
        return fa.adapter_rmsnorm(*t, placement="houlsby", eps=RMS_EPS, activation="gelu", backend="triton")

    from unittest import mock

    from fastadapter.kernels import adapter_rmsnorm as kernels

    fn = {"op+add+rms": op_add_rms, "triton": site}[provider]
    with mock.patch.object(kernels, "ROUND_IN_TORCH", False):  # the bytes of the GPU path: dv stored in bf16
        return run(fn, lambda per_launch: TritonCounter(per_launch=per_launch))


def count_rms_site_compile(n, d, r, dtype) -> tuple[Count, Count]:
    return _inductor_count(eager_rms_site, _rms_site_inputs(n, d, r, dtype), trainable=6)


# ----------------------------------------------------------------------------- many adapters in a batch (mixed_adapter)

MIXED_ADAPTERS = 4


def _mixed_inputs(n, d, r, dtype, adapters, seed=0):
    """x, the stacked weights of ``adapters`` adapters and an index spreading the rows evenly
    and randomly over them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    wd = (torch.randn(adapters, r, d, generator=g) / d**0.5).to(dtype)
    bd = (0.1 * torch.randn(adapters, r, generator=g)).to(dtype)
    wu = (torch.randn(adapters, d, r, generator=g) / r**0.5).to(dtype)
    bu = (0.1 * torch.randn(adapters, d, generator=g)).to(dtype)
    index = torch.arange(n) % adapters
    return x, index[torch.randperm(n, generator=g)], wd, bd, wu, bu


def eager_mixed(x, index, w_down, b_down, w_up, b_up):
    """A loop over the adapters as a user writes it: each adapter's rows gathered, the eager
    adapter, the result written into its rows in place."""
    y = x.clone()
    for a in range(w_down.shape[0]):
        rows = (index == a).nonzero().view(-1)
        y.index_copy_(0, rows, eager_adapter(x.index_select(0, rows), w_down[a], b_down[a], w_up[a], b_up[a]))
    return y


def count_mixed(provider: str, n, d, r, dtype, adapters=MIXED_ADAPTERS) -> tuple[Count, Count]:
    """``adapters`` adapters over N rows (gelu, residual x, every gradient), forward and
    backward: eager (the loop over adapters, per ATen op), adapter (one adapter over the same
    rows: the Triton adapter op, the floor) or triton (fastadapter.mixed_adapter's kernels)."""
    import fastadapter as fa

    x, index, wd, bd, wu, bu = _mixed_inputs(n, d, r, dtype, adapters)
    weights = [wd, bd, wu, bu] if provider != "adapter" else [wd[0], bd[0], wu[0], bu[0]]  # adapter 0's, alone
    ts = [t.clone().requires_grad_() for t in (x, *weights)]
    if provider == "eager":
        fwd, bwd = EagerCounter(), EagerCounter()
        fn = eager_mixed
    else:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("counting the Triton kernels needs TRITON_INTERPRET=1 before triton is imported")
        fwd, bwd = TritonCounter(per_launch=ts[1:]), TritonCounter(per_launch=ts[1:])
        if provider == "adapter":

            def fn(x_, _index, *w):
                return fa.fused_adapter(x_, *w, activation="gelu", backend="triton")
        else:

            def fn(x_, index_, *w):
                return fa.mixed_adapter(x_, index_, *w, activation="gelu", backend="triton")

    dy = torch.randn(n, d).to(dtype)
    with fwd.counting() if isinstance(fwd, TritonCounter) else fwd:
        y = fn(ts[0], index, *ts[1:])
    with bwd.counting() if isinstance(bwd, TritonCounter) else bwd:
        torch.autograd.grad(y, ts, dy)
    if isinstance(fwd, TritonCounter):
        return fwd.count(), bwd.count()
    return Count(fwd.bytes, fwd.bytes, fwd.bytes), Count(bwd.bytes, bwd.bytes, bwd.bytes)


def measure(ns, d, r, dtype, providers, at, op: str = "adapter") -> dict:
    """{provider: {n: (forward Count, backward Count)}} in bytes; formula providers at ``at`` only."""
    out: dict[str, dict[int, tuple[Count, Count]]] = {}
    for p in providers:
        out[p] = {}
        for n in [at] if p in FORMULAS else ns:
            if op == "adapter_layernorm":
                out[p][n] = count_site_compile(n, d, r, dtype) if p == "compile" else count_site(p, n, d, r, dtype)
            elif op == "adapter_rmsnorm":
                out[p][n] = count_rms_site_compile(n, d, r, dtype) if p == "compile" else count_rms_site(p, n, d, r, dtype)
            elif op == "mixed_adapter":
                out[p][n] = count_mixed(p, n, d, r, dtype)
            elif p == "eager":
                out[p][n] = count_eager(n, d, r, dtype, True)
            elif p == "compile":
                out[p][n] = count_compile(n, d, r, dtype, True)
            elif p == "triton":
                out[p][n] = count_triton(n, d, r, dtype, True)
            elif p == "cuda":
                out[p][n] = count_cuda(n, d, r, dtype)
            elif p == "cpp":
                out[p][n] = count_cpp(n, d, r)
    return out


def _fit(ns, values):
    """Least-squares line a*n + b through (n, value); returns (a, b, worst relative residual)."""
    import numpy as np

    a, b = np.polyfit(np.array(ns, dtype=float), np.array(values, dtype=float), 1)
    resid = max(abs(a * n + b - v) / max(abs(v), 1.0) for n, v in zip(ns, values))
    return a, b, resid


def extrapolate(counts: dict[int, tuple[Count, Count]], at: int) -> tuple[Count, Count, float]:
    ns = sorted(counts)
    if ns == [at]:
        return counts[at][0], counts[at][1], 0.0
    result = []
    worst = 0.0
    for part in (0, 1):
        fields = {}
        for f in ("requested", "distinct", "model", "reread"):
            vals = [getattr(counts[n][part], f) for n in ns]
            if len(ns) == 1:
                fields[f] = vals[0] * at / ns[0]
                continue
            a, b, resid = _fit(ns, vals)
            worst = max(worst, resid)
            fields[f] = a * at + b
        result.append(Count(**fields))
    return result[0], result[1], worst


def table(results: dict, d: int, r: int, dtype: torch.dtype, at: int, what: str = "gelu, residual x") -> str:
    e = torch.finfo(dtype).bits // 8
    lines = [
        f"Passes over an N x d tensor ({str(dtype).replace('torch.', '')}, d={d}, r={r}, {what}), "
        f"at N={at}: counted providers from the line through their counts at N="
        f"{', '.join(str(n) for n in sorted(next(c for p, c in results.items() if p not in FORMULAS)))}, formulas at N={at}; "
        f"predicted time: model bytes / {H200_COPY_BYTES_PER_S / 1e12:.1f} TB/s (H200 copy).",
        "",
        "| provider | fwd requested | fwd distinct | fwd model | bwd requested | bwd distinct | bwd model | "
        "fwd+bwd model | vs eager (model) | re-read in a program fwd / bwd | predicted fwd+bwd us | linear fit worst residual |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    eager_total = None
    rows = []
    for p, counts in results.items():
        fwd, bwd, resid = extrapolate(counts, at)
        ee = 4 if p == "cpp" else e
        unit = at * d * ee
        total = (fwd.model + bwd.model) / unit
        if p == "eager":
            eager_total = total
        rows.append((p, fwd, bwd, unit, total, resid))
    for p, fwd, bwd, unit, total, resid in rows:
        ratio = f"{total / eager_total:.2f}x" if eager_total and p != "cpp" else ("(fp32)" if p == "cpp" else "")
        us = (fwd.model + bwd.model) / H200_COPY_BYTES_PER_S * 1e6
        lines.append(
            f"| {p} | {fwd.requested / unit:.2f} | {fwd.distinct / unit:.2f} | {fwd.model / unit:.2f} | "
            f"{bwd.requested / unit:.2f} | {bwd.distinct / unit:.2f} | {bwd.model / unit:.2f} | {total:.2f} | {ratio} | "
            f"{fwd.reread / unit:.2f} / {bwd.reread / unit:.2f} | {'' if p == 'cpp' else f'{us:.1f}'} | {resid:.1e} |"
        )
    return "\n".join(lines)


def per_n_table(results: dict, d: int, dtype: torch.dtype) -> str:
    e = torch.finfo(dtype).bits // 8
    lines = ["| provider | N | fwd model | bwd model | fwd+bwd model |", "|---|---|---|---|---|"]
    for p, counts in results.items():
        for n, (fwd, bwd) in sorted(counts.items()):
            unit = n * d * (4 if p == "cpp" else e)
            lines.append(
                f"| {p} | {n} | {fwd.model / unit:.3f} | {bwd.model / unit:.3f} | {(fwd.model + bwd.model) / unit:.3f} |"
            )
    return "\n".join(lines)


def summary(results: dict, d: int, r: int, dtype: torch.dtype, at: int) -> dict:
    """Passes over N x d by the model at ``at``, per provider: what ``fastadapter bench`` plots."""
    e = torch.finfo(dtype).bits // 8
    out = {"d": d, "r": r, "N": at, "dtype": str(dtype).replace("torch.", ""), "passes": {}}
    for p, counts in results.items():
        fwd, bwd, _ = extrapolate(counts, at)
        unit = at * d * (4 if p == "cpp" else e)
        out["passes"][p] = {"fwd": fwd.model / unit, "bwd": bwd.model / unit}
    return out


DEFAULT_PROVIDERS = {
    "adapter": ["eager", "compile", "triton", "cuda", "cpp"],
    "adapter_layernorm": ["eager", "compile", "op+add+ln", "triton"],
    "adapter_rmsnorm": ["eager", "compile", "op+add+rms", "triton"],
    "mixed_adapter": ["eager", "adapter", "triton"],
}


def main(argv=None) -> int:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: counts run under its interpreter
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--n", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--at", type=int, default=32768, help="N of the reported figures (DESIGN.md's H200 shape)")
    p.add_argument("--op", default="adapter", choices=["adapter", "adapter_layernorm", "adapter_rmsnorm", "mixed_adapter"],
                   help="adapter_layernorm: one houlsby site (adapter, residual, LayerNorm; the LayerNorm frozen); "
                        "adapter_rmsnorm: one houlsby decoder site (adapter, residual, RMSNorm; the norm frozen); "
                        f"mixed_adapter: {MIXED_ADAPTERS} adapters over the rows")  # fmt: skip
    p.add_argument("--providers", nargs="+", default=None,
                   help="default: eager compile triton cuda cpp; for the site eager compile op+add+ln triton; for the "
                        "decoder site eager compile op+add+rms triton; for mixed_adapter eager adapter triton")  # fmt: skip
    p.add_argument("--json", help="write the raw counts here")
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype]
    providers = args.providers or DEFAULT_PROVIDERS[args.op]
    results = measure(args.n, args.d, args.r, dtype, providers, args.at, args.op)
    what = {
        "adapter": "gelu, residual x",
        "adapter_layernorm": "one houlsby site: gelu adapter, residual, frozen LayerNorm",
        "adapter_rmsnorm": "one houlsby decoder site: gelu adapter, residual, frozen RMSNorm, y and its norm to the loss",
        "mixed_adapter": f"{MIXED_ADAPTERS} gelu adapters over the rows, residual x; adapter: one over the same rows",
    }[args.op]
    print(table(results, args.d, args.r, dtype, args.at, what))
    print()
    print(per_n_table(results, args.d, dtype))
    if args.json:
        raw = {p: {n: [dataclasses.asdict(c) for c in v] for n, v in c.items()} for p, c in results.items()}
        with open(args.json, "w") as f:
            doc = {"d": args.d, "r": args.r, "dtype": args.dtype, "counts": raw}
            doc["summary"] = summary(results, args.d, args.r, dtype, args.at)
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
