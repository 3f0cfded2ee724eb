"""Personalize on a constrained device: one thread, a time budget, a memory ceiling.

Device side: bitfit.sdk only (no torch). The run

1. optionally caps the process's address space (``--address-space-mb``, ``RLIMIT_AS``): an
   allocation beyond it fails inside ONNX Runtime or numpy, and the script reports it;
2. loads the bundle with ``threads=1`` for training and inference and refuses to train when
   the peak resident memory (``VmHWM`` on Linux, ``resource.getrusage`` ``ru_maxrss``
   elsewhere) is already over ``--memory-mb``;
3. personalizes within ``--max-seconds``, checking the peak after every step, and stops
   (nothing saved, the previous delta stays current) if it goes over the ceiling;
4. reports steps, seconds, what stopped training, and the peak memory.

Exit codes: 0 done within budget, 3 refused or stopped over the memory ceiling, 2 other errors.

Usage:
    python device_examples/constrained_device.py BUNDLE [--memory-mb 600] [--max-seconds 20]
        [--address-space-mb 4000] [--data FILE] [--habit optimist] [--count 96] [--json]

Why peak resident memory and not ``RLIMIT_AS`` as the main ceiling: address space counts every
reserved page (thread stacks, allocator arenas, mapped files), typically 1-2 GB more than
what is resident, so it is a crash guard, not a budget. Resident memory is what a phone's
low-memory killer looks at.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from typing import Any

from bitfit.sdk import BitfitError, BudgetExceededError, Personalizer

from example_data import HABITS, probe_inputs, user_examples

EXIT_OVER_BUDGET = 3


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB.

    Linux: ``VmHWM`` of /proc/self/status. Not ``ru_maxrss``, because Linux carries the
    parent's high-water mark over fork + exec: a script started by a 450 MB process would
    report 450 MB before doing anything. Elsewhere ``ru_maxrss`` (bytes on macOS, KiB on BSDs).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def cap_address_space(megabytes: float) -> None:
    """Lower the soft RLIMIT_AS to ``megabytes`` (never above the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    wanted = int(megabytes * (1 << 20))
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_AS, (wanted, hard))


def run(bundle: str, *, store: str, user: str, memory_mb: float, max_seconds: float, data: Any = None,
        habit: str = "optimist", count: int = 96, epochs: int = 3, learning_rate: float = 2e-3,
        threads: int = 1) -> dict[str, Any]:
    """Load, check the ceiling, personalize under it; returns what happened (``status``).

    ``data`` is the user's labelled examples; None uses the built-in ones for ``habit``.
    """
    started = time.perf_counter()
    report: dict[str, Any] = {"memory_ceiling_mb": memory_mb, "max_seconds": max_seconds, "threads": threads,
                              "peak_rss_mb_at_start": round(peak_rss_mb(), 1)}
    try:
        personalizer = Personalizer(bundle, store=store, threads=threads)
        probes = probe_inputs(personalizer.bundle.manifest)
        base = personalizer.predict(probes, user=None).labels
    except MemoryError:
        return {**report, "status": "refused", "reason": "out of address space while loading the bundle",
                "peak_rss_mb": round(peak_rss_mb(), 1)}
    loaded = peak_rss_mb()
    report.update(peak_rss_mb_after_load=round(loaded, 1), load_seconds=round(time.perf_counter() - started, 3))
    if data is None:
        data = user_examples(personalizer.bundle.manifest, habit, count, seed=1)
    if loaded > memory_mb:
        return {**report, "status": "refused", "peak_rss_mb": round(loaded, 1),
                "reason": f"loading the bundle already took the peak to {loaded:.0f} MB > ceiling {memory_mb:.0f} MB"}

    def check_memory(progress: Any) -> None:
        # Called after every training step: stop before the device would.
        peak = peak_rss_mb()
        if peak > memory_mb:
            raise BudgetExceededError(f"peak resident memory {peak:.0f} MB went over the ceiling {memory_mb:.0f} MB "
                                      f"at step {progress.step}")

    try:
        r = personalizer.personalize(data, user=user, epochs=epochs, learning_rate=learning_rate,
                                     max_seconds=max_seconds, progress=check_memory, progress_bar=False)
    except BudgetExceededError as err:
        return {**report, "status": "stopped", "reason": f"{err}; nothing was saved, the previous delta stays current",
                "peak_rss_mb": round(peak_rss_mb(), 1)}
    except MemoryError:
        return {**report, "status": "stopped", "reason": "out of address space while training; nothing was saved",
                "peak_rss_mb": round(peak_rss_mb(), 1)}
    after = personalizer.predict(probes, user=user).labels
    return {
        **report, "status": "ok", "peak_rss_mb": round(peak_rss_mb(), 1), "version": r.version, "steps": r.steps,
        "epochs_run": r.epochs_run, "train_seconds": round(r.seconds, 3), "stopped_by": r.stopped_by,
        "delta_bytes": r.delta_bytes, "accuracy_before": r.accuracy_before, "accuracy_after": r.accuracy_after,
        "probes_base": base, "probes_user": after, "seconds": round(time.perf_counter() - started, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--store", help="delta store directory (default: a fresh temporary directory)")
    parser.add_argument("--user", default="alice")
    parser.add_argument("--data", help=".jsonl/.csv of text and label (text bundles); default: the built-in stream")
    parser.add_argument("--habit", default="optimist", choices=sorted(HABITS))
    parser.add_argument("--count", type=int, default=96, help="built-in examples")
    parser.add_argument("--memory-mb", type=float, default=600.0, help="peak resident memory ceiling")
    parser.add_argument("--address-space-mb", type=float, help="also cap the address space (RLIMIT_AS); Linux/macOS")
    parser.add_argument("--max-seconds", type=float, default=20.0, help="training time budget")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    args = parser.parse_args(argv)

    if args.address_space_mb:
        cap_address_space(args.address_space_mb)
    store = args.store or tempfile.mkdtemp(prefix="bitfit-constrained-")
    try:
        result = run(args.bundle, store=store, user=args.user, memory_mb=args.memory_mb, max_seconds=args.max_seconds,
                     data=args.data, habit=args.habit, count=args.count, epochs=args.epochs,
                     learning_rate=args.learning_rate, threads=args.threads)
    except BitfitError as err:
        print(f"constrained_device: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    print(f"constrained device: {args.threads} thread(s), {args.max_seconds:g} s budget, "
          f"{args.memory_mb:g} MB resident ceiling" + (f", {args.address_space_mb:g} MB address space" if args.address_space_mb else ""))
    print(f"  after loading the bundle: peak {result.get('peak_rss_mb_after_load', result['peak_rss_mb'])} MB")
    if result["status"] == "ok":
        print(f"  personalized {args.user!r}: delta v{result['version']} ({result['delta_bytes']:,} bytes), {result['steps']} steps "
              f"in {result['train_seconds']:.2f} s, stopped by {result['stopped_by']}")
        if result["accuracy_before"] is not None:
            print(f"  holdout accuracy {result['accuracy_before']:.2f} -> {result['accuracy_after']:.2f}")
        print(f"  probe predictions: base {result['probes_base']} -> user {result['probes_user']}")
    else:
        print(f"  {result['status'].upper()}: {result['reason']}")
    print(f"peak memory: {result['peak_rss_mb']} MB resident (ceiling {args.memory_mb:g} MB)")
    if args.json:
        print(json.dumps(result, default=str))
    return 0 if result["status"] == "ok" else EXIT_OVER_BUDGET


if __name__ == "__main__":
    sys.exit(main())
