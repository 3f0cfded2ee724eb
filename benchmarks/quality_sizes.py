"""``make bench``'s quality section: holdout accuracy per "user" (a tweet domain) of the base
model, SDK BitFit (``Personalizer.personalize``), PyTorch full fine-tuning and head-only
tuning, for several numbers of user examples, every method with the same explicit options.
The per-user evaluation with the SDK's *defaults* against tuned PyTorch baselines, learning
rates chosen on tuning users and reported on held-aside ones, is ``benchmarks.quality``
(``make quality``).

Fair by construction: every method sees the same de-duplicated, tokenized examples in
the same shuffled batches (the Personalizer's own order for ``seed``), for the same
number of epochs, and is scored on the same holdout. Learning rates are per method,
chosen on a separate development user (``tune_learning_rates``) or given.

Example:
    >>> from benchmarks.quality_sizes import DEFAULT_LRS
    >>> sorted(DEFAULT_LRS)
    ['bitfit', 'full', 'head']
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bitfit.sdk.data import Examples, batches, load_examples
from bitfit.sdk.personalizer import Personalizer

from .timing import Stopwatch
from .torch_recipes import TorchTrainer, train_head
from .workspace import Workspace, embed

METHODS = ("base", "sdk-bitfit", "torch-full", "torch-head")
DEFAULT_LRS = {"bitfit": 3e-3, "full": 3e-5, "head": 1e-2}
LR_GRIDS = {"bitfit": [1e-3, 3e-3, 1e-2], "full": [1e-5, 3e-5, 1e-4], "head": [3e-3, 1e-2, 3e-2]}


def _split(pool: list, holdout_size: int, seed: int) -> tuple[list, list]:
    order = np.random.default_rng(seed).permutation(len(pool))
    return [pool[i] for i in order[:holdout_size]], [pool[i] for i in order[holdout_size:]]


def _personalizer_order(examples: Examples, seed: int) -> tuple[Examples, np.random.Generator]:
    """The training examples in the order Personalizer uses (holdout=0), and its rng state
    afterwards, so the torch recipes draw the same shuffles epoch by epoch."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(examples))  # split_holdout's permutation (holdout 0 keeps all)
    return examples.subset(order), rng


class _User:
    """One user's data, tokenized once, and the scores of the base model on it."""

    def __init__(self, ws: Workspace, domain: str, holdout_size: int, seed: int):
        holdout, rest = _split(ws.corpus.by_domain[domain], holdout_size, seed)
        self.ws, self.domain, self.rest = ws, domain, rest
        self.held = load_examples(holdout, ws.bundle, ws.encoder)
        self.held_batches = list(batches(self.held, ws.encoder, 64, None))
        self.labels = np.concatenate([y for _, y in self.held_batches])
        self.held_embeddings = embed(ws.model, (f for f, _ in self.held_batches))

    def train_examples(self, n: int) -> Examples:
        return load_examples(self.rest[:n], self.ws.bundle, self.ws.encoder)

    def accuracy(self, logits: np.ndarray) -> float:
        return float((logits.argmax(-1) == self.labels).mean())


def _sdk_bitfit(user: _User, personalizer: Personalizer, n: int, *, epochs: int, lr: float, batch_size: int,
                seed: int) -> float:
    name = f"quality-{user.domain}-{n}-{lr:g}"
    personalizer.personalize(user.rest[:n], user=name, epochs=epochs, learning_rate=lr, batch_size=batch_size,
                             holdout=0.0, patience=None, encoding="fp32", reset=True, seed=seed, progress_bar=False)
    predictor = personalizer.predictor
    predictor.invalidate(name)
    return user.accuracy(np.concatenate([predictor.logits(f, [name] * len(y)) for f, y in user.held_batches]))


def _torch_full(user: _User, n: int, *, epochs: int, lr: float, batch_size: int, seed: int) -> float:
    train, rng = _personalizer_order(user.train_examples(n), seed)
    trainer = TorchTrainer(user.ws.fresh_model(), "full", lr)
    for _ in range(epochs):
        for feeds, labels in batches(train, user.ws.encoder, batch_size, rng):
            trainer.step(feeds, labels)
    return user.accuracy(np.concatenate([trainer.logits(f) for f, _ in user.held_batches]))


def _torch_head(user: _User, n: int, *, epochs: int, lr: float, batch_size: int, seed: int) -> float:
    train, rng = _personalizer_order(user.train_examples(n), seed)
    x = embed(user.ws.model, (f for f, _ in batches(train, user.ws.encoder, 64, None)))
    head = torch.nn.Linear(user.ws.model.head.in_features, user.ws.model.head.out_features)
    head.load_state_dict(user.ws.model.head.state_dict())
    train_head(head, x, train.labels, epochs=epochs, lr=lr, batch_size=batch_size, rng=rng)
    with torch.no_grad():
        return user.accuracy(head(torch.from_numpy(user.held_embeddings)).numpy())


