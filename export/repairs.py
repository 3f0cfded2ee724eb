"""Graph repairs for the known onnxruntime-training 1.19.2 pitfalls, each with its reason.

Each repair returns what it changed, so the export can log and record it. What cannot
be repaired is refused with UnsupportedModelError.

Example:
    >>> from onnx import helper
    >>> node = helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], name="ln")
    >>> g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [1, 4])],
    ...                       [helper.make_tensor_value_info("y", 1, [1, 4])])
    >>> m = helper.make_model(g)
    >>> add_layernorm_stat_outputs(m)
    ['ln']
    >>> list(m.graph.node[0].output)
    ['y', 'ln.__mean', 'ln.__inv_std_dev']
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bitfit.sdk.errors import UnsupportedModelError

log = logging.getLogger("bitfit.export")

MAX_IR_VERSION = 10  # ORT 1.19.2 rejects newer ("Unsupported model IR version: 14"), pitfall 3
# Ops with no gradient in ORT's gradient builder (pitfalls 5 and 7) or that make the graph
# data-dependent in ways the training graph builder refuses.
NO_GRADIENT_OPS = frozenset({
    "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv",
    "SequenceAt", "SplitToSequence", "ConcatFromSequence", "SequenceConstruct", "Loop", "Scan", "If",
})


def ensure_named_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name (repairs and error messages refer to nodes by name).

    Example:
        >>> from onnx import helper
        >>> nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"], name="act"),
        ...          helper.make_node("Relu", ["b"], ["c"], name="act")]
        >>> m = helper.make_model(helper.make_graph(nodes, "g", [], []))
        >>> ensure_named_nodes(m)
        >>> [n.name for n in m.graph.node]
        ['Relu_0', 'act', 'Relu_2']
    """
    seen: set[str] = set()
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{index}"
        seen.add(node.name)


def add_layernorm_stat_outputs(model: onnx.ModelProto) -> list[str]:
    """Add the optional Mean / InvStdDev outputs to LayerNormalization nodes.

    Why: ORT's LayerNorm gradient reads them and both torch exporters omit them ->
    ``GradientBuilderBase::O ... i < node_->OutputDefs().size() was false``
    (ORT issues #19427, #19038; pitfall 1).

    Example:
        >>> from onnx import helper
        >>> ln = helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], name="ln")
        >>> m = helper.make_model(helper.make_graph([ln], "g", [], []))
        >>> add_layernorm_stat_outputs(m), list(m.graph.node[0].output)
        (['ln'], ['y', 'ln.__mean', 'ln.__inv_std_dev'])
    """
    changed = []
    for node in model.graph.node:
        if node.op_type == "LayerNormalization" and len(node.output) < 3:
            base = node.name or node.output[0]
            while len(node.output) < 3:
                node.output.append(f"{base}.__mean" if len(node.output) == 1 else f"{base}.__inv_std_dev")
            changed.append(base)
    return changed


def add_dropout_mask_outputs(model: onnx.ModelProto) -> list[str]:
    """Give every Dropout its optional mask output (its gradient reads it; pitfall 2).

    Example:
        >>> from onnx import helper
        >>> m = helper.make_model(helper.make_graph([helper.make_node("Dropout", ["x"], ["y"], name="drop")], "g", [], []))
        >>> add_dropout_mask_outputs(m), list(m.graph.node[0].output)
        (['drop'], ['y', 'drop.__mask'])
    """
    changed = []
    for node in model.graph.node:
        if node.op_type == "Dropout" and len(node.output) < 2:
            node.output.append(f"{node.name or node.output[0]}.__mask")
            changed.append(node.name)
    return changed


