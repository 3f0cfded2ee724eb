"""Why a small model trains on one onnxruntime thread (``bitfit.sdk.options.session_threads``)
without graph optimizations (``bitfit.sdk.portable_trainer.default_session_options``), and why
inference keeps onnxruntime's defaults: on one intra-op thread without and with graph
optimizations, and on onnxruntime's default threads (one per core) with them, alternately in
one process, the fastest of ``--repeats`` runs of

- training: open a portable training session, run 30 steps of 16 rows, close it (what one
  ``personalize`` costs a session);
- inference: ``Predictor.predict`` on 64 rows with an open Predictor (what serving costs),

for bag-of-words MLPs of growing size and a 1 M-value text model (``make quality``'s tiny
BERT, 64 tokens a row).

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
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = ((256, 64), (1024, 128), (4096, 256), (8192, 512))  # (features, hidden): 17 k to 4.2 M values
STEPS, TRAIN_ROWS, PREDICT_ROWS, TOKENS = 30, 16, 64, 64


def _fastest(bundle: Any, train: tuple[dict, np.ndarray], predict: Any, repeats: int) -> dict[str, float]:
    from bitfit.sdk import Predictor
    from bitfit.sdk.runtime import ort
    from bitfit.sdk.trainer import open_training_session

    best: dict[str, float] = {}
    for _ in range(repeats):
        for name, threads, optimized in (("1 unoptimized", 1, False), ("1", 1, True), ("default", 0, True)):
            options = ort.SessionOptions()
            options.enable_mem_pattern = False  # as the SDK's default options
            if not optimized:
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            started = time.perf_counter()
            session = open_training_session(bundle, threads=threads, learning_rate=1e-3, session_options=options)
            for _ in range(STEPS):
                session.train_step(*train)
            del session
            best[f"train {name}"] = min(best.get(f"train {name}", float("inf")), time.perf_counter() - started)
            if threads == 1 and not optimized:
                continue  # inference is measured with onnxruntime's optimizations only
            predictor = Predictor(bundle, store=False, threads=threads)
            predictor.predict(predict)  # the first run allocates
            started = time.perf_counter()
            predictor.predict(predict)
            best[f"predict {name}"] = min(best.get(f"predict {name}", float("inf")), time.perf_counter() - started)
    return best


def measure_mlp(features: int, hidden: int, repeats: int) -> dict[str, float]:
    """Fastest seconds per setting for a bag-of-words MLP, and its number of values."""
    import torch

    from benchmarks.quality_users import bow_mlp
    from bitfit.export import export_bundle
    from bitfit.sdk.bundle import Bundle

    torch.manual_seed(0)
    model = bow_mlp(features, 2, hidden)
    x = np.random.default_rng(0).random((PREDICT_ROWS, features), dtype=np.float32)
    with tempfile.TemporaryDirectory() as directory:
        export_bundle(model, directory, example_inputs={"x": x[:2]}, labels=["a", "b"], overwrite=True)
        bundle = Bundle.open(directory)
        best = _fastest(bundle, ({"x": x[:TRAIN_ROWS]}, np.zeros(TRAIN_ROWS, np.int64)), x, repeats)
        return {**best, "values": float(bundle.manifest.total_values or 0)}


def measure_text(repeats: int) -> dict[str, float]:
    """The same for make quality's tiny BERT (text in, 64 tokens a row)."""
    from benchmarks.quality_users import new_model, tiny_suites
    from benchmarks.workspace import tokenizer_file
    from bitfit.export import export_bundle
    from bitfit.export.minilm import example_text_inputs
    from bitfit.sdk.bundle import Bundle

    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 2000, (TRAIN_ROWS, TOKENS)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    texts = [" ".join(f"word{i}" for i in range(TOKENS))] * PREDICT_ROWS
    with tempfile.TemporaryDirectory() as directory:
        export_bundle(new_model(tiny_suites()[0]), directory, example_inputs=example_text_inputs(tokenizer_file(), TOKENS),
                      labels=["a", "b"], tokenizer=tokenizer_file(), max_length=TOKENS, overwrite=True)
        bundle = Bundle.open(directory)
        best = _fastest(bundle, (feeds, np.zeros(TRAIN_ROWS, np.int64)), texts, repeats)
        return {**best, "values": float(bundle.manifest.total_values or 0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    from bitfit.sdk.runtime import ort

    print(f"onnxruntime {ort.__version__}; training: open + {STEPS} steps of {TRAIN_ROWS} + close; "
          f"inference: predict on {PREDICT_ROWS} rows; fastest of {args.repeats}")
    print("| model | values | train, 1 thread, no graph optimizations | train, 1 thread | train, default | "
          "predict, 1 thread | predict, default |\n|---|---|---|---|---|---|---|")
    rows = [(f"MLP {f}-{h}-2", lambda f=f, h=h: measure_mlp(f, h, args.repeats)) for f, h in SIZES]
    rows.append((f"tiny BERT, {TOKENS} tokens", lambda: measure_text(args.repeats)))
    for name, run in rows:
        r = run()
        print(f"| {name} | {int(r['values']):,} | " + " | ".join(
            f"{r[k] * 1e3:.1f} ms" for k in ("train 1 unoptimized", "train 1", "train default", "predict 1", "predict default")) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
