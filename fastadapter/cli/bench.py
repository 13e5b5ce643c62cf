"""Side-by-side timing of the adapter op: eager PyTorch, ``torch.compile`` of the same code,
every fastadapter backend that runs here, the bare GEMMs (the floor) and, on a GPU, a
device copy (the bandwidth reference).

Every provider of a case is timed in each round, in a rotating order, so that drift on a
shared machine hits all of them alike; medians are reported. On the CPU each provider's
minor page faults per call are counted too: with glibc, a process whose freed heap grows
past the trim threshold hands its pages back and faults them in again on the next call,
and that can double a provider's time (it depends on the process's allocation history,
not on the provider alone). Used by ``fastadapter bench`` and by benchmarks/ (pytest).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from .. import backends
from ..ops.adapter import fused_adapter

ACTIVATION = "gelu"
SCALING = 1.0


# ----------------------------------------------------------------------------- timing


def _minor_faults() -> int:
    if sys.platform == "win32":
        return 0
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _time_cpu(fn: Callable[[], object], iters: int) -> tuple[float, float]:
    f0 = _minor_faults()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    elapsed = (time.perf_counter() - start) / iters
    return elapsed, (_minor_faults() - f0) / iters


def _time_cuda(fn: Callable[[], object], iters: int) -> tuple[float, float]:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters, 0.0


def interleaved(fns: dict[str, Callable[[], object]], device: str, rounds: int, iters: int, warmup: int = 2) -> dict:
    """Median seconds per call of each provider, timed in ``rounds`` rotating rounds."""
    timer = _time_cuda if device == "cuda" else _time_cpu
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    if device == "cuda":
        torch.cuda.synchronize()
    samples: dict[str, list[float]] = {n: [] for n in names}
    faults: dict[str, list[float]] = {n: [] for n in names}
    for i in range(rounds):
        order = names[i % len(names) :] + names[: i % len(names)]
        if i % 2:
            order.reverse()
        for name in order:
            t, f = timer(fns[name], iters)
            samples[name].append(t)
            faults[name].append(f)
    out = {}
    for n, s in samples.items():
        out[n] = {"median_s": statistics.median(s), "samples": len(s)}
        if device != "cuda":
            out[n]["page_faults_per_call"] = statistics.median(faults[n])
    return out


def side_by_side(fns: dict[str, Callable[[], object]], device: str, base: str, grad: bool,
                 rounds: Optional[int] = None, target_s: Optional[float] = None) -> dict:  # fmt: skip
    """The providers of one benchmark case timed side by side: a first call of each (compiles,
    caches, autotunes, builds), calls per sample sized on ``base``'s time (``target_s`` a
    sample: by default 20 ms on a GPU, 100 ms on a CPU), then :func:`interleaved` in
    ``rounds`` rounds (by default FASTADAPTER_BENCH_ROUNDS, else 15 on a GPU and 9 on a CPU),
    with autograd on where ``grad``, else under no_grad."""
    with torch.enable_grad() if grad else torch.no_grad():
        for fn in fns.values():
            fn()
        iters = iterations(fns[base], device, target_s or (0.02 if device == "cuda" else 0.1))
        if rounds is None:
            rounds = int(os.environ.get("FASTADAPTER_BENCH_ROUNDS", "15" if device == "cuda" else "9"))
        return interleaved(fns, device, rounds, iters)


def iterations(fn: Callable[[], object], device: str, target_s: float) -> int:
    """Calls per timing sample so that one sample takes about ``target_s``."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = max(time.perf_counter() - t, 1e-6)
    return max(1, min(200, int(target_s / dt)))


# ----------------------------------------------------------------------------- the adapter's providers


def eager_adapter(x, w_down, b_down, w_up, b_up):
    """What a user writes by hand: two Linear layers, the activation, the residual add (the
    scaling, when it is not 1, folded into the add: no extra pass)."""
    u = F.linear(F.gelu(F.linear(x, w_down, b_down)), w_up, b_up)
    return x + u if SCALING == 1.0 else torch.add(x, u, alpha=SCALING)


def providers_for(device: str, dtype: torch.dtype, r: int, compile: bool = True) -> list[str]:
    """eager, compile (optional) and every fastadapter backend that runs here (the Triton
    interpreter is far too slow to time, so triton counts on GPUs only)."""
    names = ["eager"] + (["compile"] if compile else [])
    for name in backends.names():
        if name == "triton" and device == "cpu":
            continue
        if backends.get(name).check(torch.device(device), dtype, r) is None:
            names.append(name)
    return names


