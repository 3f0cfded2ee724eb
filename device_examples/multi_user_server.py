"""Serve many users' deltas from one ``Predictor`` session: mixed per-row batches.

Device/server side: bitfit.sdk only (no torch). Each request batch mixes rows from many
users (and signed-out users, ``None``, who get the base model). In a per-row bundle one
forward pass gives every row its own user's biases; switching users never rebuilds the
session. The script

1. makes sure every simulated user has a delta (a short personalization on their habit's
   examples when the store has none),
2. runs ``--batches`` mixed batches and reports each batch's latency,
3. runs the same batches one user at a time, for comparison, and checks both give the
   same probabilities.

Usage:
    python device_examples/multi_user_server.py BUNDLE [--store DIR] [--users 8]
        [--batches 20] [--batch-size 32] [--setup-steps 12] [--learning-rate 2e-3] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from bitfit.sdk import BitfitError, Personalizer, Predictor

from example_data import HABITS, message_stream, random_features, user_examples

USER_HABITS = [h for h in HABITS if h != "general"]


def ensure_deltas(bundle: str, store: str, users: Sequence[str], *, steps: int, learning_rate: float,
                  threads: int | None) -> list[dict[str, Any]]:
    """Personalize every user who has no delta yet (each with a habit, in turn)."""
    personalizer = Personalizer(bundle, store=store, threads=threads)
    made = []
    for i, user in enumerate(users):
        if personalizer.store.current_version(user) is not None:
            continue
        habit = USER_HABITS[i % len(USER_HABITS)]
        data = user_examples(personalizer.bundle.manifest, habit, 48, seed=100 + i)
        r = personalizer.personalize(data, user=user, max_steps=steps, epochs=10, learning_rate=learning_rate,
                                     holdout=0.0, progress_bar=False)
        made.append({"user": user, "habit": habit, "version": r.version, "delta_bytes": r.delta_bytes,
                     "seconds": round(r.seconds, 3)})
    return made


def request_batches(predictor: Predictor, users: Sequence[str], *, batches: int, batch_size: int,
                    seed: int) -> list[tuple[Any, list[str | None]]]:
    """(inputs, one user per row) for each batch; about 1 row in 8 is a signed-out user (None)."""
    rng = np.random.default_rng(seed)
    out = []
    for b in range(batches):
        row_users = [None if rng.random() < 0.125 else users[int(rng.integers(len(users)))] for _ in range(batch_size)]
        if predictor.encoder is not None:
            inputs: Any = [text for text, _ in message_stream("general", batch_size, seed=seed * 1000 + b)]
        else:
            inputs = random_features(predictor.manifest.inputs, batch_size, rng)
        out.append((inputs, row_users))
    return out


def one_user_at_a_time(predictor: Predictor, inputs: Any, row_users: Sequence[str | None]) -> np.ndarray:
    """The same batch served by grouping rows per user: one run per distinct user."""
    probabilities: np.ndarray | None = None
    for user in dict.fromkeys(row_users):
        index = [i for i, u in enumerate(row_users) if u == user]
        part = [inputs[i] for i in index] if isinstance(inputs, list) else {k: v[index] for k, v in inputs.items()}
        probs = predictor.predict(part, user=user).probabilities
        if probabilities is None:
            probabilities = np.zeros((len(row_users), *probs.shape[1:]), probs.dtype)
        probabilities[index] = probs
    assert probabilities is not None
    return probabilities


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--store", help="delta store directory (default: a fresh temporary directory)")
    parser.add_argument("--users", type=int, default=8, help="number of simulated users (user00, user01, ...)")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--setup-steps", type=int, default=12, help="training steps for a user who has no delta yet")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no line per batch")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    args = parser.parse_args(argv)

    store = args.store or tempfile.mkdtemp(prefix="bitfit-server-")
    users = [f"user{i:02d}" for i in range(args.users)]
    try:
        t = time.perf_counter()
        made = ensure_deltas(args.bundle, store, users, steps=args.setup_steps, learning_rate=args.learning_rate,
                             threads=args.threads)
        setup_seconds = time.perf_counter() - t
        predictor = Predictor(args.bundle, store, threads=args.threads)
    except BitfitError as err:
        print(f"multi_user_server: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    if made:
        print(f"setup: personalized {len(made)} user(s) in {setup_seconds:.1f} s "
              f"({made[0]['delta_bytes']:,} bytes per delta, store {store})")
    print(f"serving {len(users)} users from one session (per-row bundle: {predictor.manifest.per_row}, "
          f"providers {predictor.providers})")
    batches = request_batches(predictor, users, batches=args.batches, batch_size=args.batch_size, seed=args.seed)
    predictor.predict(*batches[0])  # warm-up: first run allocates, and deltas are decoded into the cache

    mixed_ms, grouped_ms, max_diff = [], [], 0.0
    for b, (inputs, row_users) in enumerate(batches):
        t = time.perf_counter()
        mixed = predictor.predict(inputs, user=row_users)
        mixed_ms.append(1000 * (time.perf_counter() - t))
        t = time.perf_counter()
        grouped = one_user_at_a_time(predictor, inputs, row_users)
        grouped_ms.append(1000 * (time.perf_counter() - t))
        max_diff = max(max_diff, float(np.max(np.abs(mixed.probabilities - grouped))))
        if not args.quiet:
            print(f"  batch {b + 1:>3}: {len(row_users)} rows, {len(set(row_users))} distinct users -> "
                  f"{mixed_ms[-1]:7.1f} ms mixed, {grouped_ms[-1]:7.1f} ms one user at a time")
    rows = args.batch_size * len(batches)
    summary = {
        "users": len(users), "batches": len(batches), "batch_size": args.batch_size, "per_row": predictor.manifest.per_row,
        "mixed_ms": {"p50": percentile(mixed_ms, 50), "p95": percentile(mixed_ms, 95), "max": max(mixed_ms)},
        "one_user_at_a_time_ms": {"p50": percentile(grouped_ms, 50), "p95": percentile(grouped_ms, 95), "max": max(grouped_ms)},
        "rows_per_second": rows / (sum(mixed_ms) / 1000), "max_abs_diff": max_diff, "per_batch_ms": mixed_ms,
        "setup": made,
    }
    print(f"latency per batch of {args.batch_size}: mixed p50 {summary['mixed_ms']['p50']:.1f} ms, "
          f"p95 {summary['mixed_ms']['p95']:.1f} ms; one user at a time p50 {summary['one_user_at_a_time_ms']['p50']:.1f} ms "
          f"({summary['rows_per_second']:.0f} rows/s mixed)")
    print(f"mixed batches and one-user-at-a-time runs agree: max probability difference {max_diff:.1e}")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
