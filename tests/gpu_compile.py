"""Compile the Triton kernels for real GPUs on a machine without one, and read the cubins.

The Triton interpreter checks what a kernel computes, not whether the GPU compiler
accepts it or how many registers it needs. This module runs a backend's own launchers
(any code that launches ``@triton.jit`` kernels, autotuned or not) under a driver that
has a GPU target but no GPU: every launch compiles, for every autotuning config the
kernel's pruner keeps, through Triton's compiler and ptxas (which ship inside the
triton wheel), and nothing runs. From each cubin, ``cuobjdump`` gives the registers,
the stack frame (spill space) and the shared memory, and the SASS whether the
products run on tensor cores (HMMA on sm_80; HGMMA, the wgmma form, or HMMA on sm_90).

    python -m tests.gpu_compile [--target 80 --target 90] [--json FILE] tests.test_adapter ...

compiles the launches that each named module's ``gpu_launches()`` yields and prints the
table; tests/test_gpu_compile.py runs it for every op and fails on a compile error, a
spill or a half-precision product off the tensor cores. Must run in a process without
TRITON_INTERPRET=1 (which replaces @triton.jit by the interpreter at import).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterable, Optional

TARGETS = (80, 90)  # A100 and H100/H200 class


@dataclasses.dataclass
class Row:
    kernel: str
    target: int
    config: str  # the autotuning config: BLOCK_* values, warps, stages
    constexprs: str  # the launch's other compile-time arguments
    tensor_core_expected: bool  # a product (tt.dot) in fp16/bf16, or in fp32 with TF32
    error: Optional[str] = None
    registers: Optional[int] = None
    stack: Optional[int] = None
    shared: Optional[int] = None
    tensor_core: Optional[bool] = None  # HMMA / HGMMA in the SASS
    note: str = ""  # what the launch was for (the scenario that first produced it)
    block_r: Optional[int] = None
    products: Optional[int] = None  # products in the TTGIR (tt.dot, ttng.warp_group_dot)
    products_mma: Optional[int] = None  # of them, those laid out for the tensor cores (#mma result)

    @property
    def key(self):
        return (self.kernel, self.target, self.config, self.constexprs)


def _bin(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _driver(target: int):
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class CompileOnlyDriver(DriverBase):
        """A GPU target with no GPU behind it: enough for Triton to compile, nothing to launch."""

        def __init__(self):
            self.target = GPUTarget("cuda", target, 32)

        @classmethod
        def is_active(cls):
            return False

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_current_target(self):
            return self.target

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise RuntimeError("compile-only driver: nothing runs")

        def get_current_device(self):
            return target  # one kernel cache per target inside each JITFunction

        def get_current_stream(self, device=None):
            return 0

    return CompileOnlyDriver()


_CONSTEXPR_SKIP = {"debug", "instrumentation_mode"}


def _describe(fn, args, kwargs, config) -> tuple[str, str, bool, Optional[int]]:
    """(config, constexprs, tensor_core_expected, BLOCK_R) of one launch."""
    import torch

    names = list(fn.arg_names)
    bound = dict(zip(names, args))
    bound.update(kwargs)
    if config is not None:
        bound.update(config.all_kwargs())
    constexpr_names = [p.name for p in fn.params if p.is_constexpr]
    meta = {k: v for k, v in config.kwargs.items()} if config is not None else {}
    warps = config.num_warps if config is not None else kwargs.get("num_warps", 4)
    stages = config.num_stages if config is not None else kwargs.get("num_stages", 3)
    conf = " ".join(f"{k}={v}" for k, v in meta.items()) + f" w{warps} s{stages}"
    consts = []
    for k in constexpr_names:
        if k in meta or k in _CONSTEXPR_SKIP:
            continue
        consts.append(f"{k}={bound.get(k)}")
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    half = first is not None and first.dtype in (torch.float16, torch.bfloat16)
    tc = half or bound.get("PRECISION") == "tf32"
    consts.append(f"x={str(first.dtype).replace('torch.', '') if first is not None else '?'}")
    # the integer arguments as Triton specializes them (1, a multiple of 16, or neither):
    # launches that differ only there still compile to different code
    ints = [p.name for p in fn.params if not p.is_constexpr and isinstance(bound.get(p.name), int)]
    spec = "".join("1" if bound[k] == 1 else ("d" if bound[k] % 16 == 0 else "n") for k in ints)
    consts.append(f"ints={spec}")
    return conf, " ".join(consts), tc, bound.get("BLOCK_R")


@contextlib.contextmanager
def compiling(target: int, rows: list[Row], note: str):
    """Within the block, kernel launches compile for ``target`` (every config an autotuned
    kernel's pruner keeps) and append their Rows; nothing is launched."""
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    def compile_one(fn, args, kwargs, config):
        conf, consts, tc, block_r = _describe(fn, args, kwargs, config)
        row = Row(fn.__name__, target, conf, consts, tc, note=note, block_r=block_r)
        extra = config.all_kwargs() if config is not None else {}
        try:
            kernel = run(fn, *args, **{**kwargs, **extra, "warmup": True})
            row.__dict__["_cubin"] = kernel.asm["cubin"]
            row.products, row.products_mma = count_products(kernel.asm["ttgir"])
            # half (or TF32) operands: a product belongs on tensor cores, unless the kernel's
            # module declares this variant product-free and its TTIR has no tt.dot
            has_dot = "tt.dot " in kernel.asm["ttir"]
            free = _declared_product_free(fn, args, kwargs, extra)
            row.tensor_core_expected = expects_tensor_cores(kernel.asm["ttir"]) or (tc and (has_dot or not free))
        except Exception as exc:  # a compile error is a result, not a crash
            lines = [line for line in str(exc).splitlines() if line.strip()]
            row.error = f"{type(exc).__name__}: {' '.join(lines[-3:])[:400]}"
        rows.append(row)

    def autotuned_run(self, *args, **kwargs):
        kwargs.pop("warmup", None)
        self.nargs = dict(zip(self.arg_names, args))
        try:
            for config in self.prune_configs(kwargs):
                compile_one(self.fn, args, kwargs, config)
        finally:
            self.nargs = None

    def jit_run(self, *args, grid, warmup, **kwargs):
        compile_one(self, args, {**kwargs, "grid": grid}, None)

    run = JITFunction.run
    saved = (Autotuner.run, JITFunction.run, driver._active)
    driver.set_active(_driver(target))
    Autotuner.run = autotuned_run
    JITFunction.run = jit_run
    try:
        yield
    finally:
        Autotuner.run, JITFunction.run, driver._active = saved


def _declared_product_free(fn, args, kwargs, extra) -> bool:
    """Whether the kernel's module lists this launch in NO_PRODUCT_VARIANTS ({kernel name:
    {constexpr: value}}: the variants with those values have no product by design)."""
    variants = getattr(sys.modules.get(fn.fn.__module__), "NO_PRODUCT_VARIANTS", {})
    if fn.__name__ not in variants:
        return False
    bound = dict(zip(fn.arg_names, args))
    bound.update(kwargs)
    bound.update(extra)
    return all(bound.get(k) == v for k, v in variants[fn.__name__].items())


_PRODUCT = re.compile(r"=\s*(tt\.dot|ttng\.warp_group_dot)\s")
_MMA_RESULT = re.compile(r"->\s*tensor<[^>]*#mma\d*>")


def count_products(ttgir: str) -> tuple[int, int]:
    """(products, products on the tensor cores) in a kernel's TTGIR: each tt.dot (sm_80's
    mma.sync) or ttng.warp_group_dot (sm_90's wgmma); one is on the tensor cores when its
    result has an NVIDIA MMA layout (#mma), and on the CUDA cores (FMA) when it is #blocked."""
    total = mma = 0
    for line in ttgir.splitlines():
        if _PRODUCT.search(line):
            total += 1
            mma += _MMA_RESULT.search(line) is not None
    return total, mma


def expects_tensor_cores(ttir: str) -> bool:
    """Whether the kernel has a product that belongs on tensor cores: a tt.dot of fp16/bf16
    operands, or of fp32 operands at TF32 precision (IEEE fp32 products run on CUDA cores)."""
    for line in ttir.splitlines():
        if "tt.dot " not in line:
            continue
        m = re.search(r"tt\.dot .*?:\s*tensor<[\dx]*x(\w+)>", line)
        if m is None:
            continue
        elem = m.group(1)
        precision = re.search(r"inputPrecision\s*=\s*(\w+)", line)
        if elem in ("bf16", "f16") or (elem == "f32" and precision is not None and precision.group(1) in ("tf32", "tf32x3")):
            return True
    return False


_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)")


