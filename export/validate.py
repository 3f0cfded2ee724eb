"""Checks a freshly written bundle before ``export_bundle`` returns it.

1. The inference model reproduces the source model (torch, or the original ONNX file)
   on the example inputs within 1e-4.
2. Portable training model: its inputs are the model inputs, the labels and the trainable
   tensors only (a frozen tensor cannot change); its loss and every gradient match torch
   autograd on the source module for the tensors that are its parameters, and ORT's own
   gradient builder (where onnxruntime-training is installed, else central finite
   differences) for the rest (``.onnx`` sources, biases ``add_biases`` added), per tensor
   within 1e-4 of the step's largest gradient; the eval model fed one step's trained
   tensors gives the inference model's output.
3. ORT-training artifacts (where written): only the trainable tensors have gradient
   buffers; one training step changes trainable tensors and leaves every frozen tensor
   bit-identical; the inference model fed the trained tensors gives the eval logits.
4. Per-row bundles: a batch where each row has its own bias equals row-by-row runs.

Example:
    >>> from bitfit.export.validate import OUTPUT_TOLERANCE
    >>> OUTPUT_TOLERANCE
    0.0001
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import get_args

import numpy as np
import onnx

from bitfit.sdk.bundle import Bundle, LossName
from bitfit.sdk.errors import ExportError, ValidationFailedError

log = logging.getLogger("bitfit.export")
OUTPUT_TOLERANCE = 1e-4
PER_ROW_TOLERANCE = 1e-5
GRADIENT_TOLERANCE = 1e-4  # of the step's largest reference gradient, per tensor
FINITE_DIFFERENCE_TOLERANCE = 2e-2  # float32 central differences: relative to the directional derivative's scale


def _session(bundle: Bundle, key: str = "inference_model"):
    from bitfit.sdk.runtime import ort

    return ort.InferenceSession(str(bundle.file(key)), providers=["CPUExecutionProvider"])


def _bias_feeds(bundle: Bundle, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {t.name: values[t.name].reshape(t.inference_shape).astype(np.float32) for t in bundle.manifest.trainable}


def example_labels(bundle: Bundle, logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Labels of the right type and shape for one training step on these logits.

    Example:
        >>> from types import SimpleNamespace
        >>> logits, rng = np.zeros((2, 3), np.float32), np.random.default_rng(0)
        >>> for loss in ("cross-entropy", "bce-with-logits", "mse"):
        ...     labels = example_labels(SimpleNamespace(manifest=SimpleNamespace(loss=loss)), logits, rng)
        ...     print(loss, labels.dtype, labels.shape)
        cross-entropy int64 (2,)
        bce-with-logits float32 (2, 3)
        mse float32 (2, 3)
    """
    loss = bundle.manifest.loss
    if loss == "cross-entropy":
        return rng.integers(0, logits.shape[-1], size=logits.shape[0]).astype(np.int64)
    if loss == "token-cross-entropy":
        return rng.integers(0, logits.shape[-1], size=logits.shape[:2]).astype(np.int64)
    if loss == "bce-with-logits":
        return rng.integers(0, 2, size=logits.shape).astype(np.float32)
    if loss == "mse":
        return rng.standard_normal(logits.shape).astype(np.float32)
    raise ValidationFailedError(_unknown_loss(loss))


def _unknown_loss(loss: str) -> str:
    return f"the manifest names loss {loss!r}, which validation does not know: one of {', '.join(get_args(LossName))}"


def validate_bundle(
    bundle: Bundle,
    example_inputs: dict[str, np.ndarray],
    reference: Callable[[dict[str, np.ndarray]], np.ndarray],
    torch_logits: Callable | None = None,
) -> dict[str, object]:
    """Run every check; raise ValidationFailedError on the first failure, else return the numbers.

    ``reference`` is the source model's forward (numpy in, numpy out); ``torch_logits`` its
    torch forward with parameters overridden (``SourceGraph.torch_logits``), from which the
    portable gradients of the module's own parameters are checked against autograd (the
    other tensors, or all where it is None: ORT's gradient builder, else finite differences).

    Example:
        >>> src = from_torch(model, {"x": x})                                       # doctest: +SKIP
        >>> bundle = export_bundle(src, "bundles/mlp", ort_training="never")        # doctest: +SKIP
        >>> result = validate_bundle(bundle, src.example_inputs, src.reference, src.torch_logits)  # doctest: +SKIP
        >>> result["portable"]["gradient_reference"], result["per_row_vs_row_by_row_max_abs_diff"]  # doctest: +SKIP
        ('torch-autograd', 0.0)
    """
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
    rng = np.random.default_rng(0)
    labels = example_labels(bundle, ours, rng)
    results: dict[str, object] = {"inference_vs_source_max_abs_diff": diff, "tolerance": OUTPUT_TOLERANCE}
    if manifest.backend_available("portable"):
        results["portable"] = _validate_portable(bundle, session, feeds, labels, scale, torch_logits)
    if manifest.backend_available("ort-training"):
        results.update(_validate_ort_training(bundle, session, feeds, labels, scale))
    results["per_row_vs_row_by_row_max_abs_diff"] = _validate_per_row(bundle, session, feeds, scale, rng)
    return results


