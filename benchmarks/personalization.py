"""Wall time of one ``Personalizer.personalize`` call (SDK defaults: 15% holdout, batch 16,
early stopping) for N real user examples and a fixed number of epochs. The time includes
building the training session from the bundle, tokenizing, training, the holdout
evaluations and saving the delta.

Example:
    >>> from benchmarks.personalization import personalization_times     # doctest: +SKIP
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import numpy as np

from bitfit.sdk.personalizer import Personalizer

from .timing import summary
from .workspace import Workspace


def personalization_times(
    ws: Workspace, sizes: list[int], *, repeats: int, epochs: int = 3, domain: str | None = None, seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per size: median seconds over ``repeats`` calls, steps, seconds per step."""
    domain = domain or ws.corpus.users[-1]
    pool = ws.corpus.by_domain[domain]
    order = np.random.default_rng(seed).permutation(len(pool))
    rows = []
    with tempfile.TemporaryDirectory(dir=ws.work_dir) as store:
        personalizer = Personalizer(ws.bundle, store, threads=ws.threads, verify="none")
        for n in sizes:
            examples = [pool[i] for i in order[: min(n, len(pool))]]
            seconds, results = [], []
            for r in range(repeats):
                started = time.perf_counter()
                result = personalizer.personalize(examples, user=f"timing-{n}-{r}", epochs=epochs, progress_bar=False,
                                                  reset=True, seed=seed + r)
                seconds.append(time.perf_counter() - started)
                results.append(result)
            s = summary(seconds)
            last = results[-1]
            rows.append({
                "examples": len(examples), "domain": domain, "epochs": epochs, **s,
                "steps": last.steps, "epochs_run": last.epochs_run, "examples_used": last.examples_used,
                "holdout_examples": last.holdout_examples, "stopped_by": last.stopped_by,
                "seconds_per_step": s["median"] / max(1, last.steps),
                "accuracy_before": last.accuracy_before, "accuracy_after": last.accuracy_after,
                "delta_bytes": last.delta_bytes, "encoding": last.encoding,
            })
    return rows
