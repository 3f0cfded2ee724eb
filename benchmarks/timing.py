"""Timing that survives a noisy, shared machine: methods run interleaved (round-robin,
rotating the order every round) with a short pause between calls, and every summary is a
median with its interquartile range.

Why the pause: ONNX Runtime's and OpenMP's worker threads spin for a while after a call;
a method timed right after another one would pay for the previous one's spinning.

Example:
    >>> from benchmarks.timing import interleaved, summary
    >>> samples = interleaved({"a": lambda: None, "b": lambda: None}, repeats=3, warmup=1, pause=0)
    >>> sorted(samples), len(samples["a"])
    (['a', 'b'], 3)
    >>> summary([1.0, 2.0, 3.0])["median"]
    2.0
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

import numpy as np


def interleaved(
    fns: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int = 1, pause: float = 0.05,
    self_timed: Collection[str] = (),
) -> dict[str, list[float]]:
    """Seconds per call of each function, ``repeats`` samples each after ``warmup`` rounds.

    Functions named in ``self_timed`` return their own seconds, which are used instead of
    the wall time of the call: e.g. a run timed inside another process (the device worker),
    whose round trip must not count.

    Example:
        >>> interleaved({"remote": lambda: 0.25}, repeats=2, warmup=0, pause=0, self_timed={"remote"})
        {'remote': [0.25, 0.25]}
    """
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if pause:
                time.sleep(pause)
            started = time.perf_counter()
            value = fns[name]()
            elapsed = time.perf_counter() - started
            if name in self_timed:
                elapsed = float(value)
            if round_index >= warmup:
                samples[name].append(elapsed)
    return samples


def per_call(fn: Callable[[], Any], *, number: int, repeats: int) -> list[float]:
    """Seconds per call for a fast function: ``repeats`` samples of ``number`` calls each."""
    fn()
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(number):
            fn()
        out.append((time.perf_counter() - started) / number)
    return out


def summary(samples: list[float]) -> dict[str, float]:
    """Median, quartiles, min and count of a list of samples."""
    arr = np.asarray(samples, dtype=np.float64)
    q1, median, q3 = np.percentile(arr, [25, 50, 75])
    return {"median": float(median), "q1": float(q1), "q3": float(q3), "min": float(arr.min()), "n": int(arr.size)}


def ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator / denominator) if denominator else None


class Stopwatch:
    """Wall time of a ``with`` block, in ``.seconds``."""

    def __enter__(self) -> "Stopwatch":
        self.started = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.started
