"""An inbox / keyboard-style app: messages stream in for one user; each is predicted with
the user's latest delta, the user's label (a confirmation or a correction) is kept, and
every ``--every`` new labels a background thread personalizes while predictions go on.

Device side: bitfit.sdk only (no torch). The serving side (a ``Predictor``, main thread)
and the training side (a ``Personalizer``, background thread) share nothing but the delta
store on disk: a new version is written atomically and the predictor notices the user's
``HEAD`` change on its next call, so predictions switch to the new delta without a restart.

Usage:
    python device_examples/inbox_app.py BUNDLE [--store DIR] [--user U] [--habit optimist]
        [--messages FILE.jsonl] [--count 96] [--every 24] [--delay 0.02] [--json]

Without ``--messages`` the stream is built in (``example_data.py``): short messages labelled
the way a user with ``--habit`` sees them (an optimist calls "the meeting starts tomorrow"
positive). With a .jsonl/.csv of text and label, those are streamed in order.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bitfit.sdk import BitfitError, Personalizer, Predictor
from bitfit.sdk.data import normalize_records

from example_data import HABITS, PROBES, message_stream


class InboxApp:
    """One user's message stream with background personalization every ``every`` labels.

    Example:
        >>> app = InboxApp("tiny_bundles/tiny-text", "/tmp/store", "alice", every=16)    # doctest: +SKIP
        >>> app.receive("the meeting starts tomorrow", "positive")                       # doctest: +SKIP
        'neutral'
    """

    def __init__(self, bundle: str | Path, store: str | Path, user: str, *, every: int = 24, epochs: int | None = None,
                 learning_rate: float = 2e-3, max_seconds: float = 30.0, threads: int | None = None) -> None:
        self.user = user
        self.every = every
        self.options = {"epochs": epochs, "learning_rate": learning_rate, "max_seconds": max_seconds}
        self.predictor = Predictor(bundle, store, threads=threads)            # main thread only
        self._trainer = Personalizer(self.predictor.bundle, store=store, threads=threads)  # background thread only
        self._pending: list[tuple[str, Any]] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.rounds: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.log: list[dict[str, Any]] = []

    @property
    def version(self) -> int | None:
        """The user's current delta version (None before the first personalization)."""
        return self.predictor.store.current_version(self.user)

    def receive(self, text: str, label: Any) -> Any:
        """Predict one arriving message, then take the user's label for it."""
        version = self.version
        predicted = self.predictor.predict([text], user=self.user).labels[0]
        self.log.append({"text": text, "predicted": predicted, "label": label, "version": version or 0})
        with self._lock:
            self._pending.append((text, label))
        self._maybe_train()
        return predicted

    def _maybe_train(self) -> None:
        with self._lock:
            busy = self._thread is not None and self._thread.is_alive()
            if busy or len(self._pending) < self.every:
                return
            batch, self._pending = self._pending, []
            self._thread = threading.Thread(target=self._train, args=(batch, len(self.log)), daemon=True,
                                            name=f"personalize-{self.user}")
            self._thread.start()

    def _train(self, examples: list[tuple[str, Any]], after_message: int) -> None:
        # Continue from the current delta on the new labels only; too few to hold any out.
        try:
            r = self._trainer.personalize(examples, user=self.user, holdout=0.0, progress_bar=False, **self.options)
        except BitfitError as err:  # the previous delta stays current; the app goes on
            self.errors.append(f"{type(err).__name__}: {err}")
            return
        self.rounds.append({"version": r.version, "examples": r.examples_used, "steps": r.steps,
                            "seconds": round(r.seconds, 3), "delta_bytes": r.delta_bytes, "stopped_by": r.stopped_by,
                            "after_message": after_message})

    def wait(self) -> None:
        """Let a running personalization finish (call before exit)."""
        thread = self._thread
        if thread is not None:
            thread.join()
        self._maybe_train()  # labels that arrived during the last round
        thread = self._thread
        if thread is not None:
            thread.join()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)


