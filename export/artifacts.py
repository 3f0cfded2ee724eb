"""ONNX Runtime on-device training artifacts: training, eval and optimizer models and
a shapes-only checkpoint (the weights live once, in the bundle's ``weights`` file).

Example:
    >>> from bitfit.export.artifacts import LOSS_FOR_TASK
    >>> LOSS_FOR_TASK["token-classification"]
    'token-cross-entropy'
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

import onnx

from bitfit.sdk.bundle import LossName, OptimizerName, Task
from bitfit.sdk.errors import ExportError, ResourceExhaustedError, UnsupportedModelError
from bitfit.sdk.runtime import is_out_of_memory

from .gradient_graph import LABEL_INPUT
from .repairs import cap_ir_version

log = logging.getLogger("bitfit.export")

LOSS_FOR_TASK: dict[Task, LossName] = {
    "classification": "cross-entropy",
    "regression": "mse",
    "multilabel": "bce-with-logits",
    "token-classification": "token-cross-entropy",
    "causal-lm": "token-cross-entropy",
}
ARTIFACT_FILES = {
    "training_model": "training_model.onnx",
    "eval_model": "eval_model.onnx",
    "optimizer_model": "optimizer_model.onnx",
    "checkpoint": "checkpoint",
}


def _loss_block(loss: LossName, ignore_index: int | None):
    from onnxruntime.training import onnxblock

    if loss not in get_args(LossName):
        raise ExportError(f"unknown loss {loss!r}: use one of {', '.join(get_args(LossName))}")

    class LossOnLabels(onnxblock.Block):
        """Every loss reads its targets from one graph input named ``labels``."""

        def __init__(self) -> None:
            super().__init__()
            if loss == "mse":
                self._inner = onnxblock.loss.MSELoss()
            elif loss == "bce-with-logits":
                self._inner = onnxblock.loss.BCEWithLogitsLoss()
            else:  # cross-entropy (token-cross-entropy is built in build())
                self._inner = onnxblock.loss.CrossEntropyLoss(ignore_index=ignore_index)

        def build(self, output_name: str) -> str:
            if loss != "token-cross-entropy":
                return self._inner(output_name, LABEL_INPUT)
            # Not onnxblock's CrossEntropyLoss: it looks the labels input up by node use only,
            # misses the one added here, and then wants the transposed scores as a graph output.
            from onnx import helper

            scores = _transpose_classes_to_axis1(self.base, output_name)
            self.base.graph.node.append(helper.make_node(
                "SoftmaxCrossEntropyLoss", [scores, LABEL_INPUT], ["bitfit.token_loss", "bitfit.token_log_prob"],
                reduction="mean", ignore_index=ignore_index, name="bitfit.token_loss"))
            return "bitfit.token_loss"

    return LossOnLabels()


def _transpose_classes_to_axis1(model: onnx.ModelProto, output_name: str) -> str:
    # SoftmaxCrossEntropyLoss wants [batch, classes, sequence]; token logits are
    # [batch, sequence, classes]. Labels are [batch, sequence] int64, -100 (or the
    # manifest's ignore_index) where a position does not count.
    from onnx import helper

    out = next(o for o in model.graph.output if o.name == output_name)
    dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    if len(dims) != 3:
        raise UnsupportedModelError(f"token-level loss needs [batch, sequence, classes] logits, {output_name} has rank {len(dims)}")
    transposed = f"{output_name}.__bcs"
    model.graph.node.append(helper.make_node("Transpose", [output_name], [transposed], perm=[0, 2, 1], name="bitfit.loss_transpose"))
    model.graph.input.append(helper.make_tensor_value_info(LABEL_INPUT, onnx.TensorProto.INT64, dims[:2]))
    model.graph.value_info.append(helper.make_tensor_value_info(transposed, out.type.tensor_type.elem_type, [dims[0], dims[2], dims[1]]))
    return transposed


@contextlib.contextmanager
def _quiet_gradient_builder() -> Iterator[None]:
    """Silence the gradient builder's C++ INFO lines (one per graph transformer).

    Why: onnxblock builds its own ``SessionOptions()`` whose logger ignores
    ``set_default_logger_severity``; we hand it options at WARNING+ instead.
    """
    from onnxruntime.training.onnxblock import _training_graph_utils as builder

    original = builder.SessionOptions

    def quiet_options():
        options = original()
        options.log_severity_level = 3
        return options

    builder.SessionOptions = quiet_options
    try:
        yield
    finally:
        builder.SessionOptions = original


def generate_training_artifacts(
    model: onnx.ModelProto,
    trainable: list[str],
    frozen: list[str],
    out_dir: Path,
    *,
    loss: LossName,
    optimizer: OptimizerName = "adamw",
    ignore_index: int | None = None,
    ort_format: bool = False,
    logits_output: str | None = None,
) -> dict[str, str]:
    """Write the four training artifacts into ``out_dir`` (or ``out_dir/mobile`` as .ort).

    Needs onnxruntime-training 1.19.2 (its gradient builder). Returns {manifest file key:
    path relative to out_dir}; the checkpoint holds shapes only (the bundle keeps the weights
    once, in ``weights.safetensors``).

    Raises:
        UnsupportedModelError: the gradient builder cannot differentiate the graph.
        ExportError: an unknown loss or optimizer.

    Example:
        >>> import numpy as np, tempfile, pathlib
        >>> from onnx import helper, numpy_helper
        >>> w = numpy_helper.from_array(np.eye(3, dtype=np.float32), "w")
        >>> b = numpy_helper.from_array(np.zeros(3, np.float32), "b")
        >>> g = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["logits"])], "g",
        ...     [helper.make_tensor_value_info("x", 1, ["batch", 3])], [helper.make_tensor_value_info("logits", 1, ["batch", 3])],
        ...     [w, b])
        >>> model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        >>> generate_training_artifacts(model, ["b"], ["w"], pathlib.Path(tempfile.mkdtemp()), loss="cross-entropy")
        {'training_model': 'training_model.onnx', 'eval_model': 'eval_model.onnx', 'optimizer_model': 'optimizer_model.onnx', 'checkpoint': 'checkpoint'}
    """
    from onnxruntime.training import artifacts as ort_artifacts

    from bitfit.sdk.runtime import ort

    ort.set_default_logger_severity(3)  # the gradient builder logs every transformer at INFO
    out_dir.mkdir(parents=True, exist_ok=True)  # generate_artifacts needs it to exist (pitfall 6)
    optim = {"adamw": ort_artifacts.OptimType.AdamW, "sgd": ort_artifacts.OptimType.SGD}.get(optimizer)
    if optim is None:
        raise ExportError(f"unknown optimizer {optimizer!r}: use one of {', '.join(get_args(OptimizerName))}")
    logits_output = logits_output or model.graph.output[0].name
    target = out_dir / "mobile" if ort_format else out_dir
    target.mkdir(parents=True, exist_ok=True)
    try:
        with _quiet_gradient_builder():
            ort_artifacts.generate_artifacts(
                model, requires_grad=trainable, frozen_params=frozen, loss=_loss_block(loss, ignore_index),
                optimizer=optim, artifact_directory=str(target), nominal_checkpoint=not ort_format,
                additional_output_names=[logits_output], ort_format=ort_format,
            )
    except UnsupportedModelError:
        raise
    except OSError as err:  # writing the files (disk full, permissions): not the model's fault
        raise ExportError(f"could not write the training artifacts to {target} ({err}); check the disk and its permissions") from err
    except Exception as err:
        if is_out_of_memory(err):
            raise ResourceExhaustedError(
                f"onnxruntime ran out of memory building the training graph ({err}); free memory, or export with "
                "ort_training='never' (the portable training model needs no gradient builder)"
            ) from err
        raise UnsupportedModelError(
            f"onnxruntime could not build the training graph: {err}. If it names an op, that op has no gradient "
            "in ORT 1.19.2; see docs/bundle-format.md (known limits)."
        ) from err
    files: dict[str, str] = {}
    prefix = "mobile/" if ort_format else ""
    for key, name in ARTIFACT_FILES.items():
        if ort_format and key != "checkpoint":
            name = name.replace(".onnx", ".ort")
            files[f"mobile_{key}"] = prefix + name
            continue
        if ort_format:
            files["mobile_checkpoint"] = prefix + "checkpoint"  # full: mobile apps load it directly
            continue
        path = target / name
        if name.endswith(".onnx"):
            art = onnx.load(str(path))
            if cap_ir_version(art):
                onnx.save(art, str(path))
        files[key] = name
    if not ort_format:
        # The full checkpoint repeats every frozen weight; the bundle keeps them once in
        # ``weights`` and ships the shapes-only (nominal) checkpoint.
        os.replace(target / "nominal_checkpoint", target / "checkpoint")
    for stray in ("nominal_checkpoint",):
        if (target / stray).exists():
            (target / stray).unlink()
    if ort_format:
        for leftover in target.glob("*.onnx"):
            leftover.unlink()
        # The converter writes one ``<model>.required_operators.config`` per model; a minimal
        # mobile build of ORT is configured from them, so they ship and are listed.
        for config in sorted(target.glob("*required_operators.config")):
            model_name = config.name[: -len("required_operators.config")].rstrip(".")
            files[f"mobile_{model_name}_required_operators" if model_name else "mobile_required_operators"] = prefix + config.name
    log.info("training artifacts written to %s", target)
    return files


def loss_for(task: Task) -> LossName:
    """The loss a bundle for ``task`` trains with when the caller names none.

    Raises:
        ExportError: ``task`` is not one of the manifest's tasks.

    Example:
        >>> loss_for("multilabel")
        'bce-with-logits'
        >>> loss_for("ranking")
        Traceback (most recent call last):
        ...
        bitfit.sdk.errors.ExportError: unknown task 'ranking': use one of classification, regression, multilabel, token-classification, causal-lm
    """
    if task not in LOSS_FOR_TASK:
        raise ExportError(f"unknown task {task!r}: use one of {', '.join(get_args(Task))}")
    return LOSS_FOR_TASK[task]