def freeze_batchnorm_statistics(model: onnx.ModelProto) -> list[str]:
    """Rewrite inference-mode BatchNormalization as elementwise ops on its frozen statistics.

    Why: ORT's training graph builder replaces every BatchNormalization with
    BatchNormInternal in training mode, which normalises with the batch's statistics and
    writes new running mean/var into the frozen tensors, so training would not match
    inference and frozen tensors would change. As ``(x - mean) * (scale / sqrt(var + eps))
    + bias`` the statistics stay frozen and the bias stays its own trainable initializer.
    Constants are Constant nodes, not initializers: every initializer must be a base weight.

    Example:
        >>> import numpy as np
        >>> from onnx import helper, numpy_helper
        >>> from bitfit.sdk.runtime import ort
        >>> stats = [numpy_helper.from_array(np.array(v, np.float32), n)
        ...          for n, v in (("s", [2.0]), ("b", [0.5]), ("mean", [1.0]), ("var", [4.0]))]
        >>> bn = helper.make_node("BatchNormalization", ["x", "s", "b", "mean", "var"], ["y"], name="bn", epsilon=0.0)
        >>> g = helper.make_graph([bn], "g", [helper.make_tensor_value_info("x", 1, [1, 1, 2])],
        ...                       [helper.make_tensor_value_info("y", 1, [1, 1, 2])], stats)
        >>> m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        >>> freeze_batchnorm_statistics(m), "BatchNormalization" in {n.op_type for n in m.graph.node}
        (['bn'], False)
        >>> x = np.array([[[3.0, -1.0]]], np.float32)                 # (x - 1) * 2 / sqrt(4) + 0.5
        >>> ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0].tolist()
        [[[2.5, -1.5]]]
    """
    changed: list[str] = []
    rewritten: list[onnx.NodeProto] = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "BatchNormalization" or attrs.get("training_mode", 0) or len(node.output) != 1:
            rewritten.append(node)
            continue
        x, scale, bias, mean, var = node.input
        p = f"{node.name}.__frozen"

        def const(name: str, value: np.ndarray) -> onnx.NodeProto:
            return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name), name=name)

        rewritten += [
            const(f"{p}.eps", np.array(attrs.get("epsilon", 1e-5), np.float32)),
            const(f"{p}.two", np.array([2], np.int64)),
            const(f"{p}.minus_one", np.array([-1], np.int64)),
            # Per-channel values broadcast as [C, 1, ..., 1] against [N, C, ...] of any rank.
            helper.make_node("Shape", [x], [f"{p}.shape"], name=f"{p}.shape"),
            helper.make_node("Shape", [f"{p}.shape"], [f"{p}.rank"], name=f"{p}.rank"),
            helper.make_node("Sub", [f"{p}.rank", f"{p}.two"], [f"{p}.spatial"], name=f"{p}.spatial"),
            helper.make_node("ConstantOfShape", [f"{p}.spatial"], [f"{p}.ones"], name=f"{p}.ones",
                             value=numpy_helper.from_array(np.array([1], np.int64))),
            helper.make_node("Concat", [f"{p}.minus_one", f"{p}.ones"], [f"{p}.channel_shape"], axis=0,
                             name=f"{p}.channel_shape"),
            helper.make_node("Add", [var, f"{p}.eps"], [f"{p}.var_eps"], name=f"{p}.var_eps"),
            helper.make_node("Sqrt", [f"{p}.var_eps"], [f"{p}.std"], name=f"{p}.std"),
            helper.make_node("Div", [scale, f"{p}.std"], [f"{p}.k"], name=f"{p}.k"),
            helper.make_node("Reshape", [f"{p}.k", f"{p}.channel_shape"], [f"{p}.k_c"], name=f"{p}.k_c"),
            helper.make_node("Reshape", [mean, f"{p}.channel_shape"], [f"{p}.mean_c"], name=f"{p}.mean_c"),
            helper.make_node("Reshape", [bias, f"{p}.channel_shape"], [f"{p}.bias_c"], name=f"{p}.bias_c"),
            helper.make_node("Sub", [x, f"{p}.mean_c"], [f"{p}.centered"], name=f"{p}.centered"),
            helper.make_node("Mul", [f"{p}.centered", f"{p}.k_c"], [f"{p}.scaled"], name=f"{p}.scaled"),
            helper.make_node("Add", [f"{p}.scaled", f"{p}.bias_c"], [node.output[0]], name=f"{p}.add_bias"),
        ]
        changed.append(node.name)
    if changed:
        del model.graph.node[:]
        model.graph.node.extend(rewritten)
    return changed


def cap_ir_version(model: onnx.ModelProto) -> bool:
    """Lower the IR version to what ORT 1.19.2 loads; returns whether it changed.

    Example:
        >>> import onnx
        >>> m = onnx.ModelProto(ir_version=11)
        >>> cap_ir_version(m), m.ir_version, cap_ir_version(m)
        (True, 10, False)
    """
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
        return True
    return False


