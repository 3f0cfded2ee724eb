"""The bundle's inference model: trainable tensors become overridable inputs (so a
user's delta is fed at run time with no session rebuild) and, where the graph allows,
per-row inputs (``[rows, d]``) so each row of one batch can carry its own user's bias.

The weights are written once, to ``weights.safetensors``; the inference model reads
them as ONNX external data (a safetensors payload is raw little-endian bytes, exactly
what external data is), and the device trainer reads the same file.

Example:
    >>> from bitfit.export.inference_graph import ROWS_DIM
    >>> ROWS_DIM
    'rows'
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from safetensors.numpy import save_file

from .biases import BiasUse

ROWS_DIM = "rows"
WEIGHTS_FILE = "weights.safetensors"
INFERENCE_FILE = "inference.onnx"


@dataclass(frozen=True)
class InferencePlan:
    """Whether the inference model takes per-row biases, the shape each trainable tensor is
    fed with (``[1, d]`` per row, else its own), and why not when it cannot.

    Example:
        >>> plan = InferencePlan(False, {"h.bias": [8]}, "h.bias is not used exactly once as a bias")
        >>> plan.per_row, plan.reason
        (False, 'h.bias is not used exactly once as a bias')
    """

    per_row: bool
    inference_shapes: dict[str, list[int]]
    reason: str


def observe_output_shapes(model: onnx.ModelProto, names: list[str], feeds: dict[str, np.ndarray]) -> dict[str, list[tuple[int, ...]]]:
    """Run the graph at two batch sizes and record the shapes of ``names`` in each run.

    Why not ONNX shape inference: it loses the batch symbol through Gather/Shape/Reshape
    chains (BERT's embeddings), so it cannot prove what a run shows directly.

    Example:
        >>> from onnx import helper
        >>> g = helper.make_graph([helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "g",
        ...     [helper.make_tensor_value_info("x", 1, ["batch", 3])], [helper.make_tensor_value_info("y", 1, ["batch", 3])])
        >>> m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        >>> observe_output_shapes(m, ["h"], {"x": np.zeros((2, 3), np.float32)})   # batch 2, then 3
        {'h': [(2, 3), (3, 3)]}
    """
    from bitfit.sdk.runtime import ort

    probe = onnx.ModelProto.FromString(model.SerializeToString())
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names if n not in known)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # shapes only: no rewrites needed
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    wanted = list(names)
    bigger = {k: np.concatenate([v, v[:1]], axis=0) if v.ndim else v for k, v in feeds.items()}
    runs = [session.run(wanted, feeds), session.run(wanted, bigger)]
    return {n: [tuple(run[i].shape) for run in runs] for i, n in enumerate(wanted)}


def plan_per_row(model: onnx.ModelProto, trainable: list[str], uses: dict[str, list[BiasUse]],
                 feeds: dict[str, np.ndarray]) -> tuple[InferencePlan, dict[str, int]]:
    """Decide whether every trainable tensor can take a per-row ``[rows, d]`` value.

    It can when each is a 1-D bias used once, and the output it is added to has the
    batch dimension first (seen at two batch sizes). A graph that folds batch into
    another axis (e.g. GPT-2's ``addmm`` over ``[batch*seq, d]``) cannot. Returns the
    plan and the rank of each bias's output.

    Example:
        >>> from onnx import helper, numpy_helper
        >>> from bitfit.export.biases import bias_uses_by_name, find_biases
        >>> inits = [numpy_helper.from_array(np.eye(3, dtype=np.float32), "w"), numpy_helper.from_array(np.zeros(3, np.float32), "b")]
        >>> g = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc")], "g",
        ...     [helper.make_tensor_value_info("x", 1, ["batch", 3])], [helper.make_tensor_value_info("y", 1, ["batch", 3])], inits)
        >>> m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        >>> plan, ranks = plan_per_row(m, ["b"], bias_uses_by_name(find_biases(m)), {"x": np.zeros((2, 3), np.float32)})
        >>> plan.per_row, plan.inference_shapes, ranks
        (True, {'b': [1, 3]}, {'b': 2})
    """
    inits = {i.name: i for i in model.graph.initializer}
    plain = {n: list(inits[n].dims) for n in trainable}
    nodes = {n.name: n for n in model.graph.node}
    for name in trainable:
        if len(inits[name].dims) != 1:
            return InferencePlan(False, plain, f"{name} is not a 1-D bias"), {}
        if len(uses.get(name, [])) != 1:
            return InferencePlan(False, plain, f"{name} is not used exactly once as a bias"), {}
    if not feeds:
        return InferencePlan(False, plain, "no example inputs to observe shapes with"), {}
    batch = next(iter(feeds.values())).shape[0]
    outputs = {name: nodes[uses[name][0].node].output[0] for name in trainable}
    try:
        shapes = observe_output_shapes(model, sorted(set(outputs.values())), feeds)
    except Exception as err:  # the graph may not accept a larger batch
        return InferencePlan(False, plain, f"the graph did not run at batch {batch + 1}: {err}"), {}
    ranks = {}
    for name, out in outputs.items():
        (small, big), width = shapes[out], inits[name].dims[0]
        op = nodes[uses[name][0].node].op_type
        axis = len(small) - 1 if op in ("Add", "LayerNormalization", "Gemm") else 1
        if small[0] != batch or big[0] != batch + 1:
            return InferencePlan(False, plain, f"the output of {uses[name][0].node} does not have the batch dimension first"), {}
        if len(small) < 2 or small[axis] != width:
            return InferencePlan(False, plain, f"{name} is not added along axis {axis} of its output"), {}
        ranks[name] = len(small)
    return InferencePlan(True, {n: [1, *plain[n]] for n in trainable}, ""), ranks


def _rewrite_per_row(model: onnx.ModelProto, trainable: list[str], uses: dict[str, list[BiasUse]], ranks: dict[str, int]) -> None:
    nodes = {n.name: n for n in model.graph.node}
    inits = {i.name: i for i in model.graph.initializer}
    new_nodes: dict[str, list[onnx.NodeProto]] = {}
    for name in trainable:
        use = uses[name][0]
        node = nodes[use.node]
        rank = ranks[name]
        init = inits[name]
        width = int(init.dims[0])
        init.dims[:] = [1, width]
        if node.op_type == "Gemm":
            continue  # Gemm's C broadcasts [rows, N] against [M, N] natively
        channel_axis = node.op_type != "Add" and node.op_type != "LayerNormalization"
        axes = list(range(2, rank)) if channel_axis else list(range(1, rank - 1))
        bias_value = name
        extra: list[onnx.NodeProto] = []
        if axes:
            axes_name = f"{name}.__rows_axes"
            model.graph.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), axes_name))
            bias_value = f"{name}.__rows"
            extra.append(helper.make_node("Unsqueeze", [name, axes_name], [bias_value], name=f"{name}.__unsqueeze"))
        if node.op_type == "Add":
            node.input[use.input_index] = bias_value
            new_nodes[node.name] = extra
            continue
        # LayerNorm / Conv / BatchNorm / InstanceNorm: run the op without its bias and add
        # the per-row bias to its output (the same value, since the bias is added last).
        if node.op_type in ("BatchNormalization", "InstanceNormalization"):
            zero = f"{name}.__zero"
            # A Constant node, not an initializer: every float initializer is a base weight.
            extra.append(helper.make_node("Constant", [], [zero], value=numpy_helper.from_array(np.zeros(width, np.float32), zero),
                                          name=zero))
            node.input[use.input_index] = zero
        else:
            node.input[use.input_index] = ""
            while node.input and node.input[-1] == "":
                node.input.pop()
        original = node.output[0]
        node.output[0] = f"{original}.__nobias"
        extra.append(helper.make_node("Add", [node.output[0], bias_value], [original], name=f"{name}.__add_rows"))
        new_nodes[node.name] = extra
    ordered = []
    for node in model.graph.node:
        extra = new_nodes.get(node.name, [])
        unsq = [n for n in extra if n.op_type in ("Unsqueeze", "Constant")]
        rest = [n for n in extra if n.op_type not in ("Unsqueeze", "Constant")]
        ordered.extend(unsq + [node] + rest)
    del model.graph.node[:]
    model.graph.node.extend(ordered)


def build_inference_model(
    model: onnx.ModelProto, trainable: list[str], uses: dict[str, list[BiasUse]], out_dir: Path,
    example_inputs: dict[str, np.ndarray],
) -> tuple[InferencePlan, dict[str, np.ndarray]]:
    """Write ``inference.onnx`` and ``weights.safetensors`` into ``out_dir``.

    Returns the per-row plan and the base tensors written (every float initializer).

    Example:
        >>> import tempfile
        >>> from onnx import helper, numpy_helper
        >>> from bitfit.export.biases import bias_uses_by_name, find_biases
        >>> from bitfit.sdk.runtime import ort
        >>> inits = [numpy_helper.from_array(np.eye(2, dtype=np.float32), "w"), numpy_helper.from_array(np.zeros(2, np.float32), "b")]
        >>> g = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc")], "g",
        ...     [helper.make_tensor_value_info("x", 1, ["batch", 2])], [helper.make_tensor_value_info("y", 1, ["batch", 2])], inits)
        >>> m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        >>> out, x = Path(tempfile.mkdtemp()), np.ones((2, 2), np.float32)
        >>> plan, base = build_inference_model(m, ["b"], bias_uses_by_name(find_biases(m)), out, {"x": x})
        >>> session = ort.InferenceSession(str(out / INFERENCE_FILE), providers=["CPUExecutionProvider"])
        >>> plan.per_row, sorted(base)
        (True, ['b', 'w'])
        >>> session.run(None, {"x": x, "b": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)})[0].tolist()  # a bias per row
        [[2.0, 3.0], [4.0, 5.0]]
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())  # never mutate the caller's graph
    plan, ranks = plan_per_row(model, trainable, uses, example_inputs)
    if plan.per_row:
        _rewrite_per_row(model, trainable, uses, ranks)
    inits = {i.name: i for i in model.graph.initializer}
    graph_inputs = {i.name for i in model.graph.input}
    for name in trainable:
        if name in graph_inputs:
            continue
        init = inits[name]
        shape: list[int | str] = list(init.dims)
        if plan.per_row:
            shape[0] = ROWS_DIM
        model.graph.input.append(helper.make_tensor_value_info(name, init.data_type, shape))
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    # The weights file keeps each trainable tensor in its training shape ([d], not [1, d]):
    # the bytes are the same, so external data reads them either way.
    base = {name: (value.reshape(-1) if plan.per_row and name in trainable else value) for name, value in weights.items()}
    save_file({k: np.ascontiguousarray(v) for k, v in base.items()}, str(out_dir / WEIGHTS_FILE))
    point_at_weights(model, out_dir / WEIGHTS_FILE)
    onnx.save(model, str(out_dir / INFERENCE_FILE))
    return plan, base


