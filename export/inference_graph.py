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
from onnx import helper, numpy_helper, shape_inference
from safetensors.numpy import save_file

from .biases import BiasUse

ROWS_DIM = "rows"
WEIGHTS_FILE = "weights.safetensors"
INFERENCE_FILE = "inference.onnx"


@dataclass(frozen=True)
class InferencePlan:
    per_row: bool
    inference_shapes: dict[str, list[int]]
    reason: str


def _output_dims(inferred: onnx.ModelProto) -> dict[str, list]:
    dims = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        shape = vi.type.tensor_type.shape
        dims[vi.name] = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in shape.dim]
    return dims


def plan_per_row(model: onnx.ModelProto, trainable: list[str], uses: dict[str, list[BiasUse]]) -> InferencePlan:
    """Decide whether every trainable tensor can take a per-row ``[rows, d]`` value.

    It can when each is a 1-D bias used once, and the output it is added to has the
    batch dimension first (proved by ONNX shape inference). A graph that folds batch
    into another axis (e.g. GPT-2's ``addmm`` over ``[batch*seq, d]``) cannot.
    """
    inits = {i.name: i for i in model.graph.initializer}
    plain = {n: list(inits[n].dims) for n in trainable}
    real_inputs = [i for i in model.graph.input if i.name not in inits]
    batch = real_inputs[0].type.tensor_type.shape.dim[0].dim_param if real_inputs else ""
    if not batch:
        return InferencePlan(False, plain, "the first input has no symbolic batch dimension")
    try:
        inferred = shape_inference.infer_shapes(model)
    except Exception as err:  # onnx raises InferenceError and friends
        return InferencePlan(False, plain, f"shape inference failed: {err}")
    dims = _output_dims(inferred)
    nodes = {n.name: n for n in model.graph.node}
    for name in trainable:
        if len(inits[name].dims) != 1:
            return InferencePlan(False, plain, f"{name} is not a 1-D bias")
        if len(uses.get(name, [])) != 1:
            return InferencePlan(False, plain, f"{name} is not used exactly once as a bias")
        node = nodes[uses[name][0].node]
        out = dims.get(node.output[0])
        if not out or out[0] != batch:
            return InferencePlan(False, plain, f"the output of {node.name} does not start with the batch dimension")
        if node.op_type == "Add" and out[-1] != inits[name].dims[0]:
            return InferencePlan(False, plain, f"{name} is not added along the last axis")
    return InferencePlan(True, {n: [1, *plain[n]] for n in trainable}, "")


def _rewrite_per_row(model: onnx.ModelProto, trainable: list[str], uses: dict[str, list[BiasUse]]) -> None:
    inferred = shape_inference.infer_shapes(model)
    dims = _output_dims(inferred)
    nodes = {n.name: n for n in model.graph.node}
    inits = {i.name: i for i in model.graph.initializer}
    new_nodes: dict[str, list[onnx.NodeProto]] = {}
    for name in trainable:
        use = uses[name][0]
        node = nodes[use.node]
        rank = len(dims[node.output[0]])
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
            model.graph.initializer.append(numpy_helper.from_array(np.zeros(width, np.float32), zero))
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
        unsq = [n for n in extra if n.op_type == "Unsqueeze"]
        rest = [n for n in extra if n.op_type != "Unsqueeze"]
        ordered.extend(unsq + [node] + rest)
    del model.graph.node[:]
    model.graph.node.extend(ordered)


def build_inference_model(
    model: onnx.ModelProto, trainable: list[str], uses: dict[str, list[BiasUse]], out_dir: Path
) -> tuple[InferencePlan, dict[str, np.ndarray]]:
    """Write ``inference.onnx`` and ``weights.safetensors`` into ``out_dir``.

    Returns the per-row plan and the base tensors written (every float initializer).
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())  # never mutate the caller's graph
    plan = plan_per_row(model, trainable, uses)
    if plan.per_row:
        _rewrite_per_row(model, trainable, uses)
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
    _point_at_weights(model, out_dir / WEIGHTS_FILE)
    onnx.save(model, str(out_dir / INFERENCE_FILE))
    return plan, base


def _point_at_weights(model: onnx.ModelProto, weights_path: Path) -> None:
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