def _base(user: _User, personalizer: Personalizer) -> float:
    predictor = personalizer.predictor
    return user.accuracy(np.concatenate([predictor.logits(f, [None] * len(y)) for f, y in user.held_batches]))


def _run(method: str, user: _User, personalizer: Personalizer, n: int, *, epochs: int, lr: float, batch_size: int,
         seed: int) -> float:
    if method == "sdk-bitfit":
        return _sdk_bitfit(user, personalizer, n, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    if method == "torch-full":
        return _torch_full(user, n, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    return _torch_head(user, n, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)


_LR_KEY = {"sdk-bitfit": "bitfit", "torch-full": "full", "torch-head": "head"}


def tune_learning_rates(
    ws: Workspace, *, domain: str, n: int, holdout_size: int, epochs: int, batch_size: int = 16,
    grids: dict[str, list[float]] = LR_GRIDS, seed: int = 0,
) -> dict[str, Any]:
    """Pick each method's learning rate by holdout accuracy on a development user."""
    user = _User(ws, domain, holdout_size, seed)
    rows, chosen = [], {}
    with tempfile.TemporaryDirectory(dir=ws.work_dir) as tmp:
        personalizer = Personalizer(ws.bundle, Path(tmp), threads=ws.threads, verify="none")
        base = _base(user, personalizer)
        for method, key in _LR_KEY.items():
            best = None
            for lr in grids[key]:
                acc = _run(method, user, personalizer, n, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
                rows.append({"method": method, "learning_rate": lr, "accuracy": acc})
                if best is None or acc > best[1]:
                    best = (lr, acc)
            chosen[key] = best[0]
    return {"domain": domain, "examples": n, "holdout": len(user.labels), "epochs": epochs, "base_accuracy": base,
            "rows": rows, "chosen": chosen}


def quality(
    ws: Workspace, *, users: list[str], sizes: list[int], holdout_size: int, epochs: int, batch_size: int = 16,
    lrs: dict[str, float] = DEFAULT_LRS, seed: int = 0,
) -> dict[str, Any]:
    """Accuracy of every method per user and number of examples, and BitFit's share of
    the full fine-tuning gain."""
    rows = []
    with tempfile.TemporaryDirectory(dir=ws.work_dir) as tmp:
        personalizer = Personalizer(ws.bundle, Path(tmp), threads=ws.threads, verify="none")
        for domain in users:
            user = _User(ws, domain, holdout_size, seed)
            base = _base(user, personalizer)
            for n in sizes:
                row = {"user": domain, "size": n, "examples": min(n, len(user.rest)), "holdout": len(user.labels), "base": base}
                for method, key in _LR_KEY.items():
                    with Stopwatch() as clock:
                        row[method] = _run(method, user, personalizer, n, epochs=epochs, lr=lrs[key],
                                           batch_size=batch_size, seed=seed)
                    row[f"{method}_seconds"] = clock.seconds
                rows.append(row)
    return {"rows": rows, "summary": summarize(rows, sizes), "epochs": epochs, "batch_size": batch_size,
            "learning_rates": dict(lrs), "holdout_size": holdout_size}


def gain_fraction(bitfit: float, full: float, base: float) -> float | None:
    """(bitfit - base) / (full - base); None when full fine-tuning gained nothing."""
    gain = full - base
    return (bitfit - base) / gain if gain > 1e-12 else None


def summarize(rows: list[dict[str, Any]], sizes: list[int]) -> list[dict[str, Any]]:
    """Mean accuracy of each method per size over users, and the recovered gain fraction
    computed from the summed gains (so one user with a tiny full-FT gain cannot dominate)."""
    out = []
    for n in [*sizes, "all"]:
        part = [r for r in rows if n == "all" or r["size"] == n]
        if not part:
            continue
        mean = {m: float(np.mean([r[m] for r in part])) for m in METHODS}
        bitfit_gain = float(np.sum([r["sdk-bitfit"] - r["base"] for r in part]))
        full_gain = float(np.sum([r["torch-full"] - r["base"] for r in part]))
        head_gain = float(np.sum([r["torch-head"] - r["base"] for r in part]))
        out.append({"size": n, "users": len(part), **mean,
                    "bitfit_share_of_full_gain": bitfit_gain / full_gain if full_gain > 1e-12 else None,
                    "head_share_of_full_gain": head_gain / full_gain if full_gain > 1e-12 else None})
    return out
