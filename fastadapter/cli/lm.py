"""Decoder LLMs from the command line: ``fastadapter train --model smollm2`` and
``fastadapter generate``.

A task is taught as the next word: the prompt is ``"Article: <the first 40 tokens of the
article>\\nTopic:"`` (tweets: ``"Tweet: ...\\nSentiment:"``) and the answer is the label as
one token (" business", " sports", ...; " negative", " neutral", " positive"); the loss is
the cross-entropy of that token over the whole vocabulary, at the prompt's last position
only. Held-out accuracy is counted two ways: ``accuracy``, the model's greedy next token is
the right label (what ``generate`` prints), and ``choice_accuracy``, the right label scores
highest among the task's labels. Only the adapters train; the model stays frozen.

With several tasks (``--tasks bbc,sentiment``) each task has its own adapters, batches mix
the tasks and every row goes through its own task's adapters (:func:`fastadapter.adapter_routing`);
each task is also trained alone for comparison, on the same examples: its share of every
batch, for the same steps (the adapters' initial draws still differ between the runs: compare
over seeds). ``generate`` serves a
run: prompts of several tasks go through their own adapters in one batched ``generate``.
"""

from __future__ import annotations

import copy
import json
import os
import random
import time

import torch
import torch.nn.functional as F

from .common import BUNDLED, Progress, load_task, mixed_batches, model_path, read_run, shares, warmup_then_linear
from .processes import Processes, parameter_mib, peak_rss_mib

# task -> (text before the example, text after it)
PROMPTS = {"bbc": ("Article: ", "\nTopic:"), "sentiment": ("Tweet: ", "\nSentiment:")}


def prompt_ids(tokenizer, task: str, text: str, keep: int) -> list[int]:
    """The prompt's token ids: the task's frame around the first ``keep`` tokens of ``text``
    (no BOS: transformers 4 and 5 tokenizers differ on adding one)."""
    head, tail = PROMPTS[task]
    body = tokenizer(text.strip(), add_special_tokens=False)["input_ids"][:keep]
    return tokenizer(head, add_special_tokens=False)["input_ids"] + body + tokenizer(tail, add_special_tokens=False)["input_ids"]


