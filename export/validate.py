"""Checks a freshly written bundle before ``export_bundle`` returns it.

1. The inference model reproduces the source model (torch, or the original ONNX file)
   on the example inputs within 1e-4.
2. Only the trainable tensors have gradient buffers in the training model.
3. One training step (through the device SDK) changes trainable tensors and leaves every
   frozen tensor bit-identical.
4. The inference model fed the trained tensors gives the training session's eval logits.
5. Per-row bundles: a batch where each row has its own bias equals row-by-row runs.

Example:
    >>> from bitfit.export.validate import OUTPUT_TOLERANCE
    >>> OUTPUT_TOLERANCE
    0.0001
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from bitfit.sdk.bundle import Bundle
from bitfit.sdk.errors import ValidationFailedError

OUTPUT_TOLERANCE = 1e-4
PER_ROW_TOLERANCE = 1e-5


def _session(bundle: Bundle):
    from bitfit.sdk.ort_training import ort

    return ort.InferenceSession(str(bundle.file("inference_model")), providers=["CPUExecutionProvider"])


def _bias_feeds(bundle: Bundle, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {t.name: values[t.name].reshape(t.inference_shape).astype(np.float32) for t in bundle.manifest.trainable}


def example_labels(bundle: Bundle, logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Labels of the right type and shape for one training step on these logits."""
    loss = bundle.manifest.loss
    if loss == "cross-entropy":
        return rng.integers(0, logits.shape[-1], size=logits.shape[0]).astype(np.int64)
    if loss == "token-cross-entropy":
        return rng.integers(0, logits.shape[-1], size=logits.shape[:2]).astype(np.int64)
    if loss == "bce-with-logits":
        return rng.integers(0, 2, size=logits.shape).astype(np.float32)
    return rng.standard_normal(logits.shape).astype(np.float32)


def validate_bundle(
    bundle: Bundle,
    example_inputs: dict[str, np.ndarray],
    reference: Callable[[dict[str, np.ndarray]], np.ndarray],
) -> dict[str, object]:
    """Run every check; raise ValidationFailedError on the first failure, else return the numbers."""
    from bitfit.sdk.trainer import TrainingSession

    manifest = bundle.manifest
    logits_name = manifest.logits_output
    session = _session(bundle)
    feeds = {k: v for k, v in example_inputs.items() if k in {i.name for i in session.get_inputs()}}
    ours = session.run([logits_name], feeds)[0]
    expected = np.asarray(reference(example_inputs))
    if ours.shape != expected.shape:
        raise ValidationFailedError(f"inference output shape {ours.shape} differs from the source model's {expected.shape}")
    diff = float(np.max(np.abs(ours - expected))) if ours.size else 0.0
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    if diff > OUTPUT_TOLERANCE * scale:
        raise ValidationFailedError(
            f"the inference model differs from the source model by {diff:.3g} (> {OUTPUT_TOLERANCE} x {scale:.3g}); "
            "the export changed the model's math. Report this with the model."
        )

    training = onnx.load(str(bundle.file("training_model")), load_external_data=False)
    suffix = "_grad.accumulation.buffer"
    with_grad = {i.name[: -len(suffix)] for i in training.graph.input if i.name.endswith(suffix)}
    trainable = {t.name for t in manifest.trainable}
    if with_grad != trainable:
        raise ValidationFailedError(
            f"gradients are built for {sorted(with_grad ^ trainable)[:5]} against the trainable set; frozen tensors would train"
        )

    rng = np.random.default_rng(0)
    trainer = TrainingSession(bundle, learning_rate=1e-2)
    order = manifest.source["parameter_order"]
    before = trainer.parameter_values(order)
    labels = example_labels(bundle, ours, rng)
    loss = trainer.train_step(feeds, labels)
    after = trainer.parameter_values(order)
    frozen_changed = [n for n in order if n not in trainable and not np.array_equal(before[n], after[n])]
    trainable_changed = [n for n in trainable if not np.array_equal(before[n], after[n])]
    if frozen_changed:
        raise ValidationFailedError(f"one training step changed frozen tensors {frozen_changed[:5]}")
    if not trainable_changed:
        raise ValidationFailedError("one training step changed no trainable tensor (zero gradients everywhere?)")
    if not np.isfinite(loss):
        raise ValidationFailedError(f"the first training loss is {loss}; check the labels/loss for this task")

    trained = trainer.trainable_values()
    _, eval_logits = trainer.evaluate(feeds, labels)
    delta_logits = session.run([logits_name], {**feeds, **_bias_feeds(bundle, trained)})[0]
    train_infer_diff = float(np.max(np.abs(delta_logits - eval_logits)))
    if train_infer_diff > OUTPUT_TOLERANCE * scale:
        raise ValidationFailedError(
            f"the inference model fed the trained tensors differs from the training graph by {train_infer_diff:.3g}"
        )

    per_row_diff = None
    batch = next(iter(feeds.values())).shape[0]
    if manifest.per_row and batch > 1:
        base = bundle.trainable_base()
        rows = {t.name: np.stack([base[t.name] + rng.standard_normal(t.shape).astype(np.float32) * 0.05 for _ in range(batch)])
                for t in manifest.trainable}
        together = session.run([logits_name], {**feeds, **rows})[0]
        apart = np.concatenate([
            session.run([logits_name], {**{k: v[i:i + 1] for k, v in feeds.items()},
                                        **{k: v[i:i + 1] for k, v in rows.items()}})[0]
            for i in range(batch)
        ])
        per_row_diff = float(np.max(np.abs(together - apart)))
        if per_row_diff > PER_ROW_TOLERANCE * scale:
            raise ValidationFailedError(f"per-row biases differ from row-by-row runs by {per_row_diff:.3g}")
    return {
        "inference_vs_source_max_abs_diff": diff,
        "tolerance": OUTPUT_TOLERANCE,
        "frozen_excluded_from_gradients": True,
        "one_step_frozen_unchanged": True,
        "one_step_trainable_changed": len(trainable_changed),
        "first_loss": loss,
        "inference_vs_training_max_abs_diff": train_infer_diff,
        "per_row_vs_row_by_row_max_abs_diff": per_row_diff,
    }