def point_at_weights(model: onnx.ModelProto, weights_path: Path) -> None:
    """Make every initializer stored in ``weights_path`` (a safetensors file in the model's
    folder) ONNX external data pointing at its bytes there; others stay inline.

    Example:
        >>> import tempfile
        >>> from onnx import helper, numpy_helper
        >>> out = Path(tempfile.mkdtemp())
        >>> save_file({"w": np.ones(2, np.float32)}, str(out / WEIGHTS_FILE))
        >>> w, c = numpy_helper.from_array(np.ones(2, np.float32), "w"), numpy_helper.from_array(np.ones(1, np.float32), "c")
        >>> m = helper.make_model(helper.make_graph([], "g", [], [], [w, c]))
        >>> point_at_weights(m, out / WEIGHTS_FILE)
        >>> [(i.name, {e.key: e.value for e in i.external_data}) for i in m.graph.initializer]
        [('w', {'location': 'weights.safetensors', 'offset': '64', 'length': '8'}), ('c', {})]
    """
    raw = weights_path.read_bytes()[:8]
    header_len = struct.unpack("<Q", raw)[0]
    with open(weights_path, "rb") as fh:
        fh.seek(8)
        header = json.loads(fh.read(header_len))
    data_start = 8 + header_len
    for init in model.graph.initializer:
        if init.name not in header:
            continue
        start, end = header[init.name]["data_offsets"]
        init.ClearField("raw_data")
        init.ClearField("float_data")
        init.data_location = onnx.TensorProto.EXTERNAL
        del init.external_data[:]
        for key, value in (("location", WEIGHTS_FILE), ("offset", str(data_start + start)), ("length", str(end - start))):
            entry = init.external_data.add()
            entry.key, entry.value = key, value