def _validate_portable(bundle: Bundle, session, feeds: dict[str, np.ndarray], labels: np.ndarray, scale: float,
                       torch_logits: Callable | None) -> dict[str, object]:
    from .gradient_graph import GRAD_SUFFIX, LOSS_OUTPUT

    manifest = bundle.manifest
    names = [t.name for t in manifest.trainable]
    gradient = _session(bundle, "portable_gradient_model")
    expected_inputs = [i.name for i in manifest.inputs] + [manifest.label_input] + names
    expected_outputs = [LOSS_OUTPUT, manifest.logits_output] + [n + GRAD_SUFFIX for n in names]
    got_inputs, got_outputs = [i.name for i in gradient.get_inputs()], [o.name for o in gradient.get_outputs()]
    if sorted(got_inputs) != sorted(expected_inputs) or got_outputs != expected_outputs:
        raise ValidationFailedError(
            f"the portable gradient model takes {got_inputs[:6]}... and gives {got_outputs[:4]}...; expected the model "
            "inputs, labels and trainable tensors in, loss, output and one gradient per trainable tensor out"
        )
    base = bundle.trainable_base()
    outs = dict(zip(got_outputs, gradient.run(None, {**feeds, manifest.label_input: labels, **base})))
    loss, grads = float(outs[LOSS_OUTPUT]), {n: outs[n + GRAD_SUFFIX] for n in names}
    if not np.isfinite(loss):
        raise ValidationFailedError(f"the portable model's first loss is {loss}; check the labels/loss for this task")
    output_diff = float(np.max(np.abs(outs[manifest.logits_output] - session.run([manifest.logits_output], feeds)[0])))
    if output_diff > OUTPUT_TOLERANCE * scale:
        raise ValidationFailedError(f"the portable gradient model's output differs from the inference model's by {output_diff:.3g}")
    checks = _check_gradients(bundle, feeds, labels, base, loss, grads, torch_logits)
    method = " + ".join(checks)
    worst = max(c["worst"] for c in checks.values())
    # One SGD-like step, then the eval model and the inference model must agree on the result.
    largest = max(float(np.max(np.abs(g))) for g in grads.values())
    if largest == 0.0:
        raise ValidationFailedError("every gradient of the portable model is zero: nothing would train")
    trained = {n: base[n] - (0.1 / largest) * grads[n] for n in names}
    evaluator = _session(bundle, "portable_eval_model")
    eval_loss, eval_out = evaluator.run([LOSS_OUTPUT, manifest.logits_output], {**feeds, manifest.label_input: labels, **trained})
    infer_out = session.run([manifest.logits_output], {**feeds, **_bias_feeds(bundle, trained)})[0]
    eval_diff = float(np.max(np.abs(eval_out - infer_out)))
    if eval_diff > OUTPUT_TOLERANCE * scale:
        raise ValidationFailedError(f"the portable eval model fed trained tensors differs from the inference model by {eval_diff:.3g}")
    return {"gradient_reference": method, "worst_gradient_error_relative": worst, "gradient_tolerance": max(
                c["tolerance"] for c in checks.values()), "gradient_checks": checks, "first_loss": loss,
            "output_vs_inference_max_abs_diff": output_diff, "eval_vs_inference_after_step_max_abs_diff": eval_diff,
            "frozen_tensors_are_constants": True}


