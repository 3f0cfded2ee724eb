"""A non-text model on device: personalize with a dict of arrays, predict with a dict.

Device side: bitfit.sdk only (no torch). Works with any bundle whose inputs are float
arrays (``tiny-mlp``: ``x: [batch, 8]``; ``tiny-cnn``: ``image: [batch, 3, 8, 8]``; see
``make_tiny_bundles.py``). The built-in user follows the general labelling rule of
``example_data.py`` but favours one class (``--habit``), as a sensor whose owner calls
borderline readings "high" would; the biases learn that shift.

    user_data = {"x": features, "labels": labels}          # labels: names or class indices
    personalizer.personalize(user_data, user="alice")
    personalizer.predict({"x": new_features}, user="alice").labels

Usage:
    python device_examples/numeric_model.py BUNDLE [--store DIR] [--user U] [--habit optimist]
        [--count 192] [--learning-rate 2e-3] [--epochs 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from typing import Any

import numpy as np

from bitfit.sdk import BitfitError, Personalizer

from example_data import NUMERIC_HABITS, classes_of, probe_inputs, user_examples


def run(bundle: str, store: str, user: str, *, habit: str, count: int, learning_rate: float, epochs: int) -> dict[str, Any]:
    personalizer = Personalizer(bundle, store=store)
    manifest = personalizer.bundle.manifest
    if manifest.text is not None:
        raise BitfitError("this bundle takes text; use inbox_app.py for it")
    train = user_examples(manifest, habit, count, seed=1)
    holdout = user_examples(manifest, habit, count, seed=2)   # the same user, new readings
    before = personalizer.evaluate(holdout, user=None)["accuracy"]
    r = personalizer.personalize(train, user=user, learning_rate=learning_rate, epochs=epochs, progress_bar=False)
    after = personalizer.evaluate(holdout, user=user)["accuracy"]
    probes = probe_inputs(manifest, rows=6)
    base_pred = personalizer.predict(probes, user=None)
    user_pred = personalizer.predict(probes, user=user)
    names = manifest.labels or list(range(classes_of(manifest)))
    return {
        "inputs": {k: list(v.shape) for k, v in train.items()}, "classes": list(names), "habit": habit,
        "train_label_counts": np.bincount(train["labels"], minlength=len(names)).tolist(),
        "version": r.version, "steps": r.steps, "train_seconds": round(r.seconds, 3), "delta_bytes": r.delta_bytes,
        "holdout_accuracy_before": before, "holdout_accuracy_after": after,
        "probes_base": base_pred.labels, "probes_user": user_pred.labels,
        "probe_max_probability_change": float(np.max(np.abs(user_pred.probabilities - base_pred.probabilities))),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", help="a bundle with numeric (float array) inputs")
    parser.add_argument("--store", help="delta store directory (default: a fresh temporary directory)")
    parser.add_argument("--user", default="alice")
    parser.add_argument("--habit", default="optimist", choices=sorted(NUMERIC_HABITS),
                        help="which class the user favours: optimist = last, critic = first, stoic = second")
    parser.add_argument("--count", type=int, default=192, help="training examples (and as many holdout ones)")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    args = parser.parse_args(argv)

    store = args.store or tempfile.mkdtemp(prefix="bitfit-numeric-")
    try:
        result = run(args.bundle, store, args.user, habit=args.habit, count=args.count,
                     learning_rate=args.learning_rate, epochs=args.epochs)
    except BitfitError as err:
        print(f"numeric_model: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    shapes = ", ".join(f"{k} {v}" for k, v in result["inputs"].items())
    print(f"numeric bundle, user data as a dict of arrays: {shapes}")
    print(f"  {args.user!r} ({args.habit}): label counts {dict(zip(result['classes'], result['train_label_counts']))}")
    print(f"  delta v{result['version']} ({result['delta_bytes']:,} bytes), {result['steps']} steps in {result['train_seconds']:.2f} s")
    print(f"  holdout accuracy {result['holdout_accuracy_before']:.2f} (base) -> {result['holdout_accuracy_after']:.2f} (with delta)")
    print(f"  the same 6 inputs: base {result['probes_base']}")
    print(f"                     user {result['probes_user']}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
