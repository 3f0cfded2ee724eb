"""Why a small model trains on one onnxruntime thread (``bitfit.sdk.options.session_threads``):
open a portable training session, run 30 steps of 16 examples and close it, on one
intra-op thread and on onnxruntime's default (one per core), for bag-of-words MLPs of
growing size; the fastest of ``--repeats`` runs each, measured alternately in one process.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/thread_study.py

Example:
    >>> from tools.thread_study import SIZES
    >>> SIZES[0]
    (256, 64)
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = ((256, 64), (1024, 128), (4096, 256), (8192, 512))  # (features, hidden): 17 k to 4.2 M values
STEPS, ROWS = 30, 16


def measure(features: int, hidden: int, repeats: int) -> dict[str, float]:
    """Fastest open + STEPS steps + close, in seconds, per thread setting ("1", "default")."""
    import torch

    from benchmarks.quality_users import bow_mlp
    from bitfit.export import export_bundle
    from bitfit.sdk.bundle import Bundle
    from bitfit.sdk.trainer import open_training_session

    torch.manual_seed(0)
    model = bow_mlp(features, 2, hidden)
    x = np.random.default_rng(0).random((ROWS, features), dtype=np.float32)
    y = np.zeros(ROWS, np.int64)
    with tempfile.TemporaryDirectory() as directory:
        export_bundle(model, directory, example_inputs={"x": x[:2]}, labels=["a", "b"], overwrite=True)
        bundle = Bundle.open(directory)
        best = {"values": float(sum(p.numel() for p in model.parameters()))}
        for _ in range(repeats):
            for name, threads in (("1", 1), ("default", 0)):
                started = time.perf_counter()
                session = open_training_session(bundle, threads=threads, learning_rate=1e-3)
                for _ in range(STEPS):
                    session.train_step({"x": x}, y)
                del session
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - started)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    from bitfit.sdk.runtime import ort

    print(f"onnxruntime {ort.__version__}; open + {STEPS} steps of {ROWS} + close, fastest of {args.repeats}")
    print("| model values | 1 thread | onnxruntime's default |\n|---|---|---|")
    for features, hidden in SIZES:
        r = measure(features, hidden, args.repeats)
        print(f"| {int(r['values']):,} | {r['1'] * 1e3:.1f} ms | {r['default'] * 1e3:.1f} ms |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
