"""The protocol the SDK's personalize defaults were tuned on (``sdk/training_plan.py``).

Per-domain tweet users on the demo's base bundle (MiniLM + a sentiment head trained on the
general slice): each user personalizes on ``--train`` of their tweets and is scored on
``--test`` others. Variants: the SDK's defaults (optionally with plan constants overridden),
and the PyTorch BitFit recipe run through the SDK (constant learning rate, no holdout, fixed
epochs: the parity tests show the SDK reproduces PyTorch BitFit's numbers for the same recipe)
over a learning-rate grid. Tuning users and held-aside users are kept apart: decide on the
first, check on the second.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/tune_defaults.py --bundle demo_out/bundle \\
        --users tune --variant defaults --variant recipe:1e-3 --set EPOCHS=8

Example:
    >>> from tools.tune_defaults import parse_override
    >>> parse_override("EPOCHS=8")
    ('EPOCHS', 8)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TUNE_USERS = [("self-driving-cars", 0), ("apple", 0), ("self-driving-cars", 1), ("apple", 1)]
ASIDE_USERS = [("festival", 0), ("airline:united", 0), ("festival", 1), ("airline:united", 1)]


def parse_override(text: str) -> tuple[str, float | int]:
    """``NAME=VALUE`` for a ``bitfit.sdk.training_plan`` constant.

    Example:
        >>> parse_override("HOLDOUT_FRACTION=0.15")
        ('HOLDOUT_FRACTION', 0.15)
    """
    name, value = text.split("=", 1)
    number = float(value)
    return name, int(number) if number.is_integer() and "." not in value and "e" not in value else number


def users(which: str, train: int, test: int) -> list[tuple[str, list, list]]:
    """(user id, train pairs, test pairs) per user of the ``tune`` or ``aside`` set."""
    from demo.datasets import demo_tweets, sample

    domains = demo_tweets()
    out = []
    for domain, seed in (TUNE_USERS if which == "tune" else ASIDE_USERS):
        pool = sample(domains[domain], train + test, seed=1000 + seed)
        pairs = [(t.text, t.label) for t in pool]
        out.append((f"{domain}#{seed}", pairs[:train], pairs[train:]))
    return out


def run_variant(bundle: str, variant: str, people: list, overrides: dict, bundle_lr: float | None = None) -> list[dict]:
    """Personalize every user with one variant; test accuracy and seconds per user."""
    from bitfit.sdk import Personalizer
    from bitfit.sdk import training_plan

    saved = {k: getattr(training_plan, k) for k in overrides}
    rows = []
    try:
        for k, v in overrides.items():
            setattr(training_plan, k, v)
        with tempfile.TemporaryDirectory() as store:
            for user, train, test in people:
                opened = time.perf_counter()
                p = Personalizer(bundle, store=store)
                if bundle_lr is not None:  # as if the bundle had been exported with this default
                    p.bundle.manifest.training_defaults["learning_rate"] = bundle_lr
                started = time.perf_counter()
                if variant == "defaults":
                    r = p.personalize(train, user=user, progress_bar=False)
                else:
                    lr = float(variant.split(":")[1])
                    r = p.personalize(train, user=user, epochs=5, learning_rate=lr, holdout=0.0, schedule="constant",
                                      batch_size=16, progress_bar=False)
                seconds = time.perf_counter() - opened
                base = p.evaluate(test)["accuracy"]
                after = p.evaluate(test, user=user)["accuracy"] if r.saved else base
                rows.append({"variant": variant, "overrides": overrides, "bundle_lr": bundle_lr, "user": user, "base": base, "after": after,
                             "seconds": round(seconds, 2), "train_seconds": round(r.seconds, 2), "steps": r.steps,
                             "saved": r.saved, "retried": r.retried, "kept_step": r.kept_step,
                             "warnings": len(r.warnings), "load_seconds": round(started - opened, 2)})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        for k, v in saved.items():
            setattr(training_plan, k, v)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="demo_out/bundle")
    parser.add_argument("--users", choices=["tune", "aside"], default="tune")
    parser.add_argument("--variant", action="append", default=[], help="defaults | recipe:LR")
    parser.add_argument("--set", action="append", default=[], help="NAME=VALUE override of a training_plan constant")
    parser.add_argument("--train", type=int, default=150)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--out", help="append JSON lines here")
    parser.add_argument("--bundle-lr", type=float, help="the bundle's training_defaults learning rate, for defaults")
    args = parser.parse_args(argv)
    people = users(args.users, args.train, args.test)
    overrides = dict(parse_override(x) for x in args.set)
    summary = []
    for variant in args.variant or ["defaults"]:
        rows = run_variant(args.bundle, variant, people, overrides if variant == "defaults" else {},
                           args.bundle_lr if variant == "defaults" else None)
        gain = float(np.mean([r["after"] - r["base"] for r in rows]))
        summary.append((variant, overrides if variant == "defaults" else {}, gain,
                        float(np.mean([r["seconds"] for r in rows]))))
        if args.out:
            with open(args.out, "a", encoding="utf-8") as fh:
                for r in rows:
                    fh.write(json.dumps(r) + "\n")
    for variant, over, gain, seconds in summary:
        print(f"{variant:14s} {over} mean gain {gain:+.4f}  mean seconds {seconds:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