def inputs(n, d, r, dtype, device, grad):
    g = torch.Generator().manual_seed(0)

    def mk(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_(grad)

    return mk(n, d), mk(r, d, scale=d**-0.5), mk(r, scale=0.1), mk(d, r, scale=r**-0.5), mk(d, scale=0.1)


def callable_for(provider: str, tensors, mode: str) -> Callable[[], object]:
    """One call of ``provider``: the forward ("fwd") or forward + backward ("fwdbwd")."""
    if provider == "eager":
        fwd = eager_adapter
    elif provider == "compile":
        fwd = torch.compile(eager_adapter, dynamic=False)
    elif provider == "gemms":  # the GEMMs alone into preallocated outputs: the floor fusion cannot go below
        x, wd, _, wu, _ = (t.detach() for t in tensors)
        z = torch.empty(x.shape[0], wd.shape[0], dtype=x.dtype, device=x.device)
        y = torch.empty_like(x)
        dy = torch.randn_like(x)

        def gemms():
            torch.mm(x, wd.t(), out=z)
            torch.mm(z, wu.t(), out=y)
            if mode != "fwd":
                torch.mm(dy.t(), z), torch.mm(dy, wu, out=z), torch.mm(z.t(), x), torch.mm(z, wd, out=y)

        return gemms
    elif provider == "copy":
        x = tensors[0].detach()
        out = torch.empty_like(x)
        return lambda: out.copy_(x)
    else:

        def fwd(*t):
            return fused_adapter(*t, activation=ACTIVATION, scaling=SCALING, backend=provider)

    if mode == "fwd":
        return lambda: fwd(*tensors)
    dy = torch.randn_like(tensors[0])

    def step():
        y = fwd(*tensors)
        return torch.autograd.grad(y, tensors, dy)

    return step


def min_bytes(n: int, d: int, r: int, dtype: torch.dtype, mode: str) -> int:
    """The fused floor (DESIGN.md): read x, write y and fp32 z; backward reads dy, x, z, writes dx."""
    e = torch.finfo(dtype).bits // 8
    fwd = 2 * n * d * e + n * r * 4
    return fwd if mode == "fwd" else fwd + 3 * n * d * e + n * r * 4


def time_case(n, d, r, dtype, device, mode, rounds, target_s, names: Optional[list[str]] = None) -> dict:
    """One case timed: a dict as the benchmarks record it (report.py and ``markdown`` read it)."""
    tensors = inputs(n, d, r, dtype, device, grad=(mode == "fwdbwd"))
    names = list(names or providers_for(device, dtype, r)) + ["gemms"] + (["copy"] if device == "cuda" and mode == "fwd" else [])
    fns = {p: callable_for(p, tensors, mode) for p in names}
    results = side_by_side(fns, device, "eager", mode == "fwdbwd", rounds, target_s)
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "N": n, "d": d, "r": r, "activation": ACTIVATION, "mode": mode,
        "bytes": min_bytes(n, d, r, dtype, mode), "copy_bytes": 2 * n * d * torch.finfo(dtype).bits // 8,
        "results": results,
    }  # fmt: skip


def sweep(
    ns: Iterable[int], ds: Iterable[int], r: int, dtype, device, rounds: int, target_s: float, compile_at: Optional[int] = None
) -> list[dict]:
    """Every (N, d) case, forward and forward+backward, with a progress bar. ``torch.compile``
    (tens of seconds to compile each shape) runs at N = ``compile_at`` only, when given."""
    from tqdm.auto import tqdm

    cases = [(n, d, mode) for d in ds for n in ns for mode in ("fwd", "fwdbwd")]
    out = []
    for n, d, mode in tqdm(cases, desc="bench", unit="case", file=sys.stderr):
        names = providers_for(device, dtype, r, compile=compile_at is None or n == compile_at)
        out.append(time_case(n, d, r, dtype, device, mode, rounds, target_s, names))
    return out


# ----------------------------------------------------------------------------- the table