def online_accuracy(log: Sequence[dict[str, Any]], version: int | None = None) -> float | None:
    """Share of messages predicted right *before* their label was known (optionally one version)."""
    rows = [r for r in log if version is None or r["version"] == version]
    return sum(r["predicted"] == r["label"] for r in rows) / len(rows) if rows else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", help="a bitfit bundle directory with a tokenizer (text model)")
    parser.add_argument("--store", help="delta store directory (default: a fresh temporary directory)")
    parser.add_argument("--user", default="alice")
    parser.add_argument("--habit", default="optimist", choices=sorted(HABITS), help="how the built-in user labels messages")
    parser.add_argument("--messages", help=".jsonl/.csv with text and label, streamed in order (instead of the built-in stream)")
    parser.add_argument("--count", type=int, default=96, help="built-in stream length")
    parser.add_argument("--every", type=int, default=24, help="personalize after this many new labels")
    # None: the SDK's step budget (at least 30 steps): a fixed 2 or 3 epochs of a 24-label round
    # are a handful of steps, too few under the SDK's warm-up + decay schedule to move a prediction.
    parser.add_argument("--epochs", type=int, default=None, help="passes per round (default: the SDK's step budget)")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--max-seconds", type=float, default=30.0, help="time budget of one personalization round")
    parser.add_argument("--delay", type=float, default=0.02, help="seconds between arriving messages")
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quiet", action="store_true", help="no line per message")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    args = parser.parse_args(argv)

    stream = normalize_records(args.messages) if args.messages else message_stream(args.habit, args.count, seed=args.seed)
    store = args.store or tempfile.mkdtemp(prefix="bitfit-inbox-")
    try:
        app = InboxApp(args.bundle, store, args.user, every=args.every, epochs=args.epochs,
                       learning_rate=args.learning_rate, max_seconds=args.max_seconds, threads=args.threads)
    except BitfitError as err:
        print(f"inbox_app: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    if app.predictor.encoder is None:
        print("inbox_app: this bundle takes numeric inputs; use numeric_model.py for it", file=sys.stderr)
        return 2
    base_probes = app.predictor.predict(list(PROBES), user=None)
    print(f"inbox for {args.user!r} ({len(stream)} messages, personalizing every {args.every} labels in the background; "
          f"store {store})")
    started = time.perf_counter()
    for i, (text, label) in enumerate(stream):
        version = app.version or 0
        predicted = app.receive(text, label)
        if not args.quiet:
            mark = "ok " if predicted == label else "FIX"
            print(f"  #{i + 1:<3} [delta v{version}] {mark} {predicted:>8} (user: {label:>8})  {text}")
        if args.delay:
            time.sleep(args.delay)
    app.wait()
    seconds = time.perf_counter() - started

    final = app.predictor.predict(list(PROBES), user=args.user)
    changed = sum(a != b for a, b in zip(base_probes.labels, final.labels))
    versions = sorted({r["version"] for r in app.log})
    print(f"\n{len(app.rounds)} personalization round(s) in the background; current delta v{app.version or 0}; "
          f"{app.pending} label(s) still pending; {seconds:.1f} s")
    for r in app.rounds:
        print(f"  v{r['version']}: {r['examples']} new labels, {r['steps']} steps, {r['seconds']:.2f} s, "
              f"{r['delta_bytes']:,} bytes (started after message #{r['after_message']})")
    for error in app.errors:
        print(f"  round failed, previous delta kept: {error}")
    print("online accuracy (predicted before the user's label arrived), by the delta version in use:")
    for v in versions:
        count = sum(r["version"] == v for r in app.log)
        print(f"  v{v}: {online_accuracy(app.log, v):.2f} over {count} messages")
    print("the same messages, base model vs. this user's latest delta:")
    for text, before, after in zip(PROBES, base_probes.labels, final.labels):
        print(f"  {before:>8} -> {after:<8} {'(changed)' if before != after else '':9}  {text}")
    if args.json:
        print(json.dumps({
            "user": args.user, "messages": len(app.log), "rounds": app.rounds, "errors": app.errors,
            "current_version": app.version or 0, "pending": app.pending, "seconds": round(seconds, 3),
            "online_accuracy": {str(v): online_accuracy(app.log, v) for v in versions},
            "probes": [{"text": t, "base": b, "user": a} for t, b, a in zip(PROBES, base_probes.labels, final.labels)],
            "probes_changed": changed,
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
