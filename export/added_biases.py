"""BitFit for bias-free models: add zero-initialised biases to the ONNX graph.

Llama-style decoders (and many recent encoders) have no bias terms at all, so BitFit has
nothing to train. ``add_biases`` gives such a graph new bias tensors, all zero, so the
model computes exactly what it did before (the export validates that):

- ``linear``: after every MatMul / Gemm whose weight is a float initializer (directly or
  through a Transpose, as torch's exporter writes ``nn.Linear`` on 3-D inputs) and whose
  output has no bias yet, ``y = x @ W`` becomes ``y = x @ W + b``;
- ``norms``: after every RMSNorm-style scale (a ``Mul`` by a 1-D float initializer whose
  other input comes from a ``ReduceMean`` normalisation within a few ops, with no shift
  after it), ``y = norm(x) * g`` becomes ``y = norm(x) * g + s``;
- ``all``: both; any other string is a regular expression over the candidates' names
  (the name each added bias would get), chosen among both kinds.

It works on the graph, so every source kind (torch module, Hugging Face directory,
``.onnx`` file) gets the same treatment. An added bias is named after its weight:
``model.layers.0.self_attn.q_proj.weight`` gives ``model.layers.0.self_attn.q_proj.bias``
(the name a Linear with ``bias=True`` would have); a weight without a ``.weight`` suffix
gives ``<weight>.bias``; a clash gets ``.__added<k>``.

Example:
    >>> import numpy as np
    >>> from onnx import helper, numpy_helper
    >>> g = helper.make_graph(
    ...     [helper.make_node("MatMul", ["x", "fc.weight"], ["y"], name="fc")], "g",
    ...     [helper.make_tensor_value_info("x", 1, [1, 2])], [helper.make_tensor_value_info("y", 1, [1, 3])],
    ...     [numpy_helper.from_array(np.ones((2, 3), np.float32), "fc.weight")])
    >>> model = helper.make_model(g)
    >>> added = add_biases(model, "linear")
    >>> [(a.name, a.kind, a.module, a.shape) for a in added]
    [('fc.bias', 'linear', 'fc', (3,))]
    >>> [n.op_type for n in model.graph.node]
    ['MatMul', 'Add']
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bitfit.sdk.errors import PolicyError

log = logging.getLogger("bitfit.export")

AddedKind = Literal["linear", "norm-shift"]
NAMED_CHOICES = ("linear", "norms", "all")
# How many producers back from a scale Mul an RMSNorm's ReduceMean may sit
# (Mul <- Mul(x, rsqrt) <- Reciprocal/Div <- Sqrt <- Add(eps) <- ReduceMean: 5).
_NORM_DEPTH = 6
_FLOAT = onnx.TensorProto.FLOAT


@dataclass(frozen=True)
class AddedBias:
    """One bias tensor ``add_biases`` put into the graph.

    Fields: ``name`` (the new initializer), ``kind`` (``linear`` or ``norm-shift``),
    ``module`` (the source module it belongs to, from its weight's name; None when the
    weight has no ``.weight`` name), ``weight`` (the initializer it follows), ``node``
    (the ``Add`` node that adds it), ``shape``.

    Example:
        >>> AddedBias("fc.bias", "linear", "fc", "fc.weight", "fc.bias.__add", (3,)).as_dict()["module"]
        'fc'
    """

    name: str
    kind: AddedKind
    module: str | None
    weight: str
    node: str
    shape: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        """The manifest's record of this bias (``source.added_biases[name]``, without the name).

        Example:
            >>> AddedBias("n.bias", "norm-shift", "n", "n.weight", "n.bias.__add", (4,)).as_dict()["kind"]
            'norm-shift'
        """
        out = asdict(self)
        out.pop("name")
        out["shape"] = list(self.shape)
        return out


def add_biases(model: onnx.ModelProto, select: str = "linear", *, exclude: list[str] | None = None) -> list[AddedBias]:
    """Add zero biases to ``model`` in place where it has none; returns what was added.

    Args:
        model: a float32 forward graph (node names unique: ``repairs.ensure_named_nodes``).
        select: ``"linear"``, ``"norms"``, ``"all"``, or a regex over the candidate names.
        exclude: regexes of candidate names to leave alone.

    Raises:
        PolicyError: ``select`` or an ``exclude`` regex is invalid, or nothing is selected.

    Example:
        >>> import numpy as np
        >>> from onnx import helper, numpy_helper
        >>> g = helper.make_graph(
        ...     [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        ...     [helper.make_tensor_value_info("x", 1, [1, 2])], [helper.make_tensor_value_info("y", 1, [1, 3])],
        ...     [numpy_helper.from_array(np.ones((2, 3), np.float32), "w")])
        >>> add_biases(helper.make_model(g), "norms")
        Traceback (most recent call last):
        ...
        bitfit.sdk.errors.PolicyError: add_biases='norms' selected no place to add a bias (candidates: w.bias); ...
    """
    if not isinstance(select, str) or not select:
        raise PolicyError(f"add_biases must be 'linear', 'norms', 'all' or a regex, got {select!r}")
    candidates = find_bias_free_outputs(model)
    if select in NAMED_CHOICES:
        wanted = {"linear": {"linear"}, "norms": {"norm-shift"}, "all": {"linear", "norm-shift"}}[select]
        chosen = [c for c in candidates if c["kind"] in wanted]
    else:
        pattern = _compile(select, "add_biases")
        chosen = [c for c in candidates if pattern.search(c["name"])]
    for text in exclude or []:
        pattern = _compile(text, "add_biases exclude")
        chosen = [c for c in chosen if not pattern.search(c["name"])]
    if not chosen:
        names = ", ".join(c["name"] for c in candidates[:6]) or "none: every MatMul/Gemm already has a bias"
        raise PolicyError(
            f"add_biases={select!r} selected no place to add a bias (candidates: {names}); use 'linear', 'norms', "
            "'all' or a regex matching some of them")
    return [_insert(model, c) for c in chosen]


def find_bias_free_outputs(model: onnx.ModelProto) -> list[dict[str, Any]]:
    """Where a bias could be added: MatMul/Gemm outputs with a weight initializer and no
    bias, and RMSNorm-style scales without a shift; one dict per place (``name`` it would
    get, ``kind``, ``node``, ``weight``, ``module``, ``width``), in graph order.

    Example:
        >>> import numpy as np
        >>> from onnx import helper, numpy_helper
        >>> g = helper.make_graph(
        ...     [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Add", ["h", "b"], ["y"], name="add")],
        ...     "g", [helper.make_tensor_value_info("x", 1, [1, 2])], [helper.make_tensor_value_info("y", 1, [1, 3])],
        ...     [numpy_helper.from_array(np.ones((2, 3), np.float32), "w"), numpy_helper.from_array(np.ones(3, np.float32), "b")])
        >>> find_bias_free_outputs(helper.make_model(g))      # it has a bias already
        []
    """
    inits = {i.name: i for i in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    taken = set(inits) | {v for node in model.graph.node for v in node.output} | {i.name for i in model.graph.input}
    found: list[dict[str, Any]] = []
    for node in model.graph.node:
        place = None
        if node.op_type in ("MatMul", "Gemm"):
            place = _linear_place(node, inits, producers, consumers)
        elif node.op_type == "Mul":
            place = _norm_place(node, inits, producers, consumers)
        if place is None:
            continue
        name = _bias_name(place["weight"], taken)
        taken.add(name)
        module = place["weight"][: -len(".weight")] if place["weight"].endswith(".weight") else None
        found.append({**place, "name": name, "node": node.name, "module": module})
    return found


# -- helpers -------------------------------------------------------------------------

def _linear_place(node, inits, producers, consumers) -> dict[str, Any] | None:
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        return None  # Gemm with its C input has a bias
    weight, transposed = _weight_of(node.input[1], inits, producers)
    if weight is None or len(inits[weight].dims) != 2:
        return None
    dims = list(inits[weight].dims)
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        width = dims[0] if bool(trans_b) != transposed else dims[1]
    else:
        width = dims[0] if transposed else dims[1]
    if _has_bias_after(node.output[0], inits, consumers, width):
        return None
    return {"kind": "linear", "weight": weight, "width": int(width)}


def _norm_place(node, inits, producers, consumers) -> dict[str, Any] | None:
    scale = next((i for i in node.input if i in inits and len(inits[i].dims) == 1 and inits[i].data_type == _FLOAT), None)
    if scale is None:
        return None
    other = next((i for i in node.input if i != scale), None)
    if other is None or not _normalised(other, producers, inits):
        return None
    width = int(inits[scale].dims[0])
    if _has_bias_after(node.output[0], inits, consumers, width):
        return None
    return {"kind": "norm-shift", "weight": scale, "width": width}


def _weight_of(name: str, inits, producers) -> tuple[str | None, bool]:
    """The 2-D float initializer a MatMul/Gemm input reads, and whether it is transposed on the way."""
    if name in inits:
        return (name, False) if inits[name].data_type == _FLOAT else (None, False)
    node = producers.get(name)
    if node is not None and node.op_type == "Transpose" and node.input[0] in inits:
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
        if perm == [1, 0] and inits[node.input[0]].data_type == _FLOAT:
            return node.input[0], True
    return None, False


def _has_bias_after(output: str, inits, consumers, width: int) -> bool:
    for user in consumers.get(output, []):
        if user.op_type == "Add" and any(i in inits and list(inits[i].dims) in ([width], [1, width]) for i in user.input):
            return True
    return False


def _normalised(value: str, producers, inits) -> bool:
    """Whether a ReduceMean (an RMS/LayerNorm statistic) sits within a few producers of ``value``."""
    frontier, seen = [(value, 0)], set()
    while frontier:
        name, depth = frontier.pop()
        node = producers.get(name)
        if node is None or depth > _NORM_DEPTH or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in ("ReduceMean", "LayerNormalization", "SimplifiedLayerNormalization"):
            return True
        if node.op_type in ("MatMul", "Gemm", "Gather", "Softmax"):
            continue  # a new layer begins: not this norm's statistic
        frontier.extend((i, depth + 1) for i in node.input if i and i not in inits)
    return False


def _bias_name(weight: str, taken: set[str]) -> str:
    stem = weight[: -len(".weight")] if weight.endswith(".weight") else weight
    name = f"{stem}.bias"
    k = 1
    while name in taken:
        name = f"{stem}.bias.__added{k}"
        k += 1
    return name


def _insert(model: onnx.ModelProto, place: dict[str, Any]) -> AddedBias:
    nodes = list(model.graph.node)
    index = next(i for i, n in enumerate(nodes) if n.name == place["node"])
    node = nodes[index]
    original = node.output[0]
    node.output[0] = f"{original}.__nobias"
    add_name = f"{place['name']}.__add"
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(place["width"], np.float32), place["name"]))
    add = helper.make_node("Add", [node.output[0], place["name"]], [original], name=add_name)
    model.graph.node.insert(index + 1, add)
    log.info("added a zero %s bias %s (%d values) after %s", place["kind"], place["name"], place["width"], node.name)
    return AddedBias(place["name"], place["kind"], place["module"], place["weight"], add_name, (place["width"],))


def _compile(text: str, what: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as err:
        raise PolicyError(f"{what} regex {text!r} is invalid: {err}") from err


__all__ = ["AddedBias", "add_biases", "find_bias_free_outputs"]