def rows(results: list[dict]):
    """Per case and provider: median time, speedup over eager and over torch.compile, and for
    CPU runs the median minor page faults per call, for GPU runs the achieved bandwidth
    (minimal bytes / median time) as a fraction of a device copy timed in the same run."""
    copy_bw = {}
    for info in results:
        copy = info["results"].get("copy")
        if copy:
            copy_bw[(info["N"], info["d"], info["r"])] = info["copy_bytes"] / copy["median_s"]
    for info in results:
        if "eager" not in info["results"]:
            continue  # a model-level benchmark
        res = info["results"]
        eager = res["eager"]["median_s"]
        compiled = res.get("compile", {}).get("median_s")
        bw_ref = copy_bw.get((info["N"], info["d"], info["r"]))
        for name, r in res.items():
            t = r["median_s"]
            if name == "copy":
                bw = info["copy_bytes"] / t
            elif name == "gemms":
                bw = float("nan")
            else:
                bw = info["bytes"] / t
            yield {
                "case": f"N={info['N']} d={info['d']} r={info['r']} {info['dtype']} {info['activation']}",
                "mode": "fwd" if info["mode"] == "fwd" else "fwd+bwd",
                "provider": name,
                "ms": t * 1e3,
                "vs_eager": "" if name == "copy" else f"{eager / t:.2f}x",
                # gemms: the products alone into preallocated outputs, a floor, not an adapter
                "vs_compile": "" if name == "copy" or not compiled else f"{compiled / t:.2f}x",
                "gbs": "" if bw != bw else f"{bw / 1e9:.0f}",
                "pct_copy": f"{100 * bw / bw_ref:.0f}%" if bw_ref and bw == bw else "",
                "faults": "" if "page_faults_per_call" not in r else f"{r['page_faults_per_call']:.0f}",
            }


def markdown(results: list[dict]) -> str:
    gpu = any(info["device"] != "cpu" for info in results)
    last = " % of copy |" if gpu else " page faults / call |"
    head = "| case | mode | provider | median ms | vs eager | vs compile | GB/s |" + last
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows(results):
        cells = (r["case"], r["mode"], r["provider"], f"{r['ms']:.3f}", r["vs_eager"], r["vs_compile"], r["gbs"])
        out.append("| " + " | ".join(cells) + f" | {r['pct_copy'] if gpu else r['faults']} |")
    return "\n".join(out)


def command(args) -> int:
    """``fastadapter bench``."""
    import subprocess
    import tempfile

    from . import memory, plots

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    dtype = dtypes[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    ns = args.n or ([1024, 4096, 16384] if device == "cpu" else [4096, 32768, 131072])
    compile_at = None if args.no_compile else (args.compile_at or sorted(ns)[len(ns) // 2])
    os.makedirs(args.output, exist_ok=True)
    if device == "cpu" and "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        print("page faults can move CPU times by up to 2x (see the page-fault column); for a steady heap run with "
              "MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=17179869184")  # fmt: skip
    print(f"timing {len(ns) * len(args.d) * 2} cases on {device} ({str(dtype).replace('torch.', '')}, r={args.r}); "
          f"torch.compile at N={compile_at}" if compile_at else "without torch.compile")  # fmt: skip
    results = sweep(ns, args.d, args.r, dtype, device, args.rounds, 0.02 if device == "cuda" else 0.1, compile_at)
    if args.no_compile:
        for info in results:
            info["results"].pop("compile", None)
    table = markdown(results)
    print(table)
    with open(os.path.join(args.output, "bench.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.output, "bench.json"), "w") as f:
        json.dump(results, f, indent=1)

    traffic = None
    if args.traffic:
        print("counting bytes (the Triton kernels run through the interpreter: a few minutes)", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "traffic.json")
            env = dict(os.environ, TRITON_INTERPRET="1")
            cmd = [sys.executable, "-m", "fastadapter.cli.traffic", "--json", out]
            proc = subprocess.run(cmd, env=env, text=True, capture_output=True)
            print(proc.stdout)
            if proc.returncode != 0:
                print(f"the byte count failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            else:
                with open(out) as f:
                    traffic = json.load(f)["summary"]
                with open(os.path.join(args.output, "traffic.md"), "w") as f:
                    f.write(proc.stdout)

    if args.memory:
        from tqdm.auto import tqdm

        calls = memory.per_call(4096, max(args.d), args.r, dtype)
        cfg = memory.bert_base_config(layers=args.memory_layers)
        batch, seq = args.memory_batch
        providers = memory.available_step_providers()
        steps = [memory.train_step(p, cfg, batch, seq) for p in tqdm(providers, desc="memory", file=sys.stderr)]
        text = memory.markdown(calls, steps)
        print(text)
        with open(os.path.join(args.output, "memory.md"), "w") as f:
            f.write(text + "\n")

    why_not = plots.available()
    if why_not is None:
        path = plots.bench_figure(results, traffic, os.path.join(args.output, "bench.png"))
        print(f"plot: {path}")
    else:
        print(f"no plot ({why_not})")
    print(f"tables and JSON in {args.output}")
    return 0
