"""Write a bundle's portable training models (gradient, eval, optimizer) next to its
``weights.safetensors``, or say why the source cannot have them.

The gradient and eval models read every frozen weight as ONNX external data from the
bundle's one weights file (the bytes are stored once); the trainable tensors are graph
inputs. See ``docs/portable-training.md``.

Example:
    >>> from bitfit.export.portable import PORTABLE_FILES
    >>> sorted(PORTABLE_FILES)
    ['portable_eval_model', 'portable_gradient_model', 'portable_optimizer_model']
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from bitfit.sdk.bundle import LossName, OptimizerName

from .gradient_graph import EVAL_FILE, GRADIENT_FILE, NoPortableModel, build_portable_models
from .inference_graph import WEIGHTS_FILE, point_at_weights
from .optimizer_graph import OPTIMIZER_FILE, build_optimizer_model

log = logging.getLogger("bitfit.export")

PORTABLE_FILES = {
    "portable_gradient_model": GRADIENT_FILE,
    "portable_eval_model": EVAL_FILE,
    "portable_optimizer_model": OPTIMIZER_FILE,
}


@dataclass
class PortableResult:
    """What was written (manifest file keys -> paths), or the reason nothing was.

    Example:
        >>> PortableResult(reason="the model uses opset 11").available
        False
    """

    files: dict[str, str] = field(default_factory=dict)
    reason: str = ""
    stats: dict = field(default_factory=dict)

    @property
    def available(self) -> bool:
        """Whether the bundle has the portable models (the manifest's ``training_backends``).

        Example:
            >>> PortableResult(files=dict(PORTABLE_FILES)).available
            True
        """
        return bool(self.files)


def write_portable_models(
    forward: onnx.ModelProto,
    trainable: list[str],
    trainable_shapes: Mapping[str, list[int]],
    out_dir: Path,
    *,
    loss: LossName,
    optimizer: OptimizerName,
    example_inputs: Mapping[str, np.ndarray],
    ignore_index: int | None,
) -> PortableResult:
    """Build and save the three portable models into ``out_dir`` (which holds ``weights.safetensors``).

    A graph the differentiation cannot handle gives a result with ``reason`` set and no
    files: the bundle then trains with the ORT-training backend only, and the manifest
    records the reason.

    Example:
        >>> import numpy as np, tempfile, pathlib
        >>> from onnx import helper, numpy_helper
        >>> from bitfit.export.inference_graph import build_inference_model
        >>> inits = [numpy_helper.from_array(np.eye(2, dtype=np.float32), "w"), numpy_helper.from_array(np.zeros(2, np.float32), "b")]
        >>> g = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc")], "g",
        ...     [helper.make_tensor_value_info("x", 1, ["batch", 2])], [helper.make_tensor_value_info("y", 1, ["batch", 2])], inits)
        >>> m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        >>> out, feeds = pathlib.Path(tempfile.mkdtemp()), {"x": np.ones((2, 2), np.float32)}
        >>> _ = build_inference_model(m, ["b"], {}, out, feeds)              # writes weights.safetensors
        >>> result = write_portable_models(m, ["b"], {"b": [2]}, out, loss="mse", optimizer="sgd",
        ...                                example_inputs=feeds, ignore_index=None)
        >>> result.available, sorted(p.name for p in out.iterdir())
        (True, ['inference.onnx', 'portable_eval.onnx', 'portable_gradient.onnx', 'portable_optimizer.onnx', 'weights.safetensors'])
    """
    try:
        models = build_portable_models(forward, trainable, loss=loss, example_inputs=example_inputs,
                                       ignore_index=ignore_index)
    except NoPortableModel as err:
        log.warning("no portable training model: %s", err)
        return PortableResult(reason=str(err))
    opset = models.stats["opset"]
    optimizer_model = build_optimizer_model([(n, list(trainable_shapes[n])) for n in trainable], optimizer, opset=opset)
    for model, name in ((models.gradient, GRADIENT_FILE), (models.eval, EVAL_FILE)):
        point_at_weights(model, out_dir / WEIGHTS_FILE)
        onnx.save(model, str(out_dir / name))
    onnx.save(optimizer_model, str(out_dir / OPTIMIZER_FILE))
    return PortableResult(files=dict(PORTABLE_FILES), stats=models.stats)


__all__ = ["write_portable_models", "PortableResult", "PORTABLE_FILES"]