def answer_ids(tokenizer, labels: list[str]) -> list[int]:
    """The token of " <label>" for each label; every answer must be one token."""
    out = []
    for label in labels:
        ids = tokenizer(" " + label, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise SystemExit(f"the label {label!r} is {len(ids)} tokens here ({ids}); the tasks need one-token answers")
        out.append(ids[0])
    return out


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def load_data(task: str, tokenizer, args) -> dict:
    texts, labels, names = load_task(task, args.limit_per_label, args.seed)
    n_eval = max(1, int(len(texts) * args.eval_fraction))
    return {"name": task, "labels": names, "answers": answer_ids(tokenizer, names),
            "prompts": [prompt_ids(tokenizer, task, t, args.max_length) for t in texts], "y": labels,
            "eval": list(range(n_eval)), "train": list(range(n_eval, len(texts)))}  # fmt: skip


def _collate(prompts: list[list[int]], pad_id: int):
    """Padded ids and the attention mask, the padding on the left: every prompt ends at the
    last position, where its next token is read (and where ``generate`` continues it)."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, length - len(p) :], mask[b, length - len(p) :] = torch.tensor(p), 1
    return ids, mask


def next_token_logits(model, ids, mask) -> torch.Tensor:
    """Logits of the token after each row's prompt: the LM head on the last position only.
    Positions count from each row's first real token (as ``generate`` counts them), so a
    left-padded prompt reads what it reads alone. ``model`` may be sharded (FSDP2) or wrapped
    (DDP): it is called as a whole."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1, use_cache=False).logits[:, -1]


def _routed(model, count: int, ids: torch.Tensor):
    import contextlib

    import fastadapter as fa

    return fa.adapter_routing(Processes.inner(model), ids) if count > 1 else contextlib.nullcontext()


@torch.no_grad()
def evaluate(model, data: dict, task_index: int, count: int, pad_id: int, batch_size: int, procs=None) -> dict:
    """Held-out accuracy, choice accuracy and loss; with several processes each takes its
    share of the examples and the counts are summed."""
    procs = procs or Processes(None)
    model.eval()
    right = chosen = 0
    loss = 0.0
    answers = torch.tensor(data["answers"])
    for rows, counted in procs.eval_batches(data["eval"], batch_size):
        ids, mask = _collate([data["prompts"][r] for r in rows], pad_id)
        with _routed(model, count, torch.full((len(rows),), task_index)):
            logits = next_token_logits(model, ids, mask).float()[:counted]
        target = answers[torch.tensor([data["y"][r] for r in rows[:counted]], dtype=torch.long)]
        right += int((logits.argmax(-1) == target).sum())
        chosen += int((answers[logits[:, answers].argmax(-1)] == target).sum())
        loss += float(F.cross_entropy(logits, target, reduction="sum"))
    right, chosen, loss = procs.sum(right, chosen, loss)
    n = max(1, len(data["eval"]))
    return {"accuracy": right / n, "choice_accuracy": chosen / n, "loss": loss / n, "examples": len(data["eval"])}


def load_model(path: str, names: list[str], config=None, directory: str | None = None):
    """The causal LM in ``path`` with adapters ``names``: new ones from ``config``, or loaded
    from ``directory``/adapters/<name>; all of them active."""
    from transformers import AutoModelForCausalLM

    import fastadapter as fa

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for name in names:
        if directory is None:
            fa.add_adapters(model, config, name)
        else:
            fa.load_adapters(model, os.path.join(directory, "adapters", name), name=name)
    fa.set_active_adapter(model, names if len(names) > 1 else names[0])
    return model


def train_tasks(datasets: list[dict], args, path: str, pad_id: int, label: str, procs: Processes):
    """Adapters for ``datasets`` on a fresh copy of the model; batches mix the tasks; with
    several processes each runs its part of every batch."""
    import fastadapter as fa

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    names = [d["name"] for d in datasets]
    config = fa.AdapterConfig(
        placement=args.placement, reduction_factor=args.reduction_factor, activation=args.activation, backend=args.backend
    )
    model = load_model(path, names, config)  # the same adapters in every process: the same seed
    counts = fa.mark_only_adapters_trainable(model, train_head=False)
    model = procs.wrap(model)
    held = parameter_mib(model)  # sharded: before a forward gathers the root's weights (FSDP2 keeps the root's)
    torch.manual_seed(args.seed + procs.rank)  # each process its own dropout draws, if the model has dropout
    total = args.max_steps
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    sched = warmup_then_linear(opt, total)
    batch_size = 2 * args.batch_size

    def scores(step: int) -> dict:
        out = {d["name"]: evaluate(model, d, i, len(names), pad_id, batch_size, procs) for i, d in enumerate(datasets)}
        for t, s in out.items():
            history.append({"step": step, "task": t, "accuracy": s["accuracy"], "eval_loss": s["loss"]})
        return out

    history: list[dict] = []
    before = scores(0)
    batches = mixed_batches(datasets, args.batch_size, rng)
    answers = [torch.tensor(d["answers"]) for d in datasets]
    losses, eval_seconds = [], 0.0
    start = time.perf_counter()
    bar = Progress(total, label, show=procs.main)
    for step in range(1, total + 1):
        model.train()
        rows, weight = procs.part(next(batches))  # the same global batch in every process
        ids, mask = _collate([datasets[t]["prompts"][i] for t, i in rows], pad_id)
        task_ids = torch.tensor([t for t, _ in rows])
        target = torch.stack([answers[t][datasets[t]["y"][i]] for t, i in rows])
        with _routed(model, len(names), task_ids):
            loss = procs.weighted(F.cross_entropy(next_token_logits(model, ids, mask).float(), target), weight)
            loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(procs.mean(loss.item()))
        history.append({"step": step, "loss": losses[-1]})
        if args.eval_every and step % args.eval_every == 0 and step < total:
            t0 = time.perf_counter()
            scores(step)
            eval_seconds += time.perf_counter() - t0
        bar.update(losses)
    bar.close()
    seconds = time.perf_counter() - start - eval_seconds
    after = scores(total)
    return model, {"steps": total, "batch_size": args.batch_size, "train_seconds": round(seconds, 1),
                   "processes": procs.world, "mode": procs.mode or "one process",
                   "peak_rss_mib": [round(m) for m in procs.gather(peak_rss_mib())],
                   "parameter_mib": [round(m) for m in procs.gather(held)],
                   "trainable": counts["trainable"], "first_loss": losses[0],
                   "last_loss_mean20": sum(losses[-20:]) / len(losses[-20:]),
                   "eval_before": before, "eval_after": after, "history": history}  # fmt: skip


def train(args, tasks: list[str], procs: Processes) -> dict:
    """``fastadapter train`` on a decoder: one task, or several with ``--tasks``."""
    from transformers import AutoConfig, AutoTokenizer

    import fastadapter as fa

    from . import plots

    path = model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    pad_id = _pad_id(tokenizer)
    datasets = [load_data(t, tokenizer, args) for t in tasks]
    cfg = AutoConfig.from_pretrained(path)
    shared = f", each of {procs.world} processes ({procs.mode}) a part" if procs.world > 1 else ""
    procs.print(f"{cfg.model_type} from {path} ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}): "
                f"{args.placement} adapters for {', '.join(tasks)}, {args.max_steps} steps of batch {args.batch_size}{shared}",
                flush=True)  # fmt: skip
    started = time.perf_counter()
    model, multi = train_tasks(datasets, args, path, pad_id, "+".join(tasks), procs)
    single = {}
    if len(tasks) > 1 and not args.no_single:
        for share, d in zip(shares(args.batch_size, len(tasks)), datasets):  # the examples it saw mixed
            alone = copy.copy(args)
            alone.batch_size = share
            single[d["name"]] = train_tasks([d], alone, path, pad_id, d["name"] + " alone", procs)[1]
    for t in tasks:
        procs.save_adapters(model, os.path.join(args.output, "adapters", t), t)
    if not procs.main:
        procs.barrier()
        return {**multi, "single": single}
    run = {"kind": "lm", "model": args.model if args.model in BUNDLED else os.path.abspath(path), "tasks": tasks,
           "labels": {d["name"]: d["labels"] for d in datasets}, "prompt_tokens": args.max_length,
           "placement": fa.adapter_configs(Processes.inner(model))[tasks[0]].placement}  # fmt: skip
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "run.json"), "w") as f:
        json.dump(run, f, indent=2)
    metrics = {**run, **multi, "single": single, "total_seconds": round(time.perf_counter() - started, 1)}
    with open(os.path.join(args.output, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    why_not = plots.available()
    if why_not is None:
        title = f"{args.model} ({cfg.model_type}), {run['placement']} adapters, {'+'.join(tasks)}: {args.max_steps} steps"
        curve = plots.training_curve(multi["history"], os.path.join(args.output, "curve.png"), title=title)
    else:
        curve = f"no plot ({why_not})"
    print(f"{args.max_steps} steps in {multi['train_seconds']:.0f}s, {multi['trainable'] / 1e3:.0f}k adapter parameters; "
          f"train loss {multi['first_loss']:.3f} -> {multi['last_loss_mean20']:.3f}; held-out accuracy "
          f"(greedy next token is the label; best of the labels):")  # fmt: skip
    for t in tasks:
        b, a = multi["eval_before"][t], multi["eval_after"][t]
        alone = f"; alone on the same examples {single[t]['eval_after'][t]['accuracy']:.3f}" if t in single else ""
        print(f"  {t}: {b['accuracy']:.3f} -> {a['accuracy']:.3f} ({b['choice_accuracy']:.3f} -> {a['choice_accuracy']:.3f}) "
              f"on {a['examples']} examples{alone}")  # fmt: skip
    print(f"saved to {args.output} ({metrics['total_seconds']:.0f}s in all); curves: {curve}")
    procs.barrier()
    return metrics


@torch.no_grad()
def generate(directory: str, items: list[tuple[str, str]], max_new_tokens: int = 1, batch_size: int = 16) -> list[str]:
    """The text each (task, text) prompt continues with: greedy, KV cache on, every row
    through its own task's adapters, one ``generate`` per batch whatever the mix of tasks."""
    from transformers import AutoTokenizer

    run = read_run(directory, "lm")
    unknown = sorted({t for t, _ in items} - set(run["tasks"]))
    if unknown:
        raise SystemExit(f"the run in {directory} has tasks {', '.join(run['tasks'])}, not {', '.join(unknown)}")
    path = model_path(run["model"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load_model(path, run["tasks"], directory=directory).eval()
    pad_id = _pad_id(tokenizer)
    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        ids, mask = _collate([prompt_ids(tokenizer, t, text, run["prompt_tokens"]) for t, text in chunk], pad_id)
        with _routed(model, len(run["tasks"]), torch.tensor([run["tasks"].index(t) for t, _ in chunk])):
            new = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad_id)[:, ids.shape[1] :]  # fmt: skip
        out += [tokenizer.decode(row, skip_special_tokens=True) for row in new]
    return out
