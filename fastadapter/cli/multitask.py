"""Several tasks on one frozen model: ``fastadapter train --tasks bbc,sentiment`` and
``fastadapter predict``.

Each task has its own adapters (named after the task) and its own classification head on
the base model's pooled output; the base model is shared and frozen. Training batches mix
the tasks (an equal share of each per batch), and every example goes through its own
task's adapters inside one forward and one backward (:func:`fastadapter.adapter_routing`).
For comparison, the same adapter and head are trained on each task alone for the same
number of steps; the run reports both held-out accuracies per task.
"""

from __future__ import annotations

import json
import os
import random
import time

import torch
import torch.nn.functional as F
from torch import nn

from .common import Progress, load_task, mixed_batches, model_path, read_run, warmup_then_linear


class MultiTaskClassifier(nn.Module):
    """A base model (Hugging Face ``AutoModel``) with one linear head per task on its pooled
    output (the pooler's where the model has one, else the first token's state)."""

    def __init__(self, base: nn.Module, num_labels: dict[str, int], dropout: float = 0.1):
        super().__init__()
        self.base = base
        hidden = base.config.hidden_size
        self.tasks = list(num_labels)
        self.heads = nn.ModuleDict({t: nn.Linear(hidden, n) for t, n in num_labels.items()})
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids, attention_mask, task_ids: torch.Tensor) -> list[torch.Tensor | None]:
        """Logits per task (of that task's rows, in batch order), None for a task with none."""
        out = self.base(input_ids=input_ids, attention_mask=attention_mask)
        pooled = out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state[:, 0]
        pooled = self.dropout(pooled)
        return [self.heads[t](pooled[task_ids == i]) if bool((task_ids == i).any()) else None for i, t in enumerate(self.tasks)]


def _load_task(name: str, limit: int | None, eval_fraction: float, seed: int, tokenizer, max_length: int) -> dict:
    texts, labels, names = load_task(name, limit, seed)
    n_eval = max(1, int(len(texts) * eval_fraction))
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    return {"name": name, "labels": names, "ids": enc["input_ids"], "mask": enc["attention_mask"], "y": torch.tensor(labels),
            "eval": list(range(n_eval)), "train": list(range(n_eval, len(texts)))}  # fmt: skip


def _trim(ids, mask):
    """Drop the columns that are padding in every row of the batch."""
    length = max(1, int(mask.sum(1).max()))
    return ids[:, :length], mask[:, :length]


def _routing(model: MultiTaskClassifier, task_ids: torch.Tensor):
    import contextlib

    import fastadapter as fa

    if len(model.tasks) == 1:
        return contextlib.nullcontext()
    return fa.adapter_routing(model.base, task_ids)


def _loss(model, ids, mask, task_ids, y):
    logits = model(ids, mask, task_ids)
    total = sum(F.cross_entropy(lg, y[task_ids == i], reduction="sum") for i, lg in enumerate(logits) if lg is not None)
    return total / len(y)


@torch.no_grad()
def evaluate(model: MultiTaskClassifier, data: dict, task_index: int, batch_size: int) -> dict:
    model.eval()
    correct = 0
    for i in range(0, len(data["eval"]), batch_size):
        idx = torch.tensor(data["eval"][i : i + batch_size])
        ids, mask = _trim(data["ids"][idx], data["mask"][idx])
        task_ids = torch.full((len(idx),), task_index)
        with _routing(model, task_ids):
            logits = model(ids, mask, task_ids)[task_index]
        correct += int((logits.argmax(-1) == data["y"][idx]).sum())
    return {"accuracy": correct / max(1, len(data["eval"])), "examples": len(data["eval"])}


def _collate(datasets, rows, pad_id: int):
    length = max(datasets[0]["ids"].shape[1], *(d["ids"].shape[1] for d in datasets))
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, (t, i) in enumerate(rows):
        n = datasets[t]["ids"].shape[1]
        ids[b, :n], mask[b, :n] = datasets[t]["ids"][i], datasets[t]["mask"][i]
    task_ids = torch.tensor([t for t, _ in rows])
    y = torch.tensor([int(datasets[t]["y"][i]) for t, i in rows])
    ids, mask = _trim(ids, mask)
    return ids, mask, task_ids, y


