"""Delta size per encoding and the accuracy each keeps, and the bundle's size on disk.

One user is personalized once (fp32); the same trained biases are then re-encoded as
fp32, fp16 and int8, saved with ``save_delta`` (bytes on disk), and applied through the
predictor to a holdout of that user's data.

Example:
    >>> from benchmarks.deltas import ENCODINGS
    >>> ENCODINGS
    ('fp32', 'fp16', 'int8')
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bitfit.sdk.data import batches, load_examples
from bitfit.sdk.delta import Delta, load_delta, save_delta
from bitfit.sdk.personalizer import Personalizer
from bitfit.sdk.predictor import Predictor

from .timing import Stopwatch
from .workspace import Workspace

ENCODINGS = ("fp32", "fp16", "int8")


def _logits(predictor: Predictor, examples: Any, tensors: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    name = predictor.manifest.logits_output
    out, labels = [], []
    for feeds, y in batches(examples, predictor.encoder, 64, None):
        out.append(predictor.session.run([name], {**feeds, **tensors})[0])
        labels.append(y)
    return np.concatenate(out), np.concatenate(labels)


def delta_encodings(
    ws: Workspace, *, domain: str | None = None, train_size: int = 200, holdout_size: int = 300, epochs: int = 5,
    learning_rate: float = 3e-3, seed: int = 0,
) -> dict[str, Any]:
    """Bytes on disk and holdout accuracy of the same trained delta in every encoding."""
    domain = domain or ws.corpus.users[0]
    pool = ws.corpus.by_domain[domain]
    order = np.random.default_rng(seed).permutation(len(pool))
    holdout = [pool[i] for i in order[:holdout_size]]
    train = [pool[i] for i in order[holdout_size:holdout_size + train_size]]
    base = ws.bundle.trainable_base()
    fingerprint = ws.bundle.manifest.base_fingerprint
    with tempfile.TemporaryDirectory(dir=ws.work_dir) as tmp:
        personalizer = Personalizer(ws.bundle, Path(tmp) / "store", threads=ws.threads, verify="none")
        with Stopwatch() as clock:
            personalizer.personalize(train, user="delta-bench", epochs=epochs, learning_rate=learning_rate,
                                     holdout=0.0, patience=None, encoding="fp32", reset=True, seed=seed,
                                     progress_bar=False)
        trained = personalizer.store.load("delta-bench").apply_to(base)
        predictor = Predictor(ws.bundle, threads=ws.threads, providers="cpu")
        held = load_examples(holdout, ws.bundle, predictor.encoder)
        base_logits, labels = _logits(predictor, held, {})
        rows = []
        reference = None
        for encoding in ENCODINGS:
            delta = Delta.from_params(trained, base, fingerprint, encoding=encoding)
            path = Path(tmp) / f"delta-{encoding}.safetensors"
            save_delta(path, delta)
            loaded = load_delta(path)
            logits, _ = _logits(predictor, held, predictor.tensors_for_delta(loaded))
            if reference is None:
                reference = (logits, loaded)
            error = max(float(np.abs(loaded.tensors[k] - reference[1].tensors[k]).max()) for k in loaded.tensors)
            rows.append({
                "encoding": encoding,
                "bytes_on_disk": path.stat().st_size,
                "payload_bytes": loaded.nbytes,
                "accuracy": float((logits.argmax(-1) == labels).mean()),
                "agreement_with_fp32": float((logits.argmax(-1) == reference[0].argmax(-1)).mean()),
                "max_abs_logit_diff_vs_fp32": float(np.abs(logits - reference[0]).max()),
                "max_abs_value_error_vs_fp32": error,
            })
    manifest = ws.bundle.manifest
    files = {key: entry.bytes for key, entry in manifest.files.items()}
    manifest_bytes = (ws.bundle.path / "manifest.json").stat().st_size
    return {
        "domain": domain, "train_examples": len(train), "holdout_examples": len(held), "epochs": epochs,
        "learning_rate": learning_rate, "train_seconds": clock.seconds,
        "base_accuracy": float((base_logits.argmax(-1) == labels).mean()),
        "encodings": rows,
        "trainable_values": manifest.policy["trainable_values"], "total_values": manifest.policy["total_values"],
        "trainable_tensors": len(manifest.trainable),
        "bundle_files": {**files, "manifest": manifest_bytes},
        "bundle_bytes": sum(files.values()) + manifest_bytes,
        "weights_bytes": files.get("weights", 0),
        "torch_parameter_bytes": ws.info.get("parameter_bytes"),
        "plain_onnx_bytes": ws.plain_onnx.stat().st_size,
    }
