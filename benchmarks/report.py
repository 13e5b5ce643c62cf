"""Turn a ``pytest benchmarks/ --benchmark-json=FILE`` result into a markdown table.

    python benchmarks/report.py FILE [FILE ...]

Per case: median time of each provider, speedup over eager and over torch.compile,
for CPU runs the median minor page faults per call, and for GPU runs the achieved
bandwidth (minimal bytes / median time) as a fraction of a device copy timed in the
same run.
"""

from __future__ import annotations

import json
import sys


def rows(data: dict):
    copy_bw = {}
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        copy = info["results"].get("copy")
        if copy:
            copy_bw[(info["N"], info["d"], info["r"])] = info["copy_bytes"] / copy["median_s"]
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        if "eager" not in info["results"]:
            continue  # a model-level benchmark: model_rows()
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


def model_rows(data: dict):
    """Rows of whole-model benchmarks (bench_model.py): each provider against the floor."""
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        res = info["results"]
        if "floor" not in res:
            continue
        floor = res["floor"]["median_s"]
        for name, r in res.items():
            yield (info["mode"], f"transformers {info.get('transformers', '?')}", name, f"{r['median_s'] * 1e3:.1f}",
                   f"{r['median_s'] / floor:.3f}x")  # fmt: skip


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
        gpu = any(b["extra_info"]["device"] != "cpu" for b in data["benchmarks"])
        head = "| case | mode | provider | median ms | vs eager | vs compile | GB/s |" + (
            " % of copy |" if gpu else " page faults / call |"
        )
        out.append(head)
        out.append("|" + "---|" * (head.count("|") - 1))
        for r in rows(data):
            cells = (r["case"], r["mode"], r["provider"], f"{r['ms']:.3f}", r["vs_eager"], r["vs_compile"], r["gbs"])
            line = "| " + " | ".join(cells) + " |"
            line += f" {r['pct_copy'] if gpu else r['faults']} |"
            out.append(line)
        model = list(model_rows(data))
        if model:
            out.append("")
            out.append("| benchmark | versions | provider | median ms | time vs floor |")
            out.append("|---|---|---|---|---|")
            out.extend("| " + " | ".join(row) + " |" for row in model)
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/report.py RESULT.json [...]")
    print(table(sys.argv[1:]))
