"""The cpp ops of an earlier commit's csrc/ against this tree's, side by side in one process.

    python benchmarks/compare_builds.py REV [--rounds 15]

REV's csrc/ is exported to a temporary directory and built with this tree's flags (once per
source version, cached as usual); both extensions are loaded, and each op's forward+backward
(fp32, N = 4096, r = 64, gelu, every input's gradient) is timed with one and then the other
in rotating rounds (fastadapter/cli/bench.py), the cpp backend pointed at each build in turn.
Both builds must agree before anything is timed. Prints REV's median, this tree's, and their
ratio: the paired figure a kernel change is judged by on a shared machine.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import torch

import fastadapter as fa
from fastadapter.backends import cpp, extension
from fastadapter.cli import bench

N, R = 4096, 64
ROOT = Path(__file__).resolve().parent.parent


def export_csrc(rev: str, into: Path) -> Path:
    files = subprocess.run(["git", "ls-tree", "--name-only", rev, "csrc/"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()  # fmt: skip
    if not files:
        raise SystemExit(f"{rev} has no csrc/")
    for f in files:
        blob = subprocess.run(["git", "show", f"{rev}:{f}"], cwd=ROOT, check=True, capture_output=True).stdout
        (into / Path(f).name).write_bytes(blob)
    return into


def cases():
    """(name, fn, inputs): each op on seeded inputs; fn returns its outputs as a tuple."""
    g = torch.Generator().manual_seed(0)

    def t(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g)

    for op, d in (("adapter", 768), ("adapter_layernorm", 768), ("adapter_rmsnorm", 576), ("mixed_adapter", 768)):
        h, res = t(N, d), t(N, d)
        w = [t(R, d, scale=d**-0.5), t(R, scale=0.1), t(d, R, scale=R**-0.5), t(d, scale=0.1)]
        if op == "adapter":
            yield op, lambda *a: (fa.fused_adapter(*a, activation="gelu", backend="cpp"),), [h, *w]
        elif op == "adapter_layernorm":
            yield op, lambda *a: (fa.adapter_layernorm(*a, placement="houlsby", activation="gelu", backend="cpp"),), [
                h, res, *w, 1 + t(d, scale=0.2), t(d, scale=0.1)]  # fmt: skip
        elif op == "adapter_rmsnorm":
            yield op, lambda *a: fa.adapter_rmsnorm(*a, placement="houlsby", activation="gelu", backend="cpp"), [
                h, res, *w, 1 + t(d, scale=0.2)]  # fmt: skip
        else:
            index = torch.randint(0, 4, (N,), generator=g)
            stacked = [torch.stack([x, 0.5 * x, -x, 2 * x]) for x in w]
            yield op, lambda x, *ws, i=index: (fa.mixed_adapter(x, i, *ws, activation="gelu", backend="cpp"),), [h, *stacked]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rev", help="the earlier commit (any git revision)")
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    new, reason = extension.load()
    if new is None:
        raise SystemExit(f"this tree's extension: {reason}")
    with tempfile.TemporaryDirectory() as tmp:
        old = extension.build(export_csrc(args.rev, Path(tmp)))
    for op, fn, inputs in cases():
        leaves = [x.clone().requires_grad_() for x in inputs]
        dys = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(fn(*leaves))]

        def step(module, fn=fn, leaves=leaves, dys=dys):
            def run():
                cpp._module = lambda: module
                return torch.autograd.grad(fn(*leaves), leaves, dys)

            return run

        fns = {args.rev: step(old), "this tree": step(new)}
        for a, b in zip(fns[args.rev](), fns["this tree"]()):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
        res = bench.interleaved(fns, "cpu", args.rounds, bench.iterations(fns[args.rev], "cpu", 0.1))
        before, after = res[args.rev]["median_s"], res["this tree"]["median_s"]
        print(f"{op}: {args.rev} {before * 1e3:.2f} ms, this tree {after * 1e3:.2f} ms, {before / after:.3f}x")


if __name__ == "__main__":
    main()
