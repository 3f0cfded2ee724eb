"""The portable optimizer model (``portable_optimizer.onnx``): one AdamW or SGD update of
every trainable tensor as an ordinary ONNX graph, so a device applies the update with the
inference API of any onnxruntime (docs/portable-training.md is the spec).

The graph holds no state: the device feeds the current values, gradients, moments and
step, and keeps the outputs for the next step. AdamW is ORT's ``AdamWOptimizer`` with
``adam_mode=1`` (Hugging Face's placement of epsilon, bias correction folded into the step
size), so the portable backend trains exactly like the ``ort-training`` one.

Inside, the tensors of each role (values, gradients, moments) are concatenated into one
flat vector, updated by a dozen elementwise nodes, and split back: the node count does not
grow with the number of tensors, and the bias-correction scalars are computed once a step.
The inputs and outputs stay per tensor, as the spec names them.

Example:
    >>> from bitfit.export.optimizer_graph import build_optimizer_model
    >>> model = build_optimizer_model([("fc.bias", [3])], "sgd")
    >>> [i.name for i in model.graph.input], [o.name for o in model.graph.output]
    (['learning_rate', 'fc.bias', 'fc.bias_grad'], ['fc.bias_out'])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, get_args

import numpy as np
import onnx
from onnx import TensorProto, helper

from bitfit.sdk.bundle import OptimizerName
from bitfit.sdk.errors import ExportError

OPTIMIZER_FILE = "portable_optimizer.onnx"
LEARNING_RATE = "learning_rate"
STEP = "step"
MIN_OPSET = 13  # ReduceSum-style axes inputs and the op versions the spec allows
MAX_IR_VERSION = 10  # onnxruntime 1.19.2 refuses models stamped with a newer IR version
# What ORT 1.19.2's optimizer models compute (checked against onnxblock's AdamW/SGD blocks and
# by tests/test_parity.py); the learning rate is set by the trainer at run time.
OPTIMIZER_SETTINGS = {
    "adamw": {"betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.0, "bias_correction": True,
              "epsilon_placement": "huggingface (added before bias correction, adam_mode=1)"},
    "sgd": {"momentum": 0.0, "weight_decay": 0.0, "update": "w -= lr * grad"},
}

# Suffixes of the per-tensor inputs and outputs; the spec (docs/portable-training.md) names them.
GRAD, EXP_AVG, EXP_AVG_SQ, OUT = "_grad", "_exp_avg", "_exp_avg_sq", "_out"


def optimizer_io_names(name: str, optimizer: OptimizerName) -> tuple[list[str], list[str]]:
    """The graph inputs and outputs that belong to trainable tensor ``name``, in graph order.

    Example:
        >>> optimizer_io_names("b", "adamw")
        (['b', 'b_grad', 'b_exp_avg', 'b_exp_avg_sq'], ['b_out', 'b_exp_avg_out', 'b_exp_avg_sq_out'])
    """
    if optimizer == "adamw":
        inputs = [name, name + GRAD, name + EXP_AVG, name + EXP_AVG_SQ]
        return inputs, [name + OUT, name + EXP_AVG + OUT, name + EXP_AVG_SQ + OUT]
    if optimizer == "sgd":
        return [name, name + GRAD], [name + OUT]
    raise ExportError(f"unknown optimizer {optimizer!r}: use one of {', '.join(get_args(OptimizerName))}")


def build_optimizer_model(
    tensors: Sequence[tuple[str, Sequence[int]]],
    optimizer: OptimizerName,
    opset: int = 17,
    *,
    settings: Mapping[str, Any] | None = None,
) -> onnx.ModelProto:
    """One optimizer update of ``tensors`` (name, training shape) as a standard-ops ONNX model.

    Args:
        tensors: the trainable tensors in manifest order, each ``(name, shape)``.
        optimizer: ``"adamw"`` or ``"sgd"`` (``manifest.optimizer``).
        opset: the default-domain opset to stamp (the model's own, >= 13).
        settings: the optimizer's hyperparameters; default ``OPTIMIZER_SETTINGS``
            for ``optimizer`` (what the manifest records as ``source.optimizer_settings``).

    Returns:
        The checked model: inputs ``learning_rate``, ``step`` (AdamW only), then per tensor
        ``<name>``, ``<name>_grad`` (and ``<name>_exp_avg``, ``<name>_exp_avg_sq`` for AdamW);
        outputs per tensor ``<name>_out`` (and ``<name>_exp_avg_out``, ``<name>_exp_avg_sq_out``).

    Raises:
        ExportError: an unknown optimizer, an opset below 13, no tensors, a bad shape, or a
            tensor name that collides with another graph name.

    Example:
        >>> model = build_optimizer_model([("a.bias", [4]), ("b.bias", [2, 3])], "adamw")
        >>> [i.name for i in model.graph.input][:4]
        ['learning_rate', 'step', 'a.bias', 'a.bias_grad']
        >>> len(model.graph.output), model.ir_version <= MAX_IR_VERSION
        (6, True)
    """
    if optimizer not in get_args(OptimizerName):
        raise ExportError(f"unknown optimizer {optimizer!r}: use one of {', '.join(get_args(OptimizerName))}")
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ExportError(f"the portable optimizer model needs opset >= {MIN_OPSET}, got {opset!r}; export the model "
                          f"with a newer opset")
    if not tensors:
        raise ExportError("the portable optimizer model needs at least one trainable tensor; select some with the policy")
    if settings is None:

        settings = OPTIMIZER_SETTINGS[optimizer]
    names = [name for name, _ in tensors]
    for name, shape in tensors:
        if not (isinstance(name, str) and name) or not all(isinstance(d, int) and d > 0 for d in shape):
            raise ExportError(f"trainable tensor {name!r} has a bad name or shape {list(shape)}; expected positive ints")
    builder = _GraphBuilder(reserved=names)
    roles = 4 if optimizer == "adamw" else 2  # value, grad (, exp_avg, exp_avg_sq) in; 3 or 1 out
    inputs = [helper.make_tensor_value_info(LEARNING_RATE, TensorProto.FLOAT, [])]
    if optimizer == "adamw":
        inputs.append(helper.make_tensor_value_info(STEP, TensorProto.INT64, []))
    columns: list[list[str]] = [[] for _ in range(roles)]
    out_columns: list[list[str]] = [[] for _ in range(3 if optimizer == "adamw" else 1)]
    outputs = []
    for name, shape in tensors:
        in_names, out_names = optimizer_io_names(name, optimizer)
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(shape)) for n in in_names]
        outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(shape)) for n in out_names]
        for column, n in zip(columns, in_names):
            column.append(n)
        for column, n in zip(out_columns, out_names):
            column.append(n)
    _check_unique([*(i.name for i in inputs), *(o.name for o in outputs)])
    # One flat vector per role: the update is a dozen elementwise nodes whatever the number
    # of tensors (MiniLM's 50 biases: 27 nodes instead of 608; 1.5-1.9x faster a step, measured on a loaded 2-core machine).
    shapes = [list(shape) for _, shape in tensors]
    flat = [builder.pack(column, shapes, role) for column, role in zip(columns, ("value", "grad", "exp_avg", "exp_avg_sq"))]
    if optimizer == "adamw":
        results = _adamw_update(builder, settings, *flat)
    else:
        results = _sgd_update(builder, settings, *flat)
    for result, column in zip(results, out_columns):
        builder.unpack(result, column, shapes)
    graph = helper.make_graph(builder.nodes, f"bitfit_{optimizer}_step", inputs, outputs, builder.constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="bitfit")
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as err:  # a bug here, not the caller's: say so
        raise ExportError(f"the portable optimizer model failed onnx's checker ({err}); report this bitfit bug") from err
    return model


def _adamw_update(builder: "_GraphBuilder", settings: Mapping[str, Any], w: str, g: str, m: str, v: str) -> list[str]:
    """The AdamW update of flat ``w`` with gradient ``g`` and moments ``m``, ``v``: new w, m, v.

    ORT's ``AdamWOptimizer`` (adam_mode=1) computes the bias corrections in float32, once per
    step: ``step_size = lr * sqrt(1 - b2^t) / (1 - b1^t)``; the constants are float32 as well
    (``1 - b1`` rounded as float32 arithmetic does), so both backends round alike.
    """
    beta1, beta2 = (np.float32(b) for b in settings["betas"])
    eps, weight_decay = np.float32(settings["eps"]), np.float32(settings.get("weight_decay", 0.0))
    if not settings.get("bias_correction", True):
        raise ExportError("the portable optimizer implements AdamW with bias correction only (as the manifest records)")
    one = builder.constant("one", np.float32(1.0))
    b1, b2 = builder.constant("beta1", beta1), builder.constant("beta2", beta2)
    one_minus_b1 = builder.constant("one_minus_beta1", np.float32(1.0) - beta1)
    one_minus_b2 = builder.constant("one_minus_beta2", np.float32(1.0) - beta2)
    t = builder.node("Cast", [STEP], "step_float", to=TensorProto.FLOAT)
    correction1 = builder.node("Sub", [one, builder.node("Pow", [b1, t], "beta1_pow")], "bias_correction1")
    correction2 = builder.node("Sub", [one, builder.node("Pow", [b2, t], "beta2_pow")], "bias_correction2")
    ratio = builder.node("Div", [builder.node("Sqrt", [correction2], "sqrt_correction2"), correction1], "correction")
    step_size = builder.node("Mul", [LEARNING_RATE, ratio], "step_size")

    m_out = builder.node("Add", [builder.node("Mul", [b1, m], "m_decayed"), builder.node("Mul", [one_minus_b1, g], "m_update")],
                         "exp_avg_new")
    g2 = builder.node("Mul", [g, g], "grad_sq")
    v_out = builder.node("Add", [builder.node("Mul", [b2, v], "v_decayed"), builder.node("Mul", [one_minus_b2, g2], "v_update")],
                         "exp_avg_sq_new")
    denom = builder.node("Add", [builder.node("Sqrt", [v_out], "sqrt_v"), builder.constant("epsilon", eps)], "denom")
    change = builder.node("Div", [builder.node("Mul", [step_size, m_out], "scaled_m"), denom], "change")
    w_out = builder.node("Sub", [w, change], "value_new")
    if weight_decay != 0:  # Hugging Face order: the decay applies to the already-updated value
        decay = builder.node("Mul", [LEARNING_RATE, builder.constant("weight_decay", weight_decay)], "lr_weight_decay")
        w_out = builder.node("Sub", [w_out, builder.node("Mul", [decay, w_out], "decay")], "value_decayed")
    return [w_out, m_out, v_out]


def _sgd_update(builder: "_GraphBuilder", settings: Mapping[str, Any], w: str, g: str) -> list[str]:
    """Plain SGD of flat ``w``: ``w - lr * g``."""
    if settings.get("momentum", 0.0) or settings.get("weight_decay", 0.0):
        raise ExportError("the portable optimizer implements plain SGD only (no momentum, no weight decay)")
    return [builder.node("Sub", [w, builder.node("Mul", [LEARNING_RATE, g], "change")], "value_new")]


class _GraphBuilder:
    """Collects nodes and constants, naming every internal value after what it is.

    Internal values live under ``bitfit_opt/`` so they cannot shadow a tensor's own names.
    """

    PREFIX = "bitfit_opt/"

    def __init__(self, reserved: Sequence[str]) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.constants: list[onnx.TensorProto] = []
        clashes = [n for n in reserved if n in (LEARNING_RATE, STEP) or n.startswith(self.PREFIX)]
        if clashes:
            raise ExportError(f"trainable tensor names {clashes[:3]} collide with the optimizer model's own names "
                              f"({LEARNING_RATE!r}, {STEP!r}, {self.PREFIX!r}...); rename them in the source model")

    def constant(self, name: str, value: Any, dtype: Any = np.float32) -> str:
        full = self.PREFIX + name
        self.constants.append(onnx.numpy_helper.from_array(np.asarray(value, dtype), full))
        return full

    def node(self, op: str, inputs: list[str], output: str, *, name: str | None = None, **attrs: Any) -> str:
        """Add ``op`` over ``inputs``; its output is ``name`` as given (a graph output) or the prefixed ``output``."""
        result = name if name is not None else self.PREFIX + output
        self.nodes.append(helper.make_node(op, inputs, [result], name=f"{op}:{result}", **attrs))
        return result

    def pack(self, names: list[str], shapes: list[list[int]], role: str) -> str:
        """The tensors ``names`` as one flat vector (rank > 1 reshaped to 1-D first), in order."""
        parts = []
        for name, shape in zip(names, shapes):
            if len(shape) == 1:
                parts.append(name)
            else:
                flat_shape = self._shape_constant([-1])
                parts.append(self.node("Reshape", [name, flat_shape], f"{name}/flat"))
        return self.node("Concat", parts, f"{role}_all", axis=0)

    def unpack(self, flat: str, names: list[str], shapes: list[list[int]]) -> None:
        """Split ``flat`` into the graph outputs ``names`` with their shapes."""
        sizes = self.constant(f"{flat.removeprefix(self.PREFIX)}/sizes", [int(np.prod(s)) for s in shapes], np.int64)
        pieces = [name if len(shape) == 1 else f"{self.PREFIX}{name}/flat" for name, shape in zip(names, shapes)]
        self.nodes.append(helper.make_node("Split", [flat, sizes], pieces, name=f"Split:{flat}", axis=0))
        for name, piece, shape in zip(names, pieces, shapes):
            if piece != name:
                self.node("Reshape", [piece, self._shape_constant(shape)], "", name=name)

    def _shape_constant(self, shape: list[int]) -> str:
        full = self.PREFIX + "shape_" + "x".join(str(d) for d in shape)
        if not any(c.name == full for c in self.constants):
            self.constants.append(onnx.numpy_helper.from_array(np.asarray(shape, np.int64), full))
        return full


def _check_unique(names: list[str]) -> None:
    seen: set[str] = set()
    duplicates = sorted({n for n in names if n in seen or seen.add(n)})  # type: ignore[func-returns-value]
    if duplicates:
        raise ExportError(f"the optimizer model would have duplicate value names {duplicates[:3]} (a tensor named like "
                          "another's _grad/_exp_avg/_out); rename the tensors in the source model")


__all__ = ["build_optimizer_model", "optimizer_io_names", "OPTIMIZER_SETTINGS", "OPTIMIZER_FILE", "LEARNING_RATE", "STEP"]