def _compare_gradients(method: str, loss: float, grads: dict[str, np.ndarray], ref_loss: float,
                       ref_grads: dict[str, np.ndarray]) -> float:
    if abs(loss - ref_loss) > GRADIENT_TOLERANCE * max(1.0, abs(ref_loss)):
        raise ValidationFailedError(f"the portable model's loss {loss:.7g} differs from {method}'s {ref_loss:.7g}")
    largest = max(float(np.max(np.abs(g))) for g in ref_grads.values()) or 1.0
    errors = {n: float(np.max(np.abs(grads[n] - ref_grads[n]))) / largest for n in ref_grads}
    name, worst = max(errors.items(), key=lambda kv: kv[1])
    if worst > GRADIENT_TOLERANCE:
        raise ValidationFailedError(
            f"the portable gradient of {name} differs from {method} by {worst:.3g} of the largest gradient "
            f"(> {GRADIENT_TOLERANCE}); the portable model would train differently. Report this with the model."
        )
    return worst


def _check_gradients(bundle: Bundle, feeds, labels, base, loss: float, grads: dict[str, np.ndarray],
                     torch_logits: Callable | None) -> dict[str, dict[str, object]]:
    """Check every portable gradient against a reference; per method: tensors, worst, tolerance.

    Torch autograd checks the tensors that are parameters of the source module (the
    manifest's ``source.parameter_names``); the rest (biases ``add_biases`` added, ``.onnx``
    sources' tensors, a torch forward that refused the overrides) against ORT's gradient
    builder where onnxruntime-training is installed, else central finite differences.
    """
    names = [t.name for t in bundle.manifest.trainable]
    checks: dict[str, dict[str, object]] = {}
    rest = list(names)
    torch_check = _torch_gradients(bundle, feeds, labels, base, torch_logits)
    if torch_check is not None:
        ref_loss, ref_grads, groups = torch_check
        # A bias the exporter split per use has one reference gradient: the sum over its copies.
        folded = {key: sum(grads[n] for n in groups[key]) for key in ref_grads}
        worst = _compare_gradients("torch-autograd", loss, folded, ref_loss, ref_grads)
        checks["torch-autograd"] = {"tensors": len(ref_grads), "worst": worst, "tolerance": GRADIENT_TOLERANCE}
        covered = {n for key in ref_grads for n in groups[key]}
        rest = [n for n in names if n not in covered]
    if not rest:
        return checks
    ort_check = _ort_gradients(bundle, feeds, labels)
    if ort_check is not None:
        method = "onnxruntime-training gradient builder"
        ref_loss, ref_grads = ort_check
        worst = _compare_gradients(method, loss, {n: grads[n] for n in rest}, ref_loss, {n: ref_grads[n] for n in rest})
        checks[method] = {"tensors": len(rest), "worst": worst, "tolerance": GRADIENT_TOLERANCE}
    elif "portable_eval_model" in bundle.manifest.files:
        worst = _finite_difference_check(bundle, feeds, labels, base, {n: grads[n] for n in rest})
        checks["finite-differences"] = {"tensors": len(rest), "worst": worst, "tolerance": FINITE_DIFFERENCE_TOLERANCE}
    else:
        raise ExportError(
            f"nothing can check the portable gradients of {rest[:3]}{'...' if len(rest) > 3 else ''}: they are no "
            "parameters of the source module (no torch autograd), onnxruntime-training is not installed (no gradient "
            "builder) and the bundle has no portable eval model (no finite differences). Export from a torch module "
            "that has them, or with `pip install 'bitfit[export,ort-training]'`.")
    return checks


def _torch_gradients(bundle: Bundle, feeds, labels, base, torch_logits):
    """(loss, reference gradient per group, group -> trainable names) from torch autograd for
    the trainable tensors that are parameters of the source module; None where there are none.

    Why only those: ``functional_call`` overrides by name, and a name that is no parameter of
    the module either does nothing or fails (``norm1.bias`` where ``norm1`` is a Parameter is
    a TypeError); a bias ``add_biases`` added is such a name.
    """
    if torch_logits is None:
        return None
    import torch

    source = bundle.manifest.source if isinstance(bundle.manifest.source, dict) else {}
    known = source.get("parameter_names")  # trainable name -> source parameter, None for tensors it lacks
    groups: dict[str, list[str]] = {}
    for t in bundle.manifest.trainable:
        param = t.name.split(".__copy")[0] if known is None else known.get(t.name)
        if param is not None:
            groups.setdefault(param, []).append(t.name)
    if not groups:
        return None
    overrides = {p: torch.tensor(base[group[0]], requires_grad=True) for p, group in groups.items()}
    try:
        loss = _torch_loss(bundle, torch_logits(overrides, feeds), labels)
        loss.backward()
    except (TypeError, AttributeError, KeyError, RuntimeError) as err:
        log.warning("torch autograd could not check the portable gradients (%s); using the next reference", err)
        return None
    reached = {p: t.grad.numpy() for p, t in overrides.items() if t.grad is not None}
    if not reached:
        return None
    return float(loss.detach()), reached, groups


