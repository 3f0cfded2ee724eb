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

``--users quality-tuning`` uses ``make quality``'s four tweet *tuning* users instead (its base
bundle, built by ``make quality``; nothing of its held-aside users), each personalized with
``--seeds`` training seeds, and also times PyTorch BitFit (3 epochs of 16 at 3e-3, seed 0) on
each user in the same process for a side-by-side time ratio; ``--users quality-sms-tuning``
does the same with its two SMS tuning users (100 messages each, 5% and 40% spam; BitFit at
1e-3)::

    HF_HUB_OFFLINE=1 .venv/bin/python tools/tune_defaults.py --users quality-tuning --seeds 3 \\
        --set BATCH_SIZE=16 --set EPOCHS=3 --set EVALUATIONS=6

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


# PyTorch BitFit's learning rate per make quality suite: the value its grid chose (2026-12-02 runs).
QUALITY_TORCH_BITFIT_LR = {"tweets": 3e-3, "sms": 1e-3}


def quality_tuning(suite_name: str = "tweets") -> tuple[list[tuple[str, list, list]], str, object]:
    """``make quality``'s tuning users of ``suite_name`` (tweets: all four domains'; sms: the 5%
    and 40% spam users), as :func:`users` gives them, its base bundle (prepared if missing) and
    a timer of PyTorch BitFit (the suite's chosen rate, seed 0) on a user."""
    from benchmarks.quality import WORK, Cache, Session
    from benchmarks.quality_users import TWEET_USERS, full_suites, prepare_base

    suite = next(s for s in full_suites(tweet_tuning_users=len(TWEET_USERS)) if s.name == suite_name)
    base = prepare_base(suite, WORK / "quality", log=lambda message: None)
    session = Session(base, Cache(WORK / "quality" / "cache.json"), log=lambda message: None)
    tuning = {u.name: u for u in suite.users if u.role == "tuning"}

    def torch_seconds(user: str) -> float:
        return float(session.torch(tuning[user], "torch-bitfit", QUALITY_TORCH_BITFIT_LR[suite_name], fresh=True)["seconds"])

    return [(u.name, u.train, u.test) for u in tuning.values()], str(base.bundle_dir), torch_seconds


def run_variant(bundle: str, variant: str, people: list, overrides: dict, bundle_lr: float | None = None,
                seeds: int = 1, torch_seconds=None) -> list[dict]:
    """Personalize every user with one variant (``seeds`` runs each); test accuracy and seconds per run,
    and, with ``torch_seconds(user)``, PyTorch BitFit's seconds on the user (first seed only)."""
    from bitfit.sdk import Personalizer
    from bitfit.sdk import training_plan

    saved = {k: getattr(training_plan, k) for k in overrides}
    rows = []
    try:
        for k, v in overrides.items():
            setattr(training_plan, k, v)
        with tempfile.TemporaryDirectory() as store:
            for (person, train, test), seed in ((person, seed) for person in people for seed in range(seeds)):
                user = person if seeds == 1 else f"{person}#seed{seed}"  # each seed starts from the base
                opened = time.perf_counter()
                p = Personalizer(bundle, store=store)
                if bundle_lr is not None:  # as if the bundle had been exported with this default
                    p.bundle.manifest.training_defaults["learning_rate"] = bundle_lr
                started = time.perf_counter()
                if variant == "defaults":
                    r = p.personalize(train, user=user, progress_bar=False, seed=seed)
                else:
                    lr = float(variant.split(":")[1])
                    r = p.personalize(train, user=user, epochs=5, learning_rate=lr, holdout=0.0, schedule="constant",
                                      batch_size=16, progress_bar=False, seed=seed)
                seconds = time.perf_counter() - opened
                base = p.evaluate(test)["accuracy"]
                after = p.evaluate(test, user=user)["accuracy"] if r.saved else base
                rows.append({"variant": variant, "overrides": overrides, "bundle_lr": bundle_lr, "user": user, "seed": seed,
                             "base": base, "after": after,
                             "seconds": round(seconds, 2), "train_seconds": round(r.seconds, 2), "steps": r.steps,
                             "saved": r.saved, "retried": r.retried, "kept_step": r.kept_step,
                             "warnings": len(r.warnings), "load_seconds": round(started - opened, 2)})
                if torch_seconds is not None and seed == 0:
                    rows[-1]["torch_bitfit_seconds"] = round(torch_seconds(person), 2)
                print(json.dumps(rows[-1]), flush=True)
    finally:
        for k, v in saved.items():
            setattr(training_plan, k, v)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="demo_out/bundle")
    parser.add_argument("--users", choices=["tune", "aside", "quality-tuning", "quality-sms-tuning"], default="tune")
    parser.add_argument("--seeds", type=int, default=1, help="training seeds per user")
    parser.add_argument("--variant", action="append", default=[], help="defaults | recipe:LR")
    parser.add_argument("--set", action="append", default=[], help="NAME=VALUE override of a training_plan constant")
    parser.add_argument("--train", type=int, default=150)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--out", help="append JSON lines here")
    parser.add_argument("--bundle-lr", type=float, help="the bundle's training_defaults learning rate, for defaults")
    args = parser.parse_args(argv)
    torch_seconds = None
    if args.users in ("quality-tuning", "quality-sms-tuning"):
        people, args.bundle, torch_seconds = quality_tuning("tweets" if args.users == "quality-tuning" else "sms")
    else:
        people = users(args.users, args.train, args.test)
    overrides = dict(parse_override(x) for x in args.set)
    summary = []
    for variant in args.variant or ["defaults"]:
        rows = run_variant(args.bundle, variant, people, overrides if variant == "defaults" else {},
                           args.bundle_lr if variant == "defaults" else None, args.seeds, torch_seconds)
        gain = float(np.mean([r["after"] - r["base"] for r in rows]))
        timed = [r for r in rows if "torch_bitfit_seconds" in r]
        ratio = float(np.mean([r["seconds"] / r["torch_bitfit_seconds"] for r in timed])) if timed else None
        summary.append((variant, overrides if variant == "defaults" else {}, gain,
                        float(np.mean([r["seconds"] for r in rows])), float(np.mean([r["after"] for r in rows])), ratio))
        if args.out:
            with open(args.out, "a", encoding="utf-8") as fh:
                for r in rows:
                    fh.write(json.dumps(r) + "\n")
    for variant, over, gain, seconds, accuracy, ratio in summary:
        print(f"{variant:14s} {over} mean accuracy {accuracy:.4f} (gain {gain:+.4f})  mean seconds {seconds:.1f}"
              + (f"  mean SDK / PyTorch BitFit time {ratio:.2f}x" if ratio is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
