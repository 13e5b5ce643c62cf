"""Side-by-side timing: every provider of a case is timed in each round, in a rotating
order, so that drift on a shared machine hits all of them alike. Medians are reported."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _time_cpu(fn: Callable[[], object], iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def _time_cuda(fn: Callable[[], object], iters: int) -> float:
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
    for i in range(rounds):
        order = names[i % len(names) :] + names[: i % len(names)]
        if i % 2:
            order.reverse()
        for name in order:
            samples[name].append(timer(fns[name], iters))
    return {n: {"median_s": statistics.median(s), "samples": len(s)} for n, s in samples.items()}