def inspect_cubin(row: Row, cubin: bytes) -> None:
    """Registers, stack frame and shared memory (cuobjdump --dump-resource-usage), and
    whether the SASS holds tensor-core instructions."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        usage = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True, check=True)
        sass = subprocess.run([_bin("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    m = _USAGE.search(usage.stdout)
    if m is None:
        row.error = f"cuobjdump gave no resource usage: {usage.stdout[-300:]}"
        return
    row.registers, row.stack, row.shared = (int(v) for v in m.groups())
    row.tensor_core = re.search(r"\bH(G)?MMA\b", sass) is not None


def run_launches(launches: Iterable[tuple[str, Callable[[], object]]], targets=TARGETS) -> list[Row]:
    """Compile every launch for every target; one Row per distinct (kernel, target, config,
    constexprs), in first-seen order."""
    import triton  # noqa: F401  (imports the real @triton.jit, not the interpreter)

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: under the interpreter nothing compiles for a GPU")
    launches = list(launches)
    seen: dict[tuple, Row] = {}
    for target in targets:
        for note, launch in launches:
            rows: list[Row] = []
            with compiling(target, rows, note):
                launch()
            for row in rows:
                if row.key in seen:
                    continue
                cubin = row.__dict__.pop("_cubin", None)
                if cubin is not None:
                    inspect_cubin(row, cubin)
                seen[row.key] = row
    return list(seen.values())


# Spills that do not fail the check: (kernel, target, a substring of its config) -> why the
# spill is accepted there. Empty: any spill, at any BLOCK_R, fails.
SPILLS_ALLOWED: dict[tuple[str, int, str], str] = {}


def _allowed_spill(row: Row) -> Optional[str]:
    for (kernel, target, config), why in SPILLS_ALLOWED.items():
        if row.kernel == kernel and row.target == target and config in row.config:
            return why
    return None


class _Watched(list):
    """A list of autotuning configs that notes its table key when a pruner reads it."""

    def __init__(self, items, key, reached: set):
        super().__init__(items)
        self.key, self.reached = key, reached

    def __iter__(self):
        self.reached.add(self.key)
        return super().__iter__()


def watch_config_tables(prefix: str = "fastadapter.kernels.") -> dict[str, tuple[list, set]]:
    """Each config table of the loaded kernel modules (a dict named ``*_CONFIGS``: the lists
    a pruner chooses from, by kind of product and BLOCK_R or launch role), watched in place
    so that every pruner's read of a list is noted: {"module.NAME": (its keys, keys reached)}.
    A table imported into another module is the same dict, watched once."""
    tables: dict[str, tuple[list, set]] = {}
    for name, module in sorted(sys.modules.items()):
        if not name.startswith(prefix) or module is None:
            continue
        for attr, table in sorted(vars(module).items()):
            if not (attr.endswith("_CONFIGS") and isinstance(table, dict)):
                continue
            if table and all(isinstance(v, _Watched) for v in table.values()):
                continue  # an alias of a table already watched
            reached: set = set()
            for key in list(table):
                table[key] = _Watched(table[key], key, reached)
            tables[f"{name.rsplit('.', 1)[1]}.{attr}"] = (list(table), reached)
    return tables


def unreached(tables: dict) -> list[str]:
    """The table entries no launch made a pruner choose from."""
    return [f"{label}[{key}]" for label, (keys, reached) in tables.items() for key in keys if tuple(key) not in reached]


def failures(rows: list[Row]) -> tuple[list[str], list[str]]:
    """(failures, notes). Failures: compile errors; any spill not in SPILLS_ALLOWED; in a
    launch whose products belong on the tensor cores (fp16/bf16 operands, or TF32), any
    product laid out off them (one IEEE fp32 product in a half-precision kernel fails it
    even where the others are on the tensor cores), or no tensor-core instruction in the
    SASS at all. Notes: the allowed spills, with their reasons."""
    bad, notes = [], []
    for row in rows:
        where = f"{row.kernel} sm_{row.target} [{row.config}] {row.constexprs}"
        if row.error is not None:
            bad.append(f"compile error: {where}: {row.error}")
            continue
        if row.stack:
            why = _allowed_spill(row)
            if why is None:
                bad.append(f"spill: {where}: {row.stack} bytes of stack, {row.registers} registers")
            else:
                notes.append(f"allowed spill: {where}: {row.stack} bytes of stack ({why})")
        if row.tensor_core_expected and not row.tensor_core:
            bad.append(f"no tensor-core instruction: {where}")
        elif row.tensor_core_expected and row.products is not None and row.products_mma < row.products:
            off = row.products - row.products_mma
            bad.append(f"product off the tensor cores: {where}: {off} of {row.products} products not on MMA")
    return bad, notes


def table(rows: list[Row]) -> str:
    out = [
        "| kernel | target | config | constexprs | registers | stack | shared | tensor cores | products on MMA |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.error is not None:
            out.append(f"| {r.kernel} | sm_{r.target} | {r.config} | {r.constexprs} | ERROR | | | {r.error[:120]} | |")
            continue
        tc = "yes" if r.tensor_core else ("NO" if r.tensor_core_expected else "-")
        out.append(f"| {r.kernel} | sm_{r.target} | {r.config} | {r.constexprs} | {r.registers} | {r.stack} | {r.shared} | "
                   f"{tc} | {r.products_mma}/{r.products} |")  # fmt: skip
    return "\n".join(out)


def summary(rows: list[Row]) -> str:
    """Per kernel and target: variants, register range, the largest stack."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.kernel, r.target), []).append(r)
    out = [
        "| kernel | target | variants | errors | registers (min-max) | max stack | spilling variants |",
        "|---|---|---|---|---|---|---|",
    ]
    for (kernel, target), rs in groups.items():
        ok = [r for r in rs if r.error is None]
        regs = f"{min(r.registers for r in ok)}-{max(r.registers for r in ok)}" if ok else "-"
        out.append(
            f"| {kernel} | sm_{target} | {len(rs)} | {len(rs) - len(ok)} | {regs} | {max((r.stack for r in ok), default=0)} | "
            f"{sum(1 for r in ok if r.stack)} |"
        )
    return "\n".join(out)


