"""Turn a ``pytest benchmarks/ --benchmark-json=FILE`` result into a markdown table.

    python benchmarks/report.py FILE [FILE ...]

Per case: median time of each provider, speedup over eager and over torch.compile,
for CPU runs the median minor page faults per call, and for GPU runs the achieved
bandwidth (minimal bytes / median time) as a fraction of a device copy timed in the
same run. The adapter site's split (forward and backward apart), the composition blocks, the
weight-gradient products and the whole-model steps as tables of their own.
"""

from __future__ import annotations

import json
import sys

from fastadapter.cli import bench


def model_rows(data: dict):
    """Rows of whole-model benchmarks (bench_model.py): each provider against the floor."""
    for b in data["benchmarks"]:
        info = b["extra_info"]
        res = info.get("results", {})
        if "floor" not in res:
            continue
        floor = res["floor"]["median_s"]
        for name, r in res.items():
            yield (info["mode"], f"transformers {info.get('transformers', '?')}", name, f"{r['median_s'] * 1e3:.1f}",
                   f"{r['median_s'] / floor:.3f}x")  # fmt: skip


def split_rows(data: dict):
    """Lines of the site's split (bench_adapter_layernorm.py::test_adapter_layernorm_split):
    forward, backward and total ms per provider, its extra over the adapter op, op+add+ln's
    time over its own, and the floor of a site's extra."""
    for b in data["benchmarks"]:
        info = b["extra_info"]
        sp = info.get("split")
        if not sp:
            continue
        case = f"N={info['N']} d={info['d']} r={info['r']} {info['dtype']}"
        yield "| case | provider | fwd ms | bwd ms | total ms | extra over op ms | op+add+ln / provider |"
        yield "|---|---|---|---|---|---|---|"
        for p, total in sp["total"].items():
            extra = f"{sp['extra_over_op'][p]:+.3f}" if p in sp["extra_over_op"] else ""
            ratio = f"{sp['total']['op+add+ln'] / total:.3f}x" if p != "op" else ""
            yield f"| {case} | {p} | {sp['fwd'][p]:.3f} | {sp['bwd'][p]:.3f} | {total:.3f} | {extra} | {ratio} |"
        yield (
            f"\nFloor of a site's extra over the adapter op (one copy and one read of N x d): "
            f"{sp['floor_extra']:.3f} ms; op+add+ln over (op + that floor): {sp['vs_op_add_ln_at_floor']:.3f}x."
        )


def composition_rows(data: dict):
    """Rows of bench_composition.py: each block's providers against AdapterHub's ops and one
    adapter; then the ops and bytes each runs."""
    for b in data["benchmarks"]:
        info = b["extra_info"]
        res = info.get("results", {})
        if "adapterhub" in res and "single" in res:
            hub, single = res["adapterhub"]["median_s"], res["single"]["median_s"]
            for name, r in res.items():
                t = r["median_s"]
                yield (f"| {info['activation']} | {info['mode']} | {name} | {t * 1e3:.2f} | {hub / t:.2f}x | "
                       f"{t / single:.2f}x |")  # fmt: skip
    for b in data["benchmarks"]:
        info = b["extra_info"]
        for name, c in info.get("counts", {}).items():
            yield (f"| {info['block']} | ops and bytes | {name} | {c['fwd_ops']} + {c['bwd_ops']} ops over the rows | "
                   f"{c['fwd_passes']:.1f} + {c['bwd_passes']:.1f} passes of N x d | |")  # fmt: skip


def weight_grad_rows(data: dict):
    """Rows of bench_adapter.py::test_weight_grad_products: each provider's time and rate
    against MKL's GEMM."""
    for b in data["benchmarks"]:
        wg = b["extra_info"].get("weight_grad")
        if not wg:
            continue
        mkl, flop = wg["results"]["mkl"]["median_s"], 2 * wg["N"] * wg["r"] * wg["d"]
        for name, r in wg["results"].items():
            t = r["median_s"]
            yield (f"| {wg['form']}, N={wg['N']} r={wg['r']} d={wg['d']} | {name} | {t * 1e3:.3f} | "
                   f"{flop / t / 1e9:.0f} | {mkl / t:.2f}x |")  # fmt: skip


def cpu_name(cpu: dict) -> str:
    """Vendor, model as the OS reports it, family/model numbers and vector width: the
    same brand string covers CPUs with and without AVX-512 (AMD EPYC Zen 3 and Zen 4)."""
    flags = set(cpu.get("flags", []))
    isa = "AVX-512" + (" + AMX" if "amx_tile" in flags else "") if "avx512f" in flags else "AVX2, no AVX-512"
    if "avx2" not in flags and "avx512f" not in flags:
        isa = "no AVX2"
    return (
        f"{cpu.get('brand_raw', '?')} ({cpu.get('vendor_id_raw', '?')} family {cpu.get('family', '?')} "
        f"model {cpu.get('model', '?')}, {cpu.get('count', '?')} cores, {isa})"
    )


def table(paths) -> str:
    out = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        mi = data.get("machine_info", {})
        out.append(f"Machine: {mi.get('node', '?')}, {cpu_name(mi.get('cpu', {}))} ({data.get('datetime', '')[:10]})\n")
        cases = [b["extra_info"] for b in data["benchmarks"] if "eager" in b["extra_info"].get("results", {})]
        if cases:
            out.append(bench.markdown(cases))
        split = list(split_rows(data))
        if split:
            out.append("")
            out.extend(split)
        for head, rows in (
            ("| block | mode | provider | median ms | AdapterHub's ops / provider | provider / one adapter |",
             composition_rows(data)),
            ("| product | provider | median ms | GFLOP/s | MKL / provider |", weight_grad_rows(data)),
            ("| benchmark | versions | provider | median ms | time vs floor |",
             ("| " + " | ".join(row) + " |" for row in model_rows(data))),
        ):  # fmt: skip
            rows = list(rows)
            if rows:
                out += ["", head, "|" + "---|" * (head.count("|") - 1), *rows]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/report.py RESULT.json [...]")
    print(table(sys.argv[1:]))
