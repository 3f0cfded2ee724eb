"""Wall time of a whole personalization with each training backend: constructing a
``Personalizer(bundle, store, backend=...)`` and one ``personalize`` call (SDK defaults:
15% holdout, batch 16, early stopping) for N real user examples and a fixed number of
epochs. The time includes building the training sessions from the bundle, tokenizing,
training, the holdout evaluations and saving the delta.

Both backends get the same examples, seed and learning rate, alternating call by call
(portable, ort-training, ort-training, portable, ...), so load drift hits both alike. They
compute the same math, so their holdout accuracies must agree within float noise; each
row also says how far apart the two trained deltas are.

Example:
    >>> from benchmarks.personalization import BACKENDS, backend_agreement
    >>> BACKENDS
    ('portable', 'ort-training')
    >>> rows = [{"examples": 10, "backend": b, "accuracy_after": 0.8, "accuracy_before": 0.5} for b in BACKENDS]
    >>> backend_agreement(rows)[0]["accuracy_after_diff"]
    0.0
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import numpy as np

from bitfit.sdk.personalizer import Personalizer

from .timing import summary
from .workspace import Workspace

BACKENDS = ("portable", "ort-training")


def personalization_times(
    ws: Workspace, sizes: list[int], *, repeats: int, epochs: int = 3, domain: str | None = None, seed: int = 0,
    backends: tuple[str, ...] = BACKENDS,
) -> list[dict[str, Any]]:
    """One row per size and backend: median seconds over ``repeats`` calls, steps, seconds
    per step, accuracies, and the largest difference between the backends' trained values."""
    domain = domain or ws.corpus.users[-1]
    pool = ws.corpus.by_domain[domain]
    order = np.random.default_rng(seed).permutation(len(pool))
    rows = []
    with tempfile.TemporaryDirectory(dir=ws.work_dir) as store:
        for n in sizes:
            examples = [pool[i] for i in order[: min(n, len(pool))]]
            seconds: dict[str, list[float]] = {b: [] for b in backends}
            results: dict[str, Any] = {}
            trained: dict[str, dict[str, np.ndarray]] = {}
            for r in range(repeats):
                for backend in (backends if r % 2 == 0 else tuple(reversed(backends))):
                    user = f"timing-{n}-{backend}"
                    started = time.perf_counter()
                    personalizer = Personalizer(ws.bundle, store, threads=ws.threads, verify="none", backend=backend)
                    result = personalizer.personalize(examples, user=user, epochs=epochs, progress_bar=False,
                                                      reset=True, seed=seed)
                    seconds[backend].append(time.perf_counter() - started)
                    results[backend] = result
                    trained[backend] = personalizer.store.load(user).apply_to(ws.bundle.trainable_base())
            diff = _max_diff(trained) if len(trained) > 1 else None
            for backend in backends:
                s, last = summary(seconds[backend]), results[backend]
                rows.append({
                    "examples": len(examples), "domain": domain, "epochs": epochs, "backend": last.backend or backend,
                    **s, "steps": last.steps, "epochs_run": last.epochs_run, "examples_used": last.examples_used,
                    "holdout_examples": last.holdout_examples, "stopped_by": last.stopped_by,
                    "seconds_per_step": s["median"] / max(1, last.steps),
                    "accuracy_before": last.accuracy_before, "accuracy_after": last.accuracy_after,
                    "loss_after": last.loss_after, "kept": getattr(last, "kept_step", getattr(last, "kept_epoch", None)),
                    "delta_bytes": last.delta_bytes, "encoding": last.encoding,
                    "max_trained_value_diff_between_backends": diff,
                })
    return rows


def _max_diff(trained: dict[str, dict[str, np.ndarray]]) -> float:
    a, b = list(trained.values())[:2]
    return float(max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)).max() for k in a))


def backend_agreement(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per size: the two backends' seconds ratio (portable / ort-training, where both ran)
    and their accuracy differences."""
    by: dict[int, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["examples"], {})[r["backend"]] = r
    out = []
    for n, m in by.items():
        if not all(b in m for b in BACKENDS):
            continue
        p, o = m["portable"], m["ort-training"]
        out.append({
            "examples": n,
            "seconds_ratio": p["median"] / o["median"] if "median" in p and o.get("median") else None,
            "accuracy_after_diff": abs((p["accuracy_after"] or 0.0) - (o["accuracy_after"] or 0.0)),
            "accuracy_before_diff": abs((p["accuracy_before"] or 0.0) - (o["accuracy_before"] or 0.0)),
            "max_trained_value_diff": p.get("max_trained_value_diff_between_backends"),
        })
    return out
