"""``fastadapter train`` on a BERT-family encoder: adapters and a classification head on one
task (BBC News topics by default), held-out accuracy before, during and after, the adapters,
head, metrics and a plot of the curves in ``--output``. Under torchrun with ``--fsdp`` or
``--ddp`` each process runs its part of every batch (fastadapter/cli/processes.py)."""

from __future__ import annotations

import json
import os
import random
import time

import torch

from .common import Progress, load_task, model_path, warmup_then_linear
from .processes import Processes, parameter_mib, peak_rss_mib


def _batches(encodings, labels, indices, batch_size, shuffle, rng):
    order = list(indices)
    if shuffle:
        rng.shuffle(order)
    for i in range(0, len(order), batch_size):
        idx = torch.tensor(order[i : i + batch_size])
        yield {k: v[idx] for k, v in encodings.items()}, labels[idx]


@torch.no_grad()
def evaluate(model, encodings, labels, indices, batch_size, procs=None) -> dict:
    """Held-out accuracy and loss; with several processes each takes its share of the
    examples and the counts are summed."""
    procs = procs or Processes(None)
    model.eval()
    correct, loss_sum = 0, 0.0
    for rows, counted in procs.eval_batches(list(indices), batch_size):
        idx = torch.tensor(rows)
        logits = model(**{k: v[idx] for k, v in encodings.items()}).logits[:counted].float()
        y = labels[idx[:counted]]
        correct += int((logits.argmax(-1) == y).sum())
        loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
    correct, loss_sum = procs.sum(correct, loss_sum)
    seen = len(indices)
    return {"accuracy": correct / max(seen, 1), "loss": loss_sum / max(seen, 1), "examples": seen}


def train(args, procs: Processes | None = None, setup=None) -> dict:
    """One task's run. ``setup(model) -> (counts, description, extra_loss)`` replaces the
    default (adapters named after the task, trained with the head): the fusion stage of
    ``--fuse`` loads trained adapters there and trains a fusion layer over them."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import fastadapter as fa
    from fastadapter.hf.distributed import full

    procs = procs or Processes(None)
    torch.manual_seed(args.seed)  # the same head and adapters in every process
    rng = random.Random(args.seed)
    texts, labels, names = load_task(args.task, args.limit_per_label, args.seed)
    n_eval = max(1, int(len(texts) * args.eval_fraction))
    eval_idx, train_idx = list(range(n_eval)), list(range(n_eval, len(texts)))

    path = model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(names))
    if setup is None:
        config = fa.AdapterConfig(
            placement=args.placement, reduction_factor=args.reduction_factor, activation=args.activation, backend=args.backend
        )
        fa.add_adapters(model, config, args.task)
        counts = fa.mark_only_adapters_trainable(model, train_head=True)
        what, extra_loss = f"{counts['adapters'] / 1e3:.0f}k in {config.placement} adapters", None
        placement = config.placement
    else:
        counts, what, extra_loss = setup(model)
        placement = next(iter(fa.adapter_configs(model).values())).placement
    shared = f"; each of {procs.world} processes ({procs.mode}) a part of every batch" if procs.world > 1 else ""
    procs.print(
        f"{model.config.model_type} from {path} ({model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}): "
        f"{counts['total'] / 1e6:.1f}M parameters, training {counts['trainable'] / 1e3:.0f}k ({what}); "
        f"backends: {fa.available_backends()}{shared}"
    )
    hf_model, model = model, procs.wrap(model)
    held_here = parameter_mib(model)  # sharded: before a forward gathers the root's weights (FSDP2 keeps the root's)
    torch.manual_seed(args.seed + procs.rank)  # each process its own dropout draws
    enc = tokenizer(texts, truncation=True, max_length=args.max_length, padding="max_length", return_tensors="pt")
    y = torch.tensor(labels)

    steps_per_epoch = (len(train_idx) + args.batch_size - 1) // args.batch_size
    total = args.max_steps or max(1, int(round(args.epochs * steps_per_epoch)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    sched = warmup_then_linear(opt, total)
    before = evaluate(model, enc, y, eval_idx, 2 * args.batch_size, procs)
    history = [{"step": 0, "accuracy": before["accuracy"], "eval_loss": before["loss"]}]
    step, start, losses, eval_seconds = 0, time.perf_counter(), [], 0.0
    bar = Progress(total, "train", show=procs.main)
    while step < total:
        model.train()
        for batch, target in _batches(enc, y, train_idx, args.batch_size, True, rng):  # the same in every process
            rows, weight = procs.part(list(range(len(target))))
            idx = torch.tensor(rows)
            loss = procs.weighted(model(**{k: v[idx] for k, v in batch.items()}, labels=target[idx]).loss, weight)
            (loss if extra_loss is None else loss + extra_loss(hf_model)).backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(procs.mean(loss.item()))
            step += 1
            history.append({"step": step, "loss": losses[-1]})
            if args.eval_every and step % args.eval_every == 0 and step < total:
                t0 = time.perf_counter()
                ev = evaluate(model, enc, y, eval_idx, 2 * args.batch_size, procs)
                history.append({"step": step, "accuracy": ev["accuracy"], "eval_loss": ev["loss"]})
                eval_seconds += time.perf_counter() - t0
                model.train()
            bar.update(losses)
            if step >= total:
                break
    bar.close()
    elapsed = time.perf_counter() - start - eval_seconds
    after = evaluate(model, enc, y, eval_idx, 2 * args.batch_size, procs)
    history.append({"step": step, "accuracy": after["accuracy"], "eval_loss": after["loss"]})
    peaks = [round(m) for m in procs.gather(peak_rss_mib())]
    held = [round(m) for m in procs.gather(held_here)]
    procs.save_adapters(hf_model, os.path.join(args.output, "adapters"), args.task if setup is None else None)
    head = {k: full(v) for k, v in hf_model.state_dict().items() if not k.startswith(hf_model.base_model_prefix + ".")}
    if not procs.main:
        procs.barrier()
        return {"eval_after": after}
    os.makedirs(args.output, exist_ok=True)
    torch.save(head, os.path.join(args.output, "head.pt"))
    metrics = {
        "model": path,
        "task": args.task,
        "labels": names,
        "placement": placement,
        "steps": step,
        "train_seconds": round(elapsed, 1),
        "processes": procs.world,
        "mode": procs.mode or "one process",
        "peak_rss_mib": peaks,
        "parameter_mib": held,
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
        title = f"{args.model} ({hf_model.config.model_type}), {placement} adapters, {args.task}: {step} steps"
        curve = plots.training_curve(history, os.path.join(args.output, "curve.png"), title=title)
    else:
        curve = f"no plot ({why_not})"
    print(
        f"{step} steps in {elapsed:.0f}s; train loss {losses[0]:.3f} -> {metrics['last_loss_mean20']:.3f}; "
        f"held-out accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} on {after['examples']} examples; "
        f"saved to {args.output}; curves: {curve}"
    )
    procs.barrier()
    return metrics
