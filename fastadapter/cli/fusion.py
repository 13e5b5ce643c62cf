"""``fastadapter train --fuse bbc,sentiment --task bbc``: AdapterFusion on a BERT-family encoder.

Stage one trains an adapter per fused task (each a plain ``fastadapter train`` run in
``<output>/<task>``; a run already there is reused). Stage two loads those adapters frozen,
adds a fusion layer over them and trains it with a fresh head on ``--task``, the fusion's
regularization term added to the loss (AdapterFusion's two-stage recipe, Pfeiffer et al.
2021). It reports held-out accuracy of the fusion against the task's own adapter, and writes
the fusion run, adapters and fusion layer included, to ``<output>/fusion``.
"""

from __future__ import annotations

import copy
import json
import os


def _stage_one(args, task: str, procs) -> dict:
    """The single-task run of ``task`` (trained here unless its folder already holds one)."""
    from .encoder import train

    out = os.path.join(args.output, task)
    done = os.path.join(out, "metrics.json")
    if os.path.exists(done) and os.path.exists(os.path.join(out, "adapters")):
        procs.print(f"{task}: reusing the adapter trained in {out}")
        with open(done) as f:
            return json.load(f)
    run = copy.copy(args)
    run.task, run.output = task, out
    return train(run, procs)


def train(args, fused: list[str], procs) -> dict:
    import fastadapter as fa

    from .encoder import train as train_encoder

    if args.task not in fused:
        raise SystemExit(f"--fuse {','.join(fused)}: the target --task {args.task} must be one of the fused tasks")
    if len(fused) < 2:
        raise SystemExit("--fuse needs at least two tasks, comma-separated")
    singles = {t: _stage_one(args, t, procs) for t in fused}

    def setup(model):
        for t in fused:
            fa.load_adapters(model, os.path.join(args.output, t, "adapters"), t)
        fa.add_fusion(model, fused)
        fa.set_active_adapter(model, fa.Fuse(*fused))
        counts = fa.mark_only_fusion_trainable(model, train_head=True)
        what = f"{counts['fusion'] / 1e3:.0f}k in the fusion layer over {', '.join(fused)}; the adapters frozen"
        return counts, what, fa.fusion_regularization

    run = copy.copy(args)
    run.output = os.path.join(args.output, "fusion")
    metrics = train_encoder(run, procs, setup=setup)
    if procs.main:
        single = singles[args.task]["eval_after"]["accuracy"]
        fused_acc = metrics["eval_after"]["accuracy"]
        metrics.update(fused=fused, single_task_accuracy=single)
        with open(os.path.join(run.output, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        print(f"{args.task}: held-out accuracy {fused_acc:.3f} with the fusion over {', '.join(fused)}, "
              f"{single:.3f} with the {args.task} adapter alone")  # fmt: skip
    return metrics