def _in_processes(modules, targets, jobs) -> tuple[list[Row], int]:
    """Each of ``jobs`` processes compiles every jobs-th launch; rows merged in launch order."""
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i in range(jobs):
            out = os.path.join(tmp, f"{i}.json")
            cmd = [sys.executable, "-m", "tests.gpu_compile", *modules, "--shard", f"{i}/{jobs}", "--json", out,
                   "--tables", out + ".tables"]  # fmt: skip
            cmd += [a for t in targets for a in ("--target", str(t))]
            procs.append((out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        rows: dict[tuple, Row] = {}
        tables: dict[str, tuple[list, set]] = {}
        launches = 0
        for out, proc in procs:
            text, _ = proc.communicate()
            if not os.path.exists(out):
                raise RuntimeError(f"a compile process failed:\n{text[-3000:]}")
            launches += int(re.search(r"from (\d+) launches", text).group(1))
            for r in json.load(open(out)):
                row = Row(**r)
                rows.setdefault(row.key, row)
            for label, t in json.load(open(out + ".tables")).items():
                keys, reached = tables.setdefault(label, ([tuple(k) for k in t["keys"]], set()))
                reached.update(tuple(k) for k in t["reached"])
        return list(rows.values()), launches, tables


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("modules", nargs="+", help="modules with a gpu_launches() generator, e.g. tests.test_adapter")
    p.add_argument("--target", type=int, action="append", help="compute capability x10 (default: 80 and 90)")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--tables", help="write each config table's keys and the keys the launches reached here")
    p.add_argument("--full", action="store_true", help="print every variant, not only the summary")
    p.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    p.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)  # i/n: this process's share of the launches
    args = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    start = time.perf_counter()
    targets = tuple(args.target or TARGETS)
    if args.jobs > 1:
        rows, n_launches, tables = _in_processes(args.modules, targets, args.jobs)
    else:
        launches = []
        for name in args.modules:
            launches.extend(importlib.import_module(name).gpu_launches())
        tables = watch_config_tables()  # the kernel modules are loaded now
        i, n = (int(v) for v in args.shard.split("/"))
        mine = [(note, fn) for j, (note, fn) in enumerate(launches) if j % n == i]
        n_launches = len(mine)
        rows = run_launches(mine, targets)
    launches = range(n_launches)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
    if args.tables:
        with open(args.tables, "w") as f:
            json.dump({k: {"keys": keys, "reached": sorted(reached, key=str)} for k, (keys, reached) in tables.items()}, f)
    print(summary(rows))
    if args.full:
        print()
        print(table(rows))
    bad, notes = failures(rows)
    if args.shard == "0/1":  # the whole list: every config table entry must have been compiled
        bad += [f"config table entry no launch reached: {e}" for e in unreached(tables)]
    print(f"\n{len(rows)} variants from {len(launches)} launches in {time.perf_counter() - start:.0f} s; {len(bad)} failures")
    for line in notes:
        print("NOTE", line)
    for line in bad:
        print("FAIL", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