def train_tasks(datasets: list[dict], args, path: str, tokenizer, label: str) -> tuple[MultiTaskClassifier, dict]:
    """Adapters and heads for ``datasets`` on a fresh copy of the base model; batches mix them."""
    from transformers import AutoModel

    import fastadapter as fa

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    base = AutoModel.from_pretrained(path)
    names = [d["name"] for d in datasets]
    config = fa.AdapterConfig(
        placement=args.placement, reduction_factor=args.reduction_factor, activation=args.activation, backend=args.backend
    )
    for name in names:
        fa.add_adapters(base, config, name)
    fa.set_active_adapter(base, names)
    for p in base.parameters():
        p.requires_grad_(False)
    for n, p in base.named_parameters():
        if ".adapters." in f".{n}":
            p.requires_grad_(True)
    model = MultiTaskClassifier(base, {d["name"]: len(d["labels"]) for d in datasets})
    params = [p for p in model.parameters() if p.requires_grad]
    total = args.max_steps
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = warmup_then_linear(opt, total)
    batches = mixed_batches(datasets, args.batch_size, rng)
    losses = []
    start = time.perf_counter()
    bar = Progress(total, label)
    model.train()
    for _ in range(total):
        ids, mask, task_ids, y = _collate(datasets, next(batches), tokenizer.pad_token_id)
        with _routing(model, task_ids):
            loss = _loss(model, ids, mask, task_ids, y)
            loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.update(losses)
    bar.close()
    seconds = time.perf_counter() - start
    scores = {d["name"]: evaluate(model, d, i, 2 * args.batch_size) for i, d in enumerate(datasets)}
    return model, {"steps": total, "train_seconds": round(seconds, 1), "first_loss": losses[0],
                   "last_loss_mean20": sum(losses[-20:]) / len(losses[-20:]), "eval": scores}  # fmt: skip


def train_multitask(args, tasks: list[str]) -> dict:
    from transformers import AutoTokenizer

    import fastadapter as fa

    path = model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    datasets = [_load_task(t, args.limit_per_label, args.eval_fraction, args.seed, tokenizer, args.max_length) for t in tasks]
    started = time.perf_counter()
    model, multi = train_tasks(datasets, args, path, tokenizer, "+".join(tasks))
    single = {}
    if not args.no_single:
        for d in datasets:
            single[d["name"]] = train_tasks([d], args, path, tokenizer, d["name"] + " alone")[1]
    os.makedirs(args.output, exist_ok=True)
    for t in tasks:
        fa.save_adapters(model.base, os.path.join(args.output, "adapters", t), name=t)
    torch.save(model.heads.state_dict(), os.path.join(args.output, "heads.pt"))
    run = {"kind": "classifier", "model": path, "tasks": tasks, "labels": {d["name"]: d["labels"] for d in datasets},
           "max_length": args.max_length, "placement": fa.adapter_configs(model.base)[tasks[0]].placement}  # fmt: skip
    with open(os.path.join(args.output, "run.json"), "w") as f:
        json.dump(run, f, indent=2)
    metrics = {**run, "multi": multi, "single": single, "total_seconds": round(time.perf_counter() - started, 1)}
    with open(os.path.join(args.output, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(f"{len(tasks)} tasks, {args.max_steps} steps of batch {args.batch_size} mixing them "
          f"({multi['train_seconds']:.0f}s); held-out accuracy per task:")  # fmt: skip
    for d in datasets:
        t = d["name"]
        alone = f", alone for the same steps {single[t]['eval'][t]['accuracy']:.3f}" if t in single else ""
        print(f"  {t}: {multi['eval'][t]['accuracy']:.3f} on {multi['eval'][t]['examples']} examples{alone}")
    print(f"saved to {args.output} ({metrics['total_seconds']:.0f}s in all)")
    return metrics


def load_run(directory: str) -> tuple[MultiTaskClassifier, dict, object]:
    """The model of a ``train --tasks`` run: base, every task's adapters and heads; all active."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    import fastadapter as fa

    run = read_run(directory, "classifier")
    base = AutoModel.from_pretrained(run["model"])
    for t in run["tasks"]:
        fa.load_adapters(base, os.path.join(directory, "adapters", t), name=t)
    fa.set_active_adapter(base, run["tasks"])
    model = MultiTaskClassifier(base, {t: len(run["labels"][t]) for t in run["tasks"]})
    model.heads.load_state_dict(torch.load(os.path.join(directory, "heads.pt")))
    return model.eval(), run, AutoTokenizer.from_pretrained(run["model"])


@torch.no_grad()
def predict(directory: str, items: list[tuple[str, str]], batch_size: int = 32) -> list[tuple[str, str]]:
    """(task, label) per (task, text), one forward per batch whatever the mix of tasks."""
    model, run, tokenizer = load_run(directory)
    unknown = sorted({t for t, _ in items} - set(run["tasks"]))
    if unknown:
        raise SystemExit(f"the run in {directory} has tasks {', '.join(run['tasks'])}, not {', '.join(unknown)}")
    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        enc = tokenizer([text for _, text in chunk], truncation=True, max_length=run["max_length"], padding=True,
                        return_tensors="pt")  # fmt: skip
        task_ids = torch.tensor([run["tasks"].index(t) for t, _ in chunk])
        with _routing(model, task_ids):
            logits = model(enc["input_ids"], enc["attention_mask"], task_ids)
        rows = {i: iter(lg.argmax(-1).tolist()) for i, lg in enumerate(logits) if lg is not None}
        for t, _ in chunk:
            k = run["tasks"].index(t)
            out.append((t, run["labels"][t][next(rows[k])]))
    return out
