"""The users of ``make quality`` (:mod:`benchmarks.quality`) and the base models they start from.

A *suite* is one base model and its users. Each user has separate train and test examples and
a role: ``tuning`` users are the only ones learning rates are chosen on; ``held-aside`` users
are where the results are judged, and nothing is tuned on them.

- ``tweets``: the demo's base (``demo.base_model`` on the demo's general slice of tweets,
  MiniLM, 3-way sentiment). Users: the demo's four tweet domains; per domain a held-aside user
  (``cars-fan`` ...: the demo's user names, their own sample of the domain) and, for the
  first two domains, a disjoint tuning user (``tune-cars``, ``tune-festival``); 150 train /
  300 test tweets each.
- ``sms``: MiniLM with a ham/spam head by the same recipe, trained on a general SMS slice
  (the messages no user holds: 201 spam + 600 ham). Users: disjoint samples of the other
  messages with different spam shares (tuning 5% and 40%, held-aside 15% and 60%), 100 train /
  200 test each (the data set has 561 distinct spam messages).
- ``sms-bow``: a non-text bundle on the same SMS users: a small MLP (a torch module) over
  hashed bag-of-words features (numpy and ``zlib.crc32`` only, no scikit-learn), trained on
  the same general slice and exported with ``export_bundle(module, example_inputs={"x": ...})``.

Bases are cached under the work directory, keyed by their data and recipe, so a rerun only
re-exports the bundle when the exporter's code changed (see :func:`prepare_base`).

Example:
    >>> from benchmarks.quality_users import hashed_bow, tiny_suites
    >>> hashed_bow(["free prize now", "see you at 5"], features=16).shape
    (2, 16)
    >>> [(s.name, [u.role for u in s.users]) for s in tiny_suites()]
    [('text', ['tuning', 'tuning', 'held-aside']), ('bow', ['tuning', 'tuning', 'held-aside'])]
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

Pair = tuple[str, str]  # (text, label)
Role = Literal["tuning", "held-aside"]
RECIPE_VERSION = 1  # bump when a base recipe below changes: cached bases and torch results then rebuild

TWEET_USERS = (  # (domain, tuning user, held-aside user: the demo's name)
    ("self-driving-cars", "tune-cars", "cars-fan"),
    ("festival", "tune-festival", "festival-goer"),
    ("apple", "tune-apple", "apple-user"),
    ("airline:united", "tune-united", "united-flyer"),
)
SMS_TUNING_SHARES = (0.05, 0.40)
SMS_HELD_SHARES = (0.15, 0.60)
BOW_FEATURES = 256
BOW_HIDDEN = 64
_WORD = re.compile(r"[a-z0-9£$]+")


@dataclass
class QualityUser:
    """One simulated user: disjoint train and test examples, and the role in the evaluation.

    Example:
        >>> QualityUser("tweets", "cars-fan", "held-aside", [("a", "neutral")], [("b", "neutral")], "cars").key
        'tweets/cars-fan'
    """

    suite: str
    name: str
    role: Role
    train: list[Pair]
    test: list[Pair]
    note: str

    @property
    def key(self) -> str:
        """``suite/name``, unique in a run.

        Example:
            >>> QualityUser("sms", "spam-15pct", "held-aside", [], [], "").key
            'sms/spam-15pct'
        """
        return f"{self.suite}/{self.name}"

    def fingerprint(self) -> str:
        """A hash of the user's data: part of every cached result's key.

        Example:
            >>> len(QualityUser("sms", "u", "tuning", [("a", "ham")], [("b", "spam")], "").fingerprint())
            16
        """
        return _hash({"train": self.train, "test": self.test})


@dataclass
class Suite:
    """One base model (``arch`` over ``labels``, trained on ``general``) and its users.

    ``kind`` says what the SDK is given: ``text`` takes (text, label) pairs, ``numeric`` takes
    ``({"x": hashed_bow(texts)}, labels)``.

    Example:
        >>> s = tiny_suites()[1]
        >>> s.kind, s.arch, len(s.user_data(s.users[0].train)[0]["x"][0])
        ('numeric', 'bow-mlp', 64)
    """

    name: str
    kind: Literal["text", "numeric"]
    arch: Literal["minilm", "tiny", "bow-mlp"]
    labels: list[str]
    general: list[Pair]
    users: list[QualityUser]
    description: str
    max_length: int = 64
    features: int = BOW_FEATURES

    def user_data(self, pairs: list[Pair]) -> Any:
        """The user's examples in the form ``Personalizer.personalize`` takes for this suite.

        Example:
            >>> tiny_suites()[0].user_data([("great crew", "positive")])
            [('great crew', 'positive')]
        """
        if self.kind == "text":
            return list(pairs)
        return {"x": hashed_bow([t for t, _ in pairs], self.features)}, [label for _, label in pairs]

    def fingerprint(self) -> str:
        """A hash of the base's data and recipe (not of its users).

        Example:
            >>> tiny_suites()[0].fingerprint() == tiny_suites()[0].fingerprint()
            True
        """
        return _hash({"recipe": RECIPE_VERSION, "arch": self.arch, "labels": self.labels, "general": self.general,
                      "max_length": self.max_length, "features": self.features})


# ----------------------------------------------------------------------------- suites


def full_suites(train_tweets: int = 150, test_tweets: int = 300, train_sms: int = 100, test_sms: int = 200,
                tweet_tuning_users: int = 2) -> list[Suite]:
    """The real-data suites: ``tweets`` (the first ``tweet_tuning_users`` domains' tuning users and
    all four held-aside users), ``sms`` and ``sms-bow`` (2 tuning + 2 held-aside users each).

    Two tweet tuning users, not four, keep the full run inside its time budget on 2 busy cores
    (each MiniLM grid point is a fine-tuning run per tuning user); pass 4 where cores allow.

    Example:
        >>> [len(s.users) for s in full_suites()]                                          # doctest: +SKIP
        [6, 4, 4]
    """
    return [_tweet_suite(TWEET_USERS, 500, train_tweets, test_tweets, tuning_users=tweet_tuning_users),
            *_sms_suites(SMS_TUNING_SHARES, SMS_HELD_SHARES, train_sms, test_sms)]


def quick_suites() -> list[Suite]:
    """Fewer, smaller users on the same real data: one tuning and one held-aside user per suite.

    Example:
        >>> [[u.name for u in s.users] for s in quick_suites()]                            # doctest: +SKIP
        [['tune-festival', 'festival-goer'], ['spam-40pct', 'spam-15pct'], ['spam-40pct', 'spam-15pct']]
    """
    return [_tweet_suite(TWEET_USERS[1:2], 200, 80, 150), *_sms_suites((0.40,), (0.15,), 80, 150)]


def tiny_suites(tuning: int = 2, held: int = 1) -> list[Suite]:
    """The test suite's: the tiny BERT and a small MLP on synthetic sentences (seconds), with
    ``tuning`` tuning users and ``held`` held-aside users each.

    Example:
        >>> [s.arch for s in tiny_suites()], [u.role for u in tiny_suites(1, 1)[0].users]
        (['tiny', 'bow-mlp'], ['tuning', 'held-aside'])
    """
    from .workspace import LABELS, synthetic_corpus

    corpus = synthetic_corpus(users=tuning + held, per_domain=48, general_size=90, seed=0)
    suites = []
    for name, kind, arch in (("text", "text", "tiny"), ("bow", "numeric", "bow-mlp")):
        users = [QualityUser(name, domain, "tuning" if i < tuning else "held-aside", corpus.by_domain[domain][:24],
                             corpus.by_domain[domain][24:], f"synthetic, '{domain}' flips a word")
                 for i, domain in enumerate(corpus.users)]
        suites.append(Suite(name, kind, arch, list(LABELS), corpus.general, users,  # type: ignore[arg-type]
                            "synthetic sentences (test suite)", max_length=32, features=64))
    return suites


def _tweet_suite(domains: tuple[tuple[str, str, str], ...], per_label: int, train: int, test: int,
                 tuning_users: int | None = None) -> Suite:
    from demo.datasets import TWEET_LABELS, demo_tweets, general_slice, sample

    tweets = demo_tweets()
    general = general_slice(tweets, per_label)
    users = []
    for index, (domain, tuning, held) in enumerate(domains):
        chosen = [(t.text, t.label) for t in sample(tweets[domain], 2 * (train + test), seed=2000 + index)]
        for role, name, part in (("tuning", tuning, chosen[: train + test]), ("held-aside", held, chosen[train + test:])):
            if role == "tuning" and tuning_users is not None and index >= tuning_users:
                continue
            users.append(QualityUser("tweets", name, role, part[:train], part[train:], domain))  # type: ignore[arg-type]
    users.sort(key=lambda u: u.role != "tuning")
    return Suite("tweets", "text", "minilm", list(TWEET_LABELS), [(t.text, t.label) for t in general], users,
                 f"the demo's base: MiniLM + a 3-way head on the demo's general slice ({len(general)} tweets, "
                 "label-balanced, topics no user tweets about)")


def _sms_suites(tuning: tuple[float, ...], held: tuple[float, ...], train: int, test: int) -> list[Suite]:
    from demo.datasets import SMS_LABELS, load_sms_spam

    seen: set[str] = set()
    messages = [(t, label) for t, label in load_sms_spam() if not (t in seen or seen.add(t))]  # type: ignore[func-returns-value]
    rng = np.random.default_rng(0)
    pools = {label: [messages[i] for i in rng.permutation(len(messages)) if messages[i][1] == label] for label in SMS_LABELS}
    users = []
    for role, shares in (("tuning", tuning), ("held-aside", held)):
        for share in shares:
            parts = []
            for count in (train, test):
                spam = int(round(share * count))
                part = [pools["spam"].pop() for _ in range(spam)] + [pools["ham"].pop() for _ in range(count - spam)]
                parts.append([part[i] for i in rng.permutation(len(part))])
            users.append(QualityUser("sms", f"spam-{100 * share:.0f}pct", role, parts[0], parts[1],  # type: ignore[arg-type]
                                     f"{100 * share:.0f}% spam"))
    # The general slice: messages no user holds, at most 600 ham, all the spam left (201 in full).
    general = pools["spam"][:200 + 1] + pools["ham"][:600]
    general = [general[i] for i in rng.permutation(len(general))]
    spam_share = sum(label == "spam" for _, label in general) / len(general)
    text = Suite("sms", "text", "minilm", list(SMS_LABELS), general, users,
                 f"MiniLM + a ham/spam head by the demo's recipe on a general SMS slice ({len(general)} messages, "
                 f"{100 * spam_share:.0f}% spam, none of them a user's)")
    numeric_users = [QualityUser("sms-bow", u.name, u.role, u.train, u.test, u.note) for u in users]
    numeric = Suite("sms-bow", "numeric", "bow-mlp", list(SMS_LABELS), general, numeric_users,
                    f"non-text bundle: an MLP ({BOW_FEATURES} -> {BOW_HIDDEN} -> 2) over hashed bag-of-words features of "
                    f"the same SMS messages, trained on the same general slice")
    return [text, numeric]


# ----------------------------------------------------------------------------- features and models


def hashed_bow(texts: list[str], features: int = BOW_FEATURES) -> np.ndarray:
    """Hashed bag of words: lower-cased word counts in ``features`` buckets (crc32), log1p,
    each row scaled to unit length. Numpy only, so a device could compute it too.

    Example:
        >>> x = hashed_bow(["WIN a prize", "win"], features=8)
        >>> x.dtype, bool(np.allclose(np.linalg.norm(x, axis=1), 1.0))
        (dtype('float32'), True)
    """
    out = np.zeros((len(texts), features), np.float32)
    for row, text in enumerate(texts):
        for word in _WORD.findall(text.lower()):
            out[row, zlib.crc32(word.encode("utf-8")) % features] += 1.0
    out = np.log1p(out)
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norm, 1e-12)


def bow_mlp(features: int, classes: int, hidden: int = BOW_HIDDEN) -> Any:
    """The numeric suite's model: ``x`` -> Linear -> ReLU -> ``head`` (Linear); ``embed(x)`` is
    the hidden layer, so head-only tuning works as for the text models.

    Example:
        >>> import torch
        >>> bow_mlp(8, 2)(torch.zeros(3, 8)).shape
        torch.Size([3, 2])
    """
    import torch

    class BowMLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hidden = torch.nn.Linear(features, hidden)
            self.head = torch.nn.Linear(hidden, classes)

        def embed(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.hidden(x))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(x))

    torch.manual_seed(0)
    return BowMLP().eval()


def new_model(suite: Suite) -> Any:
    """A fresh, untrained-head model of the suite's architecture (the torch side's "load").

    Example:
        >>> new_model(tiny_suites()[1]).head.out_features
        3
    """
    if suite.arch == "bow-mlp":
        return bow_mlp(suite.features, len(suite.labels))
    if suite.arch == "tiny":
        from .workspace import build_model

        return build_model("tiny", suite.labels)
    from bitfit.export.minilm import MeanPoolClassifier
    from demo.base_model import quiet_transformers

    with quiet_transformers():
        return MeanPoolClassifier.from_packaged(suite.labels)


def _fit_bow_mlp(model: Any, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """The numeric base: the whole MLP, 300 full-batch Adam steps, 80% / 20% like the text heads."""
    import torch

    order = np.random.default_rng(0).permutation(len(y))
    cut = len(y) // 5
    valid, train = order[:cut], order[cut:]
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(300):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(xt[train]), yt[train]).backward()
        optimizer.step()
    with torch.no_grad():
        predicted = model(xt).argmax(-1)
    return {"general_examples": len(y), "head_train_accuracy": float((predicted[train] == yt[train]).float().mean()),
            "head_valid_accuracy": float((predicted[valid] == yt[valid]).float().mean())}


# ----------------------------------------------------------------------------- bases


@dataclass
class Base:
    """A suite's base model on disk: its torch weights (``weights``), its bundle, the keys.

    ``key`` identifies the base model (data + recipe): cached torch results are keyed by it.

    Example:
        >>> base = prepare_base(tiny_suites()[1], Path("/tmp/q"))                           # doctest: +SKIP
        >>> base.load_model().head.out_features, base.bundle.manifest.labels                # doctest: +SKIP
        (3, ['negative', 'neutral', 'positive'])
    """

    suite: Suite
    directory: Path
    key: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def bundle_dir(self) -> Path:
        """The exported bundle's directory.

        Example:
            >>> Base(tiny_suites()[0], Path("/tmp/q/text"), "k").bundle_dir.name
            'bundle'
        """
        return self.directory / "bundle"

    @property
    def bundle(self) -> Any:
        """The bundle, opened (``bitfit.sdk.Bundle``).

        Example:
            >>> prepare_base(tiny_suites()[0], Path("/tmp/q")).bundle.manifest.per_row      # doctest: +SKIP
            True
        """
        from bitfit.sdk.bundle import Bundle

        return Bundle.open(self.bundle_dir, verify="none")

    def load_model(self) -> Any:
        """A fresh torch copy of the base, read from disk (what a PyTorch user loads).

        Example:
            >>> prepare_base(tiny_suites()[1], Path("/tmp/q")).load_model().training          # doctest: +SKIP
            False
        """
        import torch

        model = new_model(self.suite)
        model.load_state_dict(torch.load(self.directory / "base.pt", weights_only=True))
        return model.eval()


def prepare_base(suite: Suite, work_dir: Path, *, log: Any = print) -> Base:
    """The suite's base model and bundle under ``work_dir/<suite>``, built or reused.

    The torch weights are rebuilt when the suite's data or recipe changed (``Suite.fingerprint``);
    the bundle is re-exported from them when, in addition, the exporter's or the SDK's bundle
    code changed (a new manifest field, new training defaults), so the SDK column always runs
    on what ``export_bundle`` writes today.

    Example:
        >>> base = prepare_base(tiny_suites()[0], Path("/tmp/q"), log=lambda *a: None)      # doctest: +SKIP
        >>> base.bundle_dir.is_dir()                                                        # doctest: +SKIP
        True
    """
    import torch

    directory = Path(work_dir) / suite.name
    directory.mkdir(parents=True, exist_ok=True)
    key, bundle_key = suite.fingerprint(), _hash({"base": suite.fingerprint(), "code": _exporter_code_hash()})
    meta_path = directory / "base.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    base = Base(suite, directory, key, meta.get("info", {}))
    if meta.get("key") != key or not (directory / "base.pt").is_file():
        log(f"[{suite.name}] base: training ({suite.arch}, {len(suite.general)} general examples) ...")
        t = time.perf_counter()
        model = new_model(suite)
        if suite.kind == "text":
            from demo.base_model import fit_base_head, text_encoder

            from .workspace import tokenizer_file

            info = fit_base_head(model, text_encoder(tokenizer_file(), suite.max_length), suite.general, suite.labels)
        else:
            y = np.array([suite.labels.index(label) for _, label in suite.general], np.int64)
            info = _fit_bow_mlp(model, hashed_bow([t for t, _ in suite.general], suite.features), y)
        info["seconds"] = time.perf_counter() - t
        torch.save(model.state_dict(), directory / "base.pt")
        base.info, meta = info, {"key": key, "info": info}
        meta_path.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    if meta.get("bundle_key") != bundle_key or not (base.bundle_dir / "manifest.json").is_file():
        log(f"[{suite.name}] bundle: exporting ...")
        t = time.perf_counter()
        _export(suite, base.load_model(), base.bundle_dir)
        meta["bundle_key"] = bundle_key
        meta["export_seconds"] = time.perf_counter() - t
        meta_path.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return base


def _export(suite: Suite, model: Any, bundle_dir: Path) -> None:
    from bitfit.export import export_bundle

    if suite.kind == "text":
        from bitfit.export.minilm import example_text_inputs

        from .workspace import tokenizer_file

        export_bundle(model, bundle_dir, example_inputs=example_text_inputs(tokenizer_file(), suite.max_length),
                      labels=suite.labels, tokenizer=tokenizer_file(), max_length=suite.max_length, overwrite=True)
    else:
        x = hashed_bow([t for t, _ in suite.general[:2]], suite.features)
        export_bundle(model, bundle_dir, example_inputs={"x": x}, labels=suite.labels, overwrite=True)


def _exporter_code_hash() -> str:
    root = Path(__file__).resolve().parents[1]
    files = sorted([*(root / "export").glob("*.py"), root / "sdk" / "bundle.py"])
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


