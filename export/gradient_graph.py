"""The portable training model: the loss and the gradient of every trainable tensor as an
ordinary ONNX graph (standard ops, default domain), built by reverse-mode differentiation of
the forward graph. See ``docs/portable-training.md`` for the files and their inputs/outputs.

Why our own differentiation rather than ORT's gradient builder: the builder lives only in
onnxruntime-training 1.19.2 (deprecated, no aarch64 or Python 3.13 wheels) and emits
training-only ``com.microsoft`` ops. A bias-only step needs no weight gradient, only the
input-gradient path from each trainable tensor to the loss, so the backward graph here
differentiates exactly the nodes on that path and nothing else (no weight gradients, no
LayerNorm scale gradients unless a scale is trainable). Frozen weights stay initializers
(constants ORT can prepack); matmul input gradients use ``Gemm(transB=1)`` on the same
weight, so no transposed copy of a weight is ever stored or folded.

Shapes: every rule needs the rank of the values it touches, and broadcasting rules need to
know which axes were broadcast. Both are observed by running the forward graph at two batch
sizes (ONNX shape inference loses symbols through BERT's Shape/Gather chains); an axis is
treated as broadcast when the operand's extent is 1 in both runs. Batch and sequence stay
dynamic in the written graph.

Example:
    >>> import numpy as np, onnx
    >>> from onnx import helper, numpy_helper
    >>> w = numpy_helper.from_array(np.eye(3, dtype=np.float32), "w")
    >>> b = numpy_helper.from_array(np.zeros(3, np.float32), "b")
    >>> g = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["logits"])], "g",
    ...     [helper.make_tensor_value_info("x", 1, ["batch", 3])], [helper.make_tensor_value_info("logits", 1, ["batch", 3])],
    ...     [w, b])
    >>> m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    >>> models = build_portable_models(m, ["b"], loss="cross-entropy", example_inputs={"x": np.ones((2, 3), np.float32)})
    >>> [o.name for o in models.gradient.graph.output]
    ['loss', 'logits', 'b_grad']
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bitfit.sdk.bundle import LossName
from bitfit.sdk.errors import UnsupportedModelError

from .inference_graph import observe_output_shapes
from .repairs import freeze_batchnorm_statistics

GRADIENT_FILE = "portable_gradient.onnx"
EVAL_FILE = "portable_eval.onnx"
LOSS_OUTPUT = "loss"
LABEL_INPUT = "labels"
MIN_OPSET = 13  # axes as inputs for ReduceSum / Squeeze / Unsqueeze / Split, per-axis Softmax
GRAD_SUFFIX = "_grad"

# Ops whose float outputs never carry a gradient (integer / boolean results or shape facts).
_NO_GRADIENT = frozenset({
    "Shape", "Size", "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Not", "And", "Or", "Xor",
    "ArgMax", "ArgMin", "NonZero", "ConstantOfShape", "Range", "Constant", "OneHot", "IsNaN", "IsInf", "Sign",
    "Floor", "Ceil", "Round", "TopK", "EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
})
# Ops passing the gradient through unchanged (eval-mode Dropout, float casts, Identity).
_PASS_THROUGH = frozenset({"Identity", "Dropout"})
_RESHAPES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
# Ops whose result is folded when every input is constant (static_value: Slice bounds).
_FOLDABLE = frozenset({"Identity", "Cast", "Concat", "Reshape", "Squeeze", "Unsqueeze"})


class NoPortableModel(UnsupportedModelError):
    """This graph cannot have a portable training model; the message is the manifest's reason.

    An ``UnsupportedModelError``: the export goes on without the portable backend (the
    bundle then trains with ORT training artifacts only) and records why.

    Example:
        >>> from onnx import helper
        >>> fused = helper.make_node("FusedMatMul", ["x", "w"], ["y"], domain="com.microsoft")
        >>> m = helper.make_model(helper.make_graph([fused], "g", [], []), opset_imports=[helper.make_opsetid("", 17)])
        >>> try:
        ...     build_portable_models(m, [], loss="mse", example_inputs={})
        ... except NoPortableModel as err:
        ...     print(err)
        the model uses non-standard ops ['com.microsoft.FusedMatMul']; the portable model is standard ONNX only
    """


@dataclass
class PortableModels:
    """The gradient and eval models (weights still inline) and facts about them.

    Example:
        >>> import numpy as np
        >>> from onnx import helper, numpy_helper
        >>> inits = [numpy_helper.from_array(np.eye(2, dtype=np.float32), "w"), numpy_helper.from_array(np.zeros(2, np.float32), "b")]
        >>> g = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"])], "g",
        ...     [helper.make_tensor_value_info("x", 1, ["batch", 2])], [helper.make_tensor_value_info("y", 1, ["batch", 2])], inits)
        >>> m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        >>> models = build_portable_models(m, ["b"], loss="mse", example_inputs={"x": np.ones((2, 2), np.float32)})
        >>> [i.name for i in models.eval.graph.input], [o.name for o in models.eval.graph.output], models.stats["opset"]
        (['x', 'labels', 'b'], ['loss', 'y'], 17)
    """

    gradient: onnx.ModelProto
    eval: onnx.ModelProto
    stats: dict = field(default_factory=dict)


def build_portable_models(
    forward: onnx.ModelProto,
    trainable: list[str],
    *,
    loss: LossName,
    example_inputs: Mapping[str, np.ndarray],
    ignore_index: int | None = None,
    output_name: str | None = None,
) -> PortableModels:
    """Differentiate ``forward`` + ``loss`` with respect to ``trainable`` initializers.

    Returns the gradient model (inputs: model inputs, ``labels``, trainable tensors; outputs:
    ``loss``, the model output, ``<name>_grad`` per trainable tensor) and the eval model
    (same inputs; outputs ``loss`` and the model output). Raises :class:`NoPortableModel`
    with the reason where the graph has an op this module cannot differentiate.

    Example:
        >>> build_portable_models(onnx.ModelProto(), [], loss="mse", example_inputs={})
        Traceback (most recent call last):
        ...
        bitfit.export.gradient_graph.NoPortableModel: the model imports no default-domain opset; a portable training model needs opset >= 13
    """
    model = onnx.ModelProto.FromString(forward.SerializeToString())
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset < MIN_OPSET:
        raise NoPortableModel(
            "the model imports no default-domain opset; a portable training model needs opset >= 13" if opset is None else
            f"the model uses opset {opset}; a portable training model needs opset >= {MIN_OPSET} (re-export the source at opset 17)")
    foreign = sorted({f"{n.domain}.{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise NoPortableModel(f"the model uses non-standard ops {foreign[:5]}; the portable model is standard ONNX only")
    freeze_batchnorm_statistics(model)  # inference-mode BatchNorm as elementwise ops on frozen statistics
    output_name = output_name or model.graph.output[0].name
    builder = _GradientBuilder(model, trainable, opset, output_name)
    builder.observe_shapes(example_inputs)
    builder.add_loss(loss, ignore_index)
    eval_model = builder.finish_eval()
    builder.backward()
    gradient_model = builder.finish_gradient()
    stats = {
        "opset": opset, "forward_nodes": builder.forward_nodes, "gradient_nodes": len(gradient_model.graph.node),
        "eval_nodes": len(eval_model.graph.node), "zero_gradient": builder.zero_gradient,
    }
    return PortableModels(gradient_model, eval_model, stats)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class _GradientBuilder:
    """Holds the graph being extended; one method per job (shapes, loss, backward, output)."""

    def __init__(self, model: onnx.ModelProto, trainable: list[str], opset: int, output_name: str) -> None:
        self.model = model
        self.graph = model.graph
        self.opset = opset
        self.output_name = output_name
        self.trainable = list(trainable)
        inits = {i.name: i for i in self.graph.initializer}
        missing = [n for n in trainable if n not in inits]
        if missing:
            raise NoPortableModel(f"trainable tensors {missing[:3]} are not initializers of the forward graph")
        self.trainable_shapes = {n: list(inits[n].dims) for n in trainable}
        self.constants = {i.name: numpy_helper.to_array(i) for i in self.graph.initializer if i.name not in set(trainable)}
        for node in self.graph.node:
            if node.op_type == "Constant" and node.output:
                value = _attrs(node).get("value")
                if value is not None:
                    self.constants[node.output[0]] = numpy_helper.to_array(value)
        self.forward_nodes = len(self.graph.node)
        self.new_nodes: list[onnx.NodeProto] = []
        self.new_inits: list[onnx.TensorProto] = []
        self.counter = 0
        self.shapes: dict[str, list[tuple[int, ...]]] = {}
        self.shape_cache: dict[str, str] = {}
        self.zero_gradient: list[str] = []
        self._ensure_layernorm_stats()

    # ---- small graph-writing helpers -------------------------------------------------
    def name(self, hint: str) -> str:
        self.counter += 1
        return f"bitfit.grad/{hint}.{self.counter}"

    def node(self, op: str, inputs: list[str], hint: str | None = None, outputs: int = 1, **attrs) -> str | list[str]:
        outs = [self.name(hint or op) for _ in range(outputs)]
        self.new_nodes.append(helper.make_node(op, inputs, outs, name=outs[0], **attrs))
        return outs[0] if outputs == 1 else outs

    def const(self, value, dtype=np.float32) -> str:
        name = self.name("const")
        self.new_inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def shape_of(self, value: str) -> str:
        if value not in self.shape_cache:
            self.shape_cache[value] = self.node("Shape", [value], "shape")
        return self.shape_cache[value]

    def rank(self, value: str) -> int:
        if value in self.shapes:
            return len(self.shapes[value][0])
        if value in self.constants:
            return self.constants[value].ndim
        if value in self.trainable_shapes:
            return len(self.trainable_shapes[value])
        raise NoPortableModel(f"cannot tell the rank of {value!r} (it was not observed in the forward run)")

    def dims(self, value: str) -> list[tuple[int, ...]]:
        """The value's shape in each observation run (constants: the same shape twice)."""
        if value in self.shapes:
            return self.shapes[value]
        if value in self.constants:
            return [tuple(self.constants[value].shape)] * 2
        if value in self.trainable_shapes:
            return [tuple(self.trainable_shapes[value])] * 2
        raise NoPortableModel(f"cannot tell the shape of {value!r} (it was not observed in the forward run)")

    def reduce_sum(self, value: str, axes: list[int], keepdims: int) -> str:
        return self.node("ReduceSum", [value, self.const(axes, np.int64)], "reduce_sum", keepdims=keepdims)

    def reduce_mean(self, value: str, axes: list[int], keepdims: int) -> str:
        if self.opset >= 18:
            return self.node("ReduceMean", [value, self.const(axes, np.int64)], "reduce_mean", keepdims=keepdims)
        return self.node("ReduceMean", [value], "reduce_mean", axes=axes, keepdims=keepdims)

    def unbroadcast(self, grad: str, operand: str, result: str) -> str:
        """Sum ``grad`` (shaped like ``result``) down to ``operand``'s shape (numpy broadcasting)."""
        op_runs, res_runs = self.dims(operand), self.dims(result)
        lead = len(res_runs[0]) - len(op_runs[0])
        keep = [i for i in range(len(op_runs[0]))
                if all(o[i] == 1 for o in op_runs) and any(r[lead + i] != 1 for r in res_runs)]
        out = grad
        if lead > 0:
            out = self.reduce_sum(out, list(range(lead)), 0)
        if keep:
            out = self.reduce_sum(out, keep, 1)
        return out

    # ---- shapes -------------------------------------------------------------------------
    def _ensure_layernorm_stats(self) -> None:
        for node in self.graph.node:
            if node.op_type == "LayerNormalization":
                while len(node.output) < 3:
                    node.output.append(f"{node.output[0]}.__{'mean' if len(node.output) == 1 else 'inv_std_dev'}")

    def observe_shapes(self, example_inputs: Mapping[str, np.ndarray]) -> None:
        """Run the forward graph at two batch sizes and record every float value's shape."""
        graph_inputs = [i.name for i in self.graph.input if i.name not in {x.name for x in self.graph.initializer}]
        feeds = {k: np.asarray(example_inputs[k]) for k in graph_inputs if k in example_inputs}
        if len(feeds) != len(graph_inputs):
            raise NoPortableModel(f"no example value for inputs {sorted(set(graph_inputs) - set(feeds))}")
        values = [o for n in self.graph.node if n.op_type != "Constant" for o in n.output if o]
        try:
            self.shapes = observe_output_shapes(self.model, list(dict.fromkeys(values)), feeds)
        except Exception as err:  # noqa: BLE001 - any ORT failure means we cannot observe shapes
            raise NoPortableModel(f"the forward graph did not run at two batch sizes to observe shapes ({err})") from err
        for name, value in feeds.items():
            self.shapes[name] = [value.shape, (value.shape[0] + 1, *value.shape[1:]) if value.ndim else value.shape]

    # ---- loss ----------------------------------------------------------------------------
    def add_loss(self, loss: LossName, ignore_index: int | None) -> None:
        """Append the loss and seed the backward pass with d loss / d output."""
        out = self.output_name
        rank = self.rank(out)
        if loss == "cross-entropy":
            if rank != 2:
                raise NoPortableModel(f"cross-entropy needs [batch, classes] outputs; {out} has rank {rank}")
            value, log_prob = self.node("SoftmaxCrossEntropyLoss", [out, LABEL_INPUT], "ce", outputs=2, reduction="mean")
            depth = self.node("Gather", [self.shape_of(out), self.const(1, np.int64)], "classes")
            onehot = self.node("OneHot", [LABEL_INPUT, depth, self.const([0.0, 1.0])], "onehot", axis=-1)
            rows = self.node("Cast", [self.node("Gather", [self.shape_of(LABEL_INPUT), self.const(0, np.int64)])],
                             "rows", to=onnx.TensorProto.FLOAT)
            seed = self.node("Div", [self.node("Sub", [self.node("Exp", [log_prob]), onehot]), rows], "d_logits")
        elif loss == "token-cross-entropy":
            if rank != 3:
                raise NoPortableModel(f"token-level loss needs [batch, sequence, classes] outputs; {out} has rank {rank}")
            scores = self.node("Transpose", [out], "scores_bcs", perm=[0, 2, 1])
            extra = {} if ignore_index is None else {"ignore_index": int(ignore_index)}
            value, log_prob = self.node("SoftmaxCrossEntropyLoss", [scores, LABEL_INPUT], "token_ce", outputs=2,
                                        reduction="mean", **extra)
            depth = self.node("Gather", [self.shape_of(out), self.const(2, np.int64)], "classes")
            if ignore_index is None:
                mask = self.node("Cast", [self.node("Equal", [LABEL_INPUT, LABEL_INPUT])], "mask", to=onnx.TensorProto.FLOAT)
                safe = LABEL_INPUT
            else:
                keep = self.node("Not", [self.node("Equal", [LABEL_INPUT, self.const(ignore_index, np.int64)])], "keep")
                mask = self.node("Cast", [keep], "mask", to=onnx.TensorProto.FLOAT)
                safe = self.node("Where", [keep, LABEL_INPUT, self.const(0, np.int64)], "safe_labels")
            onehot = self.node("OneHot", [safe, depth, self.const([0.0, 1.0])], "onehot", axis=1)
            # At least 1: a batch whose every label is ignore_index has loss 0 (ORT's loss op)
            # and must get zero gradients, not 0 / 0.
            count = self.node("Max", [self.node("ReduceSum", [mask], "count", keepdims=0), self.const(1.0)], "count")
            diff = self.node("Mul", [self.node("Sub", [self.node("Exp", [log_prob]), onehot]),
                                     self.node("Unsqueeze", [mask, self.const([1], np.int64)])])
            seed = self.node("Transpose", [self.node("Div", [diff, count])], "d_logits", perm=[0, 2, 1])
        elif loss == "mse":
            diff = self.node("Sub", [out, LABEL_INPUT], "diff")
            square = self.node("Mul", [diff, diff], "square")
            value = self.node("ReduceMean", [square], "mse", keepdims=0)  # no axes: every element
            count = self.node("Cast", [self.node("Size", [out])], "count", to=onnx.TensorProto.FLOAT)
            seed = self.node("Div", [self.node("Mul", [diff, self.const(2.0)]), count], "d_output")
        elif loss == "bce-with-logits":
            term = self.node("Sub", [self.node("Relu", [out]), self.node("Mul", [out, LABEL_INPUT])])
            soft = self.node("Softplus", [self.node("Neg", [self.node("Abs", [out])])])
            value = self.node("ReduceMean", [self.node("Add", [term, soft])], "bce", keepdims=0)
            count = self.node("Cast", [self.node("Size", [out])], "count", to=onnx.TensorProto.FLOAT)
            seed = self.node("Div", [self.node("Sub", [self.node("Sigmoid", [out]), LABEL_INPUT]), count], "d_output")
        else:
            raise NoPortableModel(f"unknown loss {loss!r}")
        self.new_nodes.append(helper.make_node("Identity", [value], [LOSS_OUTPUT], name="bitfit.grad/loss"))
        self.loss_value_nodes = len(self.new_nodes)
        self.loss = loss
        self.grads: dict[str, list[str]] = defaultdict(list)
        self.grads[out].append(seed)

    # ---- model assembly --------------------------------------------------------------------
    def _label_input(self) -> onnx.ValueInfoProto:
        out = next(o for o in self.graph.output if o.name == self.output_name)
        dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
        if self.loss == "cross-entropy":
            return helper.make_tensor_value_info(LABEL_INPUT, onnx.TensorProto.INT64, dims[:1])
        if self.loss == "token-cross-entropy":
            return helper.make_tensor_value_info(LABEL_INPUT, onnx.TensorProto.INT64, dims[:2])
        return helper.make_tensor_value_info(LABEL_INPUT, onnx.TensorProto.FLOAT, dims)

    def _assemble(self, nodes: list[onnx.NodeProto], grad_outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
        trainable = set(self.trainable)
        inits = [i for i in self.graph.initializer if i.name not in trainable] + list(self.new_inits)
        init_names = {i.name for i in self.graph.initializer}
        model_inputs = [i for i in self.graph.input if i.name not in init_names]
        inputs = model_inputs + [self._label_input()] + [
            helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, self.trainable_shapes[n]) for n in self.trainable]
        model_output = next(o for o in self.graph.output if o.name == self.output_name)
        outputs = [helper.make_tensor_value_info(LOSS_OUTPUT, onnx.TensorProto.FLOAT, []), model_output, *grad_outputs]
        graph = helper.make_graph(nodes, "bitfit_portable", inputs, outputs, inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)],
                                  producer_name="bitfit", ir_version=min(self.model.ir_version or 8, 10))
        return _prune(model)

    def finish_eval(self) -> onnx.ModelProto:
        return self._assemble(list(self.graph.node) + self.new_nodes[: self.loss_value_nodes], [])

    def finish_gradient(self) -> onnx.ModelProto:
        outputs = []
        for name in self.trainable:
            grad = self.total_grad(name)
            if grad is None:
                self.zero_gradient.append(name)
                grad = self.const(np.zeros(self.trainable_shapes[name], np.float32))
            self.new_nodes.append(helper.make_node("Identity", [grad], [name + GRAD_SUFFIX], name=f"bitfit.grad/out.{name}"))
            outputs.append(helper.make_tensor_value_info(name + GRAD_SUFFIX, onnx.TensorProto.FLOAT, self.trainable_shapes[name]))
        return self._assemble(list(self.graph.node) + self.new_nodes, outputs)

    # ---- backward ----------------------------------------------------------------------------
    def total_grad(self, value: str) -> str | None:
        parts = self.grads.get(value)
        if not parts:
            return None
        if len(parts) > 1:
            total = self.node("Sum", list(parts), "sum_grad")
            self.grads[value] = [total]
        return self.grads[value][0]

    def backward(self) -> None:
        varied = set(self.trainable)
        for node in self.graph.node:
            if node.op_type in _NO_GRADIENT or (node.op_type == "Cast" and not _is_float_cast(node)):
                continue
            if any(i in varied for i in node.input if i):
                varied.update(o for o in node.output if o)
        self.varied = varied
        self.producer = {o: n for n in self.graph.node for o in n.output if o}
        self.consumers: dict[str, int] = defaultdict(int)
        for n in self.graph.node:
            for i in n.input:
                self.consumers[i] += 1
        unsupported: dict[str, int] = defaultdict(int)
        for node in reversed(list(self.graph.node)):
            if not any(self.grads.get(o) for o in node.output if o):
                continue
            if not any(i in varied for i in node.input if i):
                continue
            gelu = self._match_gelu(node)
            if gelu is not None:
                self._grad_gelu_pattern(node, *gelu)
                continue
            rule = getattr(self, f"_grad_{node.op_type}", None)
            if node.op_type in _PASS_THROUGH or (node.op_type == "Cast" and _is_float_cast(node)):
                rule = self._grad_pass_through
            elif node.op_type in _RESHAPES:
                rule = self._grad_reshape
            if rule is None:
                unsupported[node.op_type] += 1
                continue
            rule(node)
        if unsupported:
            listed = ", ".join(f"{op} x{n}" for op, n in sorted(unsupported.items()))
            raise NoPortableModel(f"no portable gradient rule for ops on the training path: {listed}")

    def _constant_near(self, value: str, target: float) -> bool:
        array = self.constants.get(value)
        return array is not None and array.size == 1 and abs(float(array.ravel()[0]) - target) < 1e-4 * abs(target)

    def _match_gelu(self, node: onnx.NodeProto) -> tuple[str, str] | None:
        """``0.5 * x * (1 + erf(x / sqrt(2)))`` as exported by torch: returns (x, 1 + erf) or None.

        Why a rule for the whole pattern: the chain rule over its five nodes costs ~11
        elementwise passes over the widest activation of the model; the closed form
        ``g * (0.5 * (1 + erf) + x * exp(-x^2 / 2) / sqrt(2 pi))`` costs 8.
        """
        if node.op_type != "Mul":
            return None
        half = next((i for i in node.input if self._constant_near(i, 0.5)), None)
        if half is None:
            return None
        inner = self.producer.get(next(i for i in node.input if i != half))
        if inner is None or inner.op_type != "Mul" or self.consumers[inner.output[0]] != 1:
            return None
        for x, one_plus in (inner.input, reversed(inner.input)):
            add = self.producer.get(one_plus)
            if add is None or add.op_type != "Add" or self.consumers[one_plus] != 1:
                continue
            erf_out = next((i for i in add.input if not self._constant_near(i, 1.0)), None)
            if erf_out is None or not any(self._constant_near(i, 1.0) for i in add.input):
                continue
            erf = self.producer.get(erf_out)
            if erf is None or erf.op_type != "Erf" or self.consumers[erf_out] != 1:
                continue
            div = self.producer.get(erf.input[0])
            if div is None or self.consumers[erf.input[0]] != 1 or div.input[0] != x:
                continue
            if (div.op_type == "Div" and self._constant_near(div.input[1], math.sqrt(2))) or (
                    div.op_type == "Mul" and self._constant_near(div.input[1], 1 / math.sqrt(2))):
                return x, one_plus
        return None

    def _grad_gelu_pattern(self, node: onnx.NodeProto, x: str, one_plus_erf: str) -> None:
        gauss = self.node("Exp", [self.node("Mul", [self.node("Mul", [x, x]), self.const(-0.5)])], "gelu_gauss")
        x_pdf = self.node("Mul", [self.node("Mul", [x, gauss]), self.const(1 / math.sqrt(2 * math.pi))])
        deriv = self.node("Add", [self.node("Mul", [one_plus_erf, self.const(0.5)]), x_pdf], "gelu_deriv")
        self.give(x, self.node("Mul", [self._g(node), deriv], "gelu_dx"))

    def give(self, value: str, grad: str) -> None:
        if value and value in self.varied:
            self.grads[value].append(grad)

    def wants(self, value: str) -> bool:
        return bool(value) and value in self.varied

    def _g(self, node: onnx.NodeProto, index: int = 0) -> str | None:
        return self.total_grad(node.output[index]) if index < len(node.output) and node.output[index] else None

    # Elementwise arithmetic ----------------------------------------------------------
    def _grad_pass_through(self, node):
        self.give(node.input[0], self._g(node))

    def _grad_reshape(self, node):
        self.give(node.input[0], self.node("Reshape", [self._g(node), self.shape_of(node.input[0])], "reshape_back"))

    def _grad_Add(self, node):
        g, (a, b), y = self._g(node), node.input, node.output[0]
        if self.wants(a):
            self.give(a, self.unbroadcast(g, a, y))
        if self.wants(b):
            self.give(b, self.unbroadcast(g, b, y))

    def _grad_Sub(self, node):
        g, (a, b), y = self._g(node), node.input, node.output[0]
        if self.wants(a):
            self.give(a, self.unbroadcast(g, a, y))
        if self.wants(b):
            self.give(b, self.unbroadcast(self.node("Neg", [g]), b, y))

    def _grad_Mul(self, node):
        g, (a, b), y = self._g(node), node.input, node.output[0]
        if self.wants(a):
            self.give(a, self.unbroadcast(self.node("Mul", [g, b]), a, y))
        if self.wants(b):
            self.give(b, self.unbroadcast(self.node("Mul", [g, a]), b, y))

    def _grad_Div(self, node):
        g, (a, b), y = self._g(node), node.input, node.output[0]
        if self.wants(a):
            self.give(a, self.unbroadcast(self.node("Div", [g, b]), a, y))
        if self.wants(b):
            self.give(b, self.unbroadcast(self.node("Neg", [self.node("Div", [self.node("Mul", [g, y]), b])]), b, y))

    def _grad_Neg(self, node):
        self.give(node.input[0], self.node("Neg", [self._g(node)]))

    def _grad_Pow(self, node):
        x, e = node.input
        if self.wants(e) or e not in self.constants:
            raise NoPortableModel(f"Pow {node.name} has a non-constant exponent on the training path")
        exponent = self.constants[e].astype(np.float32)
        deriv = self.node("Mul", [self.node("Pow", [x, self.const(exponent - 1)]), self.const(exponent)])
        self.give(x, self.unbroadcast(self.node("Mul", [self._g(node), deriv]), x, node.output[0]))

    def _grad_Sqrt(self, node):
        self.give(node.input[0], self.node("Div", [self.node("Mul", [self._g(node), self.const(0.5)]), node.output[0]]))

    def _grad_Reciprocal(self, node):
        y = node.output[0]
        self.give(node.input[0], self.node("Neg", [self.node("Mul", [self._g(node), self.node("Mul", [y, y])])]))

    def _grad_Exp(self, node):
        self.give(node.input[0], self.node("Mul", [self._g(node), node.output[0]]))

    def _grad_Log(self, node):
        self.give(node.input[0], self.node("Div", [self._g(node), node.input[0]]))

    def _grad_Erf(self, node):
        x = node.input[0]
        gauss = self.node("Exp", [self.node("Neg", [self.node("Mul", [x, x])])])
        self.give(x, self.node("Mul", [self._g(node), self.node("Mul", [gauss, self.const(2.0 / math.sqrt(math.pi))])]))

    def _grad_Tanh(self, node):
        y = node.output[0]
        one_minus = self.node("Sub", [self.const(1.0), self.node("Mul", [y, y])])
        self.give(node.input[0], self.node("Mul", [self._g(node), one_minus]))

    def _grad_Sigmoid(self, node):
        y = node.output[0]
        deriv = self.node("Mul", [y, self.node("Sub", [self.const(1.0), y])])
        self.give(node.input[0], self.node("Mul", [self._g(node), deriv]))

    def _grad_Relu(self, node):
        x = node.input[0]
        self.give(x, self.node("Where", [self.node("Greater", [x, self.const(0.0)]), self._g(node), self.const(0.0)], "relu_grad"))

    def _grad_LeakyRelu(self, node):
        x, g = node.input[0], self._g(node)
        alpha = float(_attrs(node).get("alpha", 0.01))
        self.give(x, self.node("Where", [self.node("Greater", [x, self.const(0.0)]), g, self.node("Mul", [g, self.const(alpha)])]))

    def _grad_Softplus(self, node):
        self.give(node.input[0], self.node("Mul", [self._g(node), self.node("Sigmoid", [node.input[0]])]))

    def _grad_Abs(self, node):
        self.give(node.input[0], self.node("Mul", [self._g(node), self.node("Sign", [node.input[0]])]))

    def _grad_Gelu(self, node):
        if _attrs(node).get("approximate", "none") != "none":
            raise NoPortableModel(f"Gelu {node.name} uses the tanh approximation, which has no portable gradient rule yet")
        x = node.input[0]
        cdf = self.node("Mul", [self.node("Add", [self.node("Erf", [self.node("Mul", [x, self.const(1 / math.sqrt(2))])]),
                                                  self.const(1.0)]), self.const(0.5)])
        pdf = self.node("Mul", [self.node("Exp", [self.node("Mul", [self.node("Mul", [x, x]), self.const(-0.5)])]),
                                self.const(1 / math.sqrt(2 * math.pi))])
        deriv = self.node("Add", [cdf, self.node("Mul", [x, pdf])])
        self.give(x, self.node("Mul", [self._g(node), deriv]))

    def _grad_Where(self, node):
        cond, a, b = node.input
        g, y = self._g(node), node.output[0]
        zero = self.const(0.0)
        if self.wants(a):
            self.give(a, self.unbroadcast(self.node("Where", [cond, g, zero]), a, y))
        if self.wants(b):
            self.give(b, self.unbroadcast(self.node("Where", [cond, zero, g]), b, y))

    def _grad_Expand(self, node):
        self.give(node.input[0], self.unbroadcast(self._g(node), node.input[0], node.output[0]))

    def _grad_Clip(self, node):
        x, g = node.input[0], self._g(node)
        keep = None
        for index, op in ((1, "GreaterOrEqual"), (2, "LessOrEqual")):
            if len(node.input) > index and node.input[index]:
                if self.wants(node.input[index]):
                    raise NoPortableModel(f"Clip {node.name} has a trained bound")
                test = self.node(op, [x, node.input[index]])
                keep = test if keep is None else self.node("And", [keep, test])
        self.give(x, g if keep is None else self.node("Where", [keep, g, self.const(0.0)]))

    # Linear algebra -------------------------------------------------------------------
    def _grad_MatMul(self, node):
        a, b = node.input
        g, y = self._g(node), node.output[0]
        ra, rb = self.rank(a), self.rank(b)
        if ra < 2 or rb < 2:
            raise NoPortableModel(f"MatMul {node.name} has a vector operand; no portable gradient rule for that yet")
        if self.wants(a):
            if rb == 2 and not self.wants(b):
                # dA = dY @ B^T as Gemm(transB=1) over [rows, N]: the weight is read as stored,
                # never transposed into a second copy (constant folding would keep both).
                width = self.dims(b)[0][1]
                flat = self.node("Reshape", [g, self.const([-1, width], np.int64)], "flat_grad")
                ga = self.node("Reshape", [self.node("Gemm", [flat, b], "gemm_dx", transB=1), self.shape_of(a)], "dx")
            else:
                ga = self.unbroadcast(self.node("MatMul", [g, self._swap_last(b, rb)]), a, y)
            self.give(a, ga)
        if self.wants(b):
            self.give(b, self.unbroadcast(self.node("MatMul", [self._swap_last(a, ra), g]), b, y))

    def _swap_last(self, value: str, rank: int) -> str:
        perm = list(range(rank))
        perm[-2], perm[-1] = perm[-1], perm[-2]
        return self.node("Transpose", [value], "swap", perm=perm)

    def _grad_Gemm(self, node):
        a, b = node.input[0], node.input[1]
        c = node.input[2] if len(node.input) > 2 else ""
        at = _attrs(node)
        alpha, beta = float(at.get("alpha", 1.0)), float(at.get("beta", 1.0))
        ta, tb = int(at.get("transA", 0)), int(at.get("transB", 0))
        g, y = self._g(node), node.output[0]
        if self.wants(a):
            if ta == 0:
                ga = self.node("Gemm", [g, b], "gemm_da", alpha=alpha, transB=1 - tb)
            else:
                ga = self.node("Gemm", [b, g], "gemm_da", alpha=alpha, transA=tb, transB=1)
            self.give(a, ga)
        if self.wants(b):
            if tb == 0:
                gb = self.node("Gemm", [a, g], "gemm_db", alpha=alpha, transA=1 - ta)
            else:
                gb = self.node("Gemm", [g, a], "gemm_db", alpha=alpha, transA=1, transB=ta)
            self.give(b, gb)
        if c and self.wants(c):
            scaled = g if beta == 1.0 else self.node("Mul", [g, self.const(beta)])
            self.give(c, self.unbroadcast(scaled, c, y))

    def _grad_Conv(self, node):
        x, w = node.input[0], node.input[1]
        bias = node.input[2] if len(node.input) > 2 else ""
        at = _attrs(node)
        g, y = self._g(node), node.output[0]
        if self.wants(w):
            raise NoPortableModel(f"Conv {node.name}: a trainable convolution weight has no portable gradient rule")
        if bias and self.wants(bias):
            self.give(bias, self.reduce_sum(g, [0] + list(range(2, self.rank(y))), 0))
        if not self.wants(x):
            return
        if at.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
            raise NoPortableModel(f"Conv {node.name} uses auto_pad SAME; no portable gradient rule for that yet")
        kernel = list(self.dims(w)[0][2:])
        spatial = len(kernel)
        strides = list(at.get("strides", [1] * spatial))
        dilations = list(at.get("dilations", [1] * spatial))
        pads = list(at.get("pads", [0] * 2 * spatial))
        in_dims, out_dims = self.dims(x)[0][2:], self.dims(y)[0][2:]
        output_padding = [in_dims[i] - ((out_dims[i] - 1) * strides[i] - pads[i] - pads[i + spatial]
                                         + dilations[i] * (kernel[i] - 1) + 1) for i in range(spatial)]
        if any(p < 0 or p >= max(strides[i], dilations[i]) for i, p in enumerate(output_padding)):
            raise NoPortableModel(f"Conv {node.name}: cannot express its input gradient as a ConvTranspose")
        self.give(x, self.node("ConvTranspose", [g, w], "conv_dx", strides=strides, dilations=dilations, pads=pads,
                               group=int(at.get("group", 1)), kernel_shape=kernel, output_padding=output_padding))

    # Normalisation and reductions -------------------------------------------------------
    def _grad_LayerNormalization(self, node):
        x, scale = node.input[0], node.input[1]
        bias = node.input[2] if len(node.input) > 2 else ""
        g, y = self._g(node), node.output[0]
        rank = self.rank(x)
        axis = int(_attrs(node).get("axis", -1)) % rank
        norm_axes = list(range(axis, rank))
        if bias and self.wants(bias):
            self.give(bias, self.unbroadcast(g, bias, y))
        if not (self.wants(x) or self.wants(scale)):
            return
        mean, inv_std = node.output[1], node.output[2]
        xhat = self.node("Mul", [self.node("Sub", [x, mean]), inv_std], "xhat")
        if self.wants(scale):
            self.give(scale, self.unbroadcast(self.node("Mul", [g, xhat]), scale, y))
        if self.wants(x):
            gx_hat = self.node("Mul", [g, scale], "dxhat")
            m1 = self.reduce_mean(gx_hat, norm_axes, 1)
            m2 = self.reduce_mean(self.node("Mul", [gx_hat, xhat]), norm_axes, 1)
            centred = self.node("Sub", [self.node("Sub", [gx_hat, m1]), self.node("Mul", [xhat, m2])])
            self.give(x, self.node("Mul", [centred, inv_std], "ln_dx"))

    def _grad_Softmax(self, node):
        y, g = node.output[0], self._g(node)
        axis = int(_attrs(node).get("axis", -1))
        dot = self.reduce_sum(self.node("Mul", [g, y]), [axis], 1)
        self.give(node.input[0], self.node("Mul", [y, self.node("Sub", [g, dot])], "softmax_dx"))

    def _grad_LogSoftmax(self, node):
        y, g = node.output[0], self._g(node)
        axis = int(_attrs(node).get("axis", -1))
        total = self.reduce_sum(g, [axis], 1)
        self.give(node.input[0], self.node("Sub", [g, self.node("Mul", [self.node("Exp", [y]), total])]))

    def _reduce_axes(self, node) -> list[int] | None:
        at = _attrs(node)
        if "axes" in at:
            return list(at["axes"])
        if len(node.input) > 1 and node.input[1]:
            if node.input[1] not in self.constants:
                raise NoPortableModel(f"{node.op_type} {node.name} has data-dependent axes")
            return [int(a) for a in self.constants[node.input[1]].ravel()]
        return None

    def _spread(self, node) -> str:
        """The output gradient broadcast back over the reduced input's shape."""
        x, g = node.input[0], self._g(node)
        axes = self._reduce_axes(node)
        rank = self.rank(x)
        if axes is None or len(axes) == 0:
            noop = int(_attrs(node).get("noop_with_empty_axes", 0))
            if axes is not None and noop:
                return g
            axes = list(range(rank))
        if not int(_attrs(node).get("keepdims", 1)):
            g = self.node("Unsqueeze", [g, self.const(sorted(a % rank for a in axes), np.int64)], "unsqueeze_grad")
        return self.node("Expand", [g, self.shape_of(x)], "spread")

    def _count_ratio(self, node) -> str:
        sizes = [self.node("Cast", [self.node("Size", [v])], to=onnx.TensorProto.FLOAT) for v in (node.input[0], node.output[0])]
        return self.node("Div", sizes, "reduced_count")

    def _grad_ReduceSum(self, node):
        self.give(node.input[0], self._spread(node))

    def _grad_ReduceMean(self, node):
        self.give(node.input[0], self.node("Div", [self._spread(node), self._count_ratio(node)], "mean_grad"))

    def _grad_GlobalAveragePool(self, node):
        g = self.node("Expand", [self._g(node), self.shape_of(node.input[0])], "spread")
        self.give(node.input[0], self.node("Div", [g, self._count_ratio(node)], "pool_grad"))

    # Data movement ------------------------------------------------------------------------
    def _grad_Transpose(self, node):
        perm = _attrs(node).get("perm")
        rank = self.rank(node.input[0])
        perm = list(perm) if perm is not None else list(reversed(range(rank)))
        inverse = [perm.index(i) for i in range(rank)]
        self.give(node.input[0], self.node("Transpose", [self._g(node)], "transpose_back", perm=inverse))

    def _grad_Concat(self, node):
        axis = int(_attrs(node)["axis"])
        rank = self.rank(node.output[0])
        axis %= rank
        sizes = [self.node("Slice", [self.shape_of(x), self.const([axis], np.int64), self.const([axis + 1], np.int64)])
                 for x in node.input]
        parts = self.node("Split", [self._g(node), self.node("Concat", sizes, "split_sizes", axis=0)], "concat_back",
                          outputs=len(node.input), axis=axis)
        for x, part in zip(node.input, parts if isinstance(parts, list) else [parts]):
            if self.wants(x):
                self.give(x, part)

    def _grad_Split(self, node):
        axis = int(_attrs(node).get("axis", 0))
        pieces = []
        for index, out in enumerate(node.output):
            grad = self._g(node, index)
            pieces.append(grad if grad is not None else self.node("ConstantOfShape", [self.shape_of(out)], "zeros"))
        self.give(node.input[0], self.node("Concat", pieces, "split_back", axis=axis))

    def _grad_Slice(self, node):
        """The input gradient of a unit-step Slice: the output gradient padded with zeros
        before each sliced range (its clamped start) and after it (what the gradient's own
        length leaves), so the ends are never needed."""
        data, g = node.input[0], self._g(node)
        optional = [i for i in (3, 4) if len(node.input) > i and node.input[i]]
        if any(self.static_value(node.input[i]) is None for i in [1, *optional]):
            self._grad_Slice_runtime(node)
            return
        rank = self.rank(data)
        starts = [int(v) for v in self.static_value(node.input[1]).ravel()]
        axes = [int(v) for v in self.static_value(node.input[3]).ravel()] if 3 in optional else list(range(len(starts)))
        steps = [int(v) for v in self.static_value(node.input[4]).ravel()] if 4 in optional else [1] * len(starts)
        if any(s != 1 for s in steps):
            raise NoPortableModel(f"Slice {node.name} has a step other than 1 on the training path")
        shape, grad_shape = self.shape_of(data), self.shape_of(g)
        zero = self.const([0], np.int64)
        begins, ends = [zero] * rank, [zero] * rank
        for start, axis in zip(starts, axes):
            axis %= rank
            dim = self.node("Slice", [shape, self.const([axis], np.int64), self.const([axis + 1], np.int64)])
            if start >= 0:
                begin = self.node("Min", [self.const([start], np.int64), dim])
            else:
                begin = self.node("Max", [self.node("Add", [dim, self.const([start], np.int64)]), zero])
            length = self.node("Slice", [grad_shape, self.const([axis], np.int64), self.const([axis + 1], np.int64)])
            begins[axis] = begin
            ends[axis] = self.node("Sub", [self.node("Sub", [dim, begin]), length])
        pads = self.node("Concat", begins + ends, "pads", axis=0)
        self.give(data, self.node("Pad", [g, pads], "slice_back"))

    def _grad_Slice_runtime(self, node):
        """The same Pad where starts (or axes) are computed at run time, e.g. Llama's
        ``rotate_half`` (``x[..., x.shape[-1] // 2:]``: starts from Shape / Div).

        Each start is clamped as ONNX Slice does for a positive step (negative: + dim; then
        into [0, dim]) on the graph itself, and the per-axis pads are scattered into a
        zero vector of length 2 * rank at the (normalised) axes.
        """
        data, g = node.input[0], self._g(node)
        if len(node.input) > 4 and node.input[4]:
            steps = self.static_value(node.input[4])
            if steps is None:
                raise NoPortableModel(f"Slice {node.name} has steps computed at run time on the training path; "
                                      "its gradient rule needs constant steps of 1")
            if any(int(s) != 1 for s in steps.ravel()):
                raise NoPortableModel(f"Slice {node.name} has a step other than 1 on the training path")
        rank = self.rank(data)
        int64 = onnx.TensorProto.INT64
        zero = self.const(0, np.int64)
        starts = self.node("Cast", [node.input[1]], "slice_starts", to=int64)
        if len(node.input) > 3 and node.input[3]:
            axes = self.node("Cast", [node.input[3]], "slice_axes", to=int64)
            axes = self.node("Where", [self.node("Less", [axes, zero]), self.node("Add", [axes, self.const(rank, np.int64)]), axes])
        else:
            axes = self.node("Range", [zero, self.node("Squeeze", [self.node("Shape", [starts])]), self.const(1, np.int64)],
                             "slice_axes")
        dims = self.node("Gather", [self.shape_of(data), axes], "slice_dims")
        begins = self.node("Where", [self.node("Less", [starts, zero]), self.node("Add", [starts, dims]), starts])
        begins = self.node("Min", [self.node("Max", [begins, zero]), dims], "slice_begins")
        lengths = self.node("Gather", [self.shape_of(g), axes], "slice_lengths")
        after = self.node("Sub", [self.node("Sub", [dims, begins]), lengths], "slice_after")
        pads = self.const([0] * (2 * rank), np.int64)
        pads = self.node("ScatterElements", [pads, axes, begins], "pads_before", axis=0)
        pads = self.node("ScatterElements", [pads, self.node("Add", [axes, self.const(rank, np.int64)]), after], "pads", axis=0)
        self.give(data, self.node("Pad", [g, pads], "slice_back"))

    def static_value(self, value: str) -> np.ndarray | None:
        """The value of a constant, or of a small integer expression over constants (the
        TorchScript exporter writes Slice's ``steps`` as ``Unsqueeze(Constant 1)``); None
        where it depends on the inputs."""
        if value in self.constants:
            return self.constants[value]
        node = self.producer.get(value) if hasattr(self, "producer") else None
        if node is None or node.op_type not in _FOLDABLE or len(node.output) != 1:
            return None
        args = [self.static_value(i) if i else None for i in node.input]
        if any(a is None for i, a in zip(node.input, args) if i):
            return None
        at = _attrs(node)
        if node.op_type == "Identity":
            out = args[0]
        elif node.op_type == "Cast":
            out = args[0].astype(helper.tensor_dtype_to_np_dtype(int(at["to"])))
        elif node.op_type == "Concat":
            out = np.concatenate([np.atleast_1d(a) for a in args], axis=int(at["axis"]))
        elif node.op_type == "Reshape":
            out = args[0].reshape([d if d else args[0].shape[i] for i, d in enumerate(args[1].tolist())])
        else:  # Unsqueeze / Squeeze: axes as an input (opset 13+) or an attribute
            axes = [int(a) for a in (args[1].ravel() if len(args) > 1 and args[1] is not None else at.get("axes", []))]
            if node.op_type == "Unsqueeze":
                out = args[0]
                for axis in sorted(a % (args[0].ndim + len(axes)) for a in axes):
                    out = np.expand_dims(out, axis)
            else:
                out = np.squeeze(args[0], axis=tuple(axes) if axes else None)
        self.constants[value] = np.asarray(out)
        return self.constants[value]

    def _grad_Gather(self, node):
        data, indices = node.input
        if not self.wants(data):
            return
        if self.opset < 16:
            raise NoPortableModel(f"Gather {node.name} on the training path needs opset >= 16 (ScatterND with reduction)")
        g = self._g(node)
        rank = self.rank(data)
        axis = int(_attrs(node).get("axis", 0)) % rank
        # ScatterElements on the gathered axis, no transposes (ORT's transpose optimizer
        # mis-rewrote a ScatterND built from transposes): flatten the index axes of the
        # gradient into one, broadcast the indices over it, and add into zeros.
        shape = self.shape_of(data)
        dim = self.node("Gather", [shape, self.const(axis, np.int64)], "gather_dim")  # a scalar: keeps idx's rank
        idx = self.node("Cast", [indices], to=onnx.TensorProto.INT64)
        idx = self.node("Where", [self.node("Less", [idx, self.const(0, np.int64)]), self.node("Add", [idx, dim]), idx])
        pieces = []
        if axis:
            pieces.append(self.node("Slice", [shape, self.const([0], np.int64), self.const([axis], np.int64)]))
        pieces.append(self.const([-1], np.int64))
        if axis + 1 < rank:
            pieces.append(self.node("Slice", [shape, self.const([axis + 1], np.int64), self.const([rank], np.int64)]))
        flat_grad = self.node("Reshape", [g, self.node("Concat", pieces, axis=0)], "gather_grad_flat")
        column = [1] * rank
        column[axis] = -1
        spread = self.node("Expand", [self.node("Reshape", [idx, self.const(column, np.int64)]), self.shape_of(flat_grad)])
        zeros = self.node("ConstantOfShape", [shape], "zeros")
        self.give(data, self.node("ScatterElements", [zeros, spread, flat_grad], "gather_back", axis=axis, reduction="add"))


def _is_float_cast(node: onnx.NodeProto) -> bool:
    return int(_attrs(node).get("to", 0)) in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)


def _prune(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop nodes and initializers no output depends on (e.g. the forward's LayerNorm stats
    in the eval model, the forward graph's unused constants)."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)  # subgraphs are refused upstream: nothing else to follow
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    return model


__all__ = ["build_portable_models", "PortableModels", "NoPortableModel", "GRADIENT_FILE", "EVAL_FILE", "GRAD_SUFFIX"]
