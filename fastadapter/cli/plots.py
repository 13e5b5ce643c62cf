"""PNG figures for ``fastadapter bench`` and ``fastadapter train``. matplotlib is an
optional extra (``pip install fastadapter[plot]``); without it :func:`available` says why
and the commands print their tables only."""

from __future__ import annotations

from typing import Optional

PLOT_INSTALL = "pip install matplotlib  (or: pip install 'fastadapter[plot]')"


def available() -> Optional[str]:
    """None when plots can be drawn, else how to get them."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return f"matplotlib is not installed: {PLOT_INSTALL}"
    return None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def bench_figure(results: list[dict], traffic: Optional[dict], path: str) -> str:
    """Speedup over eager against N, one panel per (d, mode), a line per provider; and, with
    ``traffic`` (the summary of fastadapter/cli/traffic.py's counts), the bytes each provider moves."""
    plt = _pyplot()
    panels = sorted({(info["d"], info["mode"]) for info in results})
    count = len(panels) + (1 if traffic else 0)
    cols = min(count, 3)
    rows = -(-count // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[count:]:
        ax.axis("off")
    for ax, (d, mode) in zip(axes, panels):
        cases = sorted((i for i in results if i["d"] == d and i["mode"] == mode), key=lambda i: i["N"])
        names = list(dict.fromkeys(n for i in cases for n in i["results"] if n != "copy"))
        for name in names:
            timed = [i for i in cases if name in i["results"]]
            pts = [(i["N"], i["results"]["eager"]["median_s"] / i["results"][name]["median_s"]) for i in timed]
            style = "--" if name == "gemms" else "-"  # the GEMMs alone: a floor, not an adapter
            if pts:
                label = "gemms (floor)" if name == "gemms" else name
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label, linestyle=style)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N (tokens)")
        ax.set_ylabel("speedup over eager")
        ax.set_title(f"d={d}, {'forward' if mode == 'fwd' else 'forward+backward'} ({cases[0]['dtype']}, {cases[0]['device']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if traffic:
        ax = axes[count - 1]
        names = list(traffic["passes"])
        fwd = [traffic["passes"][n]["fwd"] for n in names]
        bwd = [traffic["passes"][n]["bwd"] for n in names]
        labels = [f"{n} (fp32)" if n == "cpp" else n for n in names]  # the CPU backend is counted in fp32
        ax.bar(labels, fwd, label="forward")
        ax.bar(labels, bwd, bottom=fwd, label="backward")
        ax.set_ylabel(f"passes over N x d ({traffic['dtype']})")
        ax.set_title(f"bytes moved (model): d={traffic['d']}, r={traffic['r']}, N={traffic['N']}")
        ax.tick_params(axis="x", rotation=30)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def training_curve(history: list[dict], path: str, title: str = "") -> str:
    """Training loss per step and held-out accuracy at each evaluation (per task where the
    evaluations name one)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    steps = [h["step"] for h in history if "loss" in h]
    ax.plot(steps, [h["loss"] for h in history if "loss" in h], color="tab:blue", linewidth=0.8, alpha=0.5, label="loss")
    smooth = _smoothed([h["loss"] for h in history if "loss" in h])
    ax.plot(steps, smooth, color="tab:blue", linewidth=1.6, label="loss (mean of 20)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss", color="tab:blue")
    ax2 = ax.twinx()
    tasks = list(dict.fromkeys(h.get("task") for h in history if "accuracy" in h))
    colors = ["tab:orange", "tab:green", "tab:red", "tab:purple"]
    for i, task in enumerate(tasks):  # one line per task where the history names tasks
        evals = [h for h in history if "accuracy" in h and h.get("task") == task]
        label = "held-out acc." + (f" ({task})" if task else "")
        ax2.plot([h["step"] for h in evals], [h["accuracy"] for h in evals], color=colors[i % 4], marker="o", label=label)
    ax2.set_ylabel("held-out accuracy", color="tab:orange")
    ax2.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    fig.legend(loc="center right", fontsize=7, bbox_to_anchor=(0.85, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _smoothed(values: list[float], window: int = 20) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out