def split_shared_biases(model: onnx.ModelProto, trainable: list[str], bias_uses: dict[str, list]) -> dict[str, list[str]]:
    """Give every use of a shared trainable bias its own initializer.

    Why: exporters de-duplicate initializers with equal values (zero-initialised biases),
    so one tensor feeds several layers; ORT then fails with ``Duplicate definition of
    name (..._grad)`` and the layers could not learn separate biases anyway (pitfall 4).
    The first bias use keeps the name; each other bias use gets ``<name>.__copyN``; a
    non-bias use keeps reading the original (frozen if it is not trainable elsewhere).
    Returns {original: [copies]}.

    Example:
        >>> import numpy as np
        >>> from onnx import helper, numpy_helper
        >>> b = numpy_helper.from_array(np.zeros(2, np.float32), "b")
        >>> nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc1"),
        ...          helper.make_node("Gemm", ["h", "w", "b"], ["y"], name="fc2")]
        >>> m = helper.make_model(helper.make_graph(nodes, "g", [], [], [b]))
        >>> from bitfit.export.biases import bias_uses_by_name, find_biases
        >>> split_shared_biases(m, ["b"], bias_uses_by_name(find_biases(m)))
        {'b': ['b.__copy1']}
        >>> [n.input[2] for n in m.graph.node]
        ['b', 'b.__copy1']
    """
    inits = {i.name: i for i in model.graph.initializer}
    by_node = {n.name: n for n in model.graph.node}
    refs: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            refs[name] = refs.get(name, 0) + 1
    created: dict[str, list[str]] = {}
    for name in trainable:
        uses = bias_uses.get(name, [])
        if refs.get(name, 0) <= 1 or not uses:
            continue
        non_bias_refs = refs[name] - len(uses)
        if non_bias_refs > 0:
            raise UnsupportedModelError(
                f"bias {name} is also used as a non-bias input elsewhere in the graph; bitfit cannot train it "
                "without changing that other use. Exclude it with exclude=[...] or export the model without merging."
            )
        value = numpy_helper.to_array(inits[name])
        for k, use in enumerate(uses[1:], start=1):
            copy = f"{name}.__copy{k}"
            model.graph.initializer.append(numpy_helper.from_array(value.copy(), copy))
            node = by_node[use.node]
            node.input[use.input_index] = copy
            created.setdefault(name, []).append(copy)
        log.info("split shared bias %s into %d tensors", name, len(uses))
    return created


def refuse_unsupported(model: onnx.ModelProto) -> None:
    """Refuse graphs bitfit cannot train, saying which ops and what to do instead.

    Example:
        >>> from onnx import helper
        >>> m = helper.make_model(helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "g", [], []))
        >>> refuse_unsupported(m)
        Traceback (most recent call last):
        ...
        bitfit.sdk.errors.UnsupportedModelError: the graph uses MatMulInteger, which ONNX Runtime training cannot differentiate. ...
    """
    bad = sorted({n.op_type for n in model.graph.node if n.op_type in NO_GRADIENT_OPS})
    if bad:
        raise UnsupportedModelError(
            f"the graph uses {', '.join(bad)}, which ONNX Runtime training cannot differentiate. "
            "Export the float model (no dynamic quantization; weight-only QDQ is fine), with the TorchScript "
            "exporter (dynamo=False) so torch.split does not become sequence ops, and without control flow."
        )
    odd = sorted({i.name for i in model.graph.initializer
                  if i.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)})
    if odd:
        raise UnsupportedModelError(
            f"initializers {odd[:3]}{'...' if len(odd) > 3 else ''} are not float32; bitfit trains float32 "
            "models on device. Export the model in float32."
        )


def repair_for_training(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Apply every in-place repair the training graph needs; returns what changed.

    Example:
        >>> import onnx
        >>> from onnx import helper
        >>> m = helper.make_model(helper.make_graph([helper.make_node("Dropout", ["x"], ["y"])], "g", [], []))
        >>> m.ir_version = 11
        >>> repair_for_training(m)
        {'layernorm_stat_outputs': [], 'dropout_mask_outputs': ['Dropout_0'], 'batchnorm_frozen_statistics': [], 'ir_version_capped': ['10']}
    """
    refuse_unsupported(model)
    ensure_named_nodes(model)
    report = {
        "layernorm_stat_outputs": add_layernorm_stat_outputs(model),
        "dropout_mask_outputs": add_dropout_mask_outputs(model),
        "batchnorm_frozen_statistics": freeze_batchnorm_statistics(model),
    }
    if cap_ir_version(model):
        report["ir_version_capped"] = [str(MAX_IR_VERSION)]
    for key, changed in report.items():
        if changed:
            log.info("repair %s: %d node(s)", key, len(changed))
    return report