def _ort_gradients(bundle: Bundle, feeds, labels):
    """(loss, gradient per trainable name) from ORT's gradient builder; None where it is not there."""
    if not bundle.manifest.backend_available("ort-training"):
        return None
    from bitfit.sdk.runtime import has_training_api

    if not has_training_api():
        return None
    from bitfit.sdk.trainer import OrtTrainingSession

    return OrtTrainingSession(bundle).gradients(feeds, labels)


def _torch_loss(bundle: Bundle, out, labels: np.ndarray):
    import torch
    import torch.nn.functional as F

    manifest = bundle.manifest
    target = torch.from_numpy(labels)
    if manifest.loss == "cross-entropy":
        return F.cross_entropy(out, target)
    if manifest.loss == "token-cross-entropy":
        return F.cross_entropy(out.transpose(1, 2), target, ignore_index=manifest.ignore_index if manifest.ignore_index is not None else -100)
    if manifest.loss == "mse":
        return F.mse_loss(out, target)
    if manifest.loss == "bce-with-logits":
        return F.binary_cross_entropy_with_logits(out, target)
    raise ValidationFailedError(_unknown_loss(manifest.loss))


def _finite_difference_check(bundle: Bundle, feeds, labels, base, grads) -> float:
    """Central differences of the eval model's loss along one random direction per tensor."""
    manifest = bundle.manifest
    evaluator = _session(bundle, "portable_eval_model")
    rng = np.random.default_rng(1)

    def loss_at(values):
        return float(evaluator.run(["loss"], {**feeds, manifest.label_input: labels, **values})[0])

    worst = 0.0
    for name, grad in grads.items():
        direction = rng.standard_normal(grad.shape).astype(np.float32)
        step = 1e-2 * max(1.0, float(np.max(np.abs(base[name]))))
        plus = loss_at({**base, name: base[name] + step * direction})
        minus = loss_at({**base, name: base[name] - step * direction})
        numeric, analytic = (plus - minus) / (2 * step), float(np.sum(grad * direction))
        error = abs(numeric - analytic) / max(1e-3, abs(analytic), abs(numeric))
        if error > FINITE_DIFFERENCE_TOLERANCE and abs(numeric - analytic) > 1e-4:
            raise ValidationFailedError(
                f"the portable gradient of {name} disagrees with finite differences ({analytic:.6g} vs {numeric:.6g})")
        worst = max(worst, error)
    return worst


def _validate_ort_training(bundle: Bundle, session, feeds: dict[str, np.ndarray], labels: np.ndarray,
                           scale: float) -> dict[str, object]:
    from bitfit.sdk.trainer import OrtTrainingSession

    manifest = bundle.manifest
    logits_name = manifest.logits_output
    training = onnx.load(str(bundle.file("training_model")), load_external_data=False)
    suffix = "_grad.accumulation.buffer"
    with_grad = {i.name[: -len(suffix)] for i in training.graph.input if i.name.endswith(suffix)}
    trainable = {t.name for t in manifest.trainable}
    if with_grad != trainable:
        raise ValidationFailedError(
            f"gradients are built for {sorted(with_grad ^ trainable)[:5]} against the trainable set; frozen tensors would train"
        )

    trainer = OrtTrainingSession(bundle, learning_rate=1e-2)
    order = manifest.source["parameter_order"]
    before = trainer.parameter_values(order)
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

    return {
        "frozen_excluded_from_gradients": True,
        "one_step_frozen_unchanged": True,
        "one_step_trainable_changed": len(trainable_changed),
        "first_loss": loss,
        "inference_vs_training_max_abs_diff": train_infer_diff,
    }


def _validate_per_row(bundle: Bundle, session, feeds: dict[str, np.ndarray], scale: float,
                      rng: np.random.Generator) -> float | None:
    manifest = bundle.manifest
    logits_name = manifest.logits_output
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
    return per_row_diff
