"""Side-by-side timing: every provider of a case is timed in each round, in a rotating
order, so that drift on a shared machine hits all of them alike. Medians are reported.

On the CPU each provider's minor page faults per call are counted too: with glibc, a
process whose freed heap grows past the trim threshold hands its pages back and faults
them in again on the next call, and that can double a provider's time (it depends on
the process's allocation history, not on the provider alone)."""

from __future__ import annotations

import statistics
import sys
import time
from typing import Callable

import torch


def _minor_faults() -> int:
    if sys.platform == "win32":
        return 0
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _time_cpu(fn: Callable[[], object], iters: int, faults: list[float]) -> float:
    f0 = _minor_faults()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    elapsed = (time.perf_counter() - start) / iters
    faults.append((_minor_faults() - f0) / iters)
    return elapsed


def _time_cuda(fn: Callable[[], object], iters: int, faults: list[float]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


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
            samples[name].append(timer(fns[name], iters, faults[name]))
    out = {}
    for n, s in samples.items():
        out[n] = {"median_s": statistics.median(s), "samples": len(s)}
        if device != "cuda":
            out[n]["page_faults_per_call"] = statistics.median(faults[n])
    return out
