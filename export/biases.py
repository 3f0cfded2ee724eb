"""Find a graph's biases by structure, and choose the trainable set by policy.

A bias is a 1-D float initializer that feeds the bias input of Gemm / Conv /
ConvTranspose / LayerNormalization / BatchNormalization / InstanceNormalization, or
is added (``Add``) to the output of MatMul / Conv / Gemm. Names from the framework
(``named_parameters()``) are only a cross-check: a graph from an .onnx file has none.

Example:
    >>> import onnx
    >>> from onnx import helper, numpy_helper
    >>> import numpy as np
    >>> g = helper.make_graph(
    ...     [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])], "g",
    ...     [helper.make_tensor_value_info("x", 1, [1, 2])], [helper.make_tensor_value_info("y", 1, [1, 3])],
    ...     [numpy_helper.from_array(np.ones((2, 3), np.float32), "w"), numpy_helper.from_array(np.ones(3, np.float32), "b")])
    >>> [(b.name, b.kind) for b in find_biases(helper.make_model(g))]
    [('b', 'matmul-add')]
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import onnx

from bitfit.sdk.errors import PolicyError, UnsupportedModelError

log = logging.getLogger("bitfit.export")

BiasKind = Literal["gemm", "conv", "layernorm", "batchnorm", "instancenorm", "matmul-add"]
BasePolicy = Literal["all-biases", "paper-subset"]
POLICIES = ("all-biases", "paper-subset", "all-biases+head", "paper-subset+head")

# The bias input index of each op that takes one.
_BIAS_INPUT = {"Gemm": 2, "Conv": 2, "ConvTranspose": 2, "LayerNormalization": 2, "BatchNormalization": 2,
               "InstanceNormalization": 2}
_KIND = {"Gemm": "gemm", "Conv": "conv", "ConvTranspose": "conv", "LayerNormalization": "layernorm",
         "BatchNormalization": "batchnorm", "InstanceNormalization": "instancenorm"}
_LINEAR_PRODUCERS = {"MatMul", "Conv", "Gemm", "Einsum", "ConvTranspose"}
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}

# BitFit paper subset: query biases and the first feed-forward bias of each layer.
_PAPER_QUERY = re.compile(r"(query|q_proj|q_lin|\.q)\.bias$")
_PAPER_FF1 = re.compile(r"(intermediate\.dense|mlp\.c_fc|mlp\.fc1|fc1|mlp\.dense_h_to_4h|lin1|mlp\.up_proj|wi)\.bias$")


@dataclass(frozen=True)
class BiasUse:
    """One place where a bias initializer is used: the consuming node and input slot.

    Example:
        >>> import numpy as np
        >>> from onnx import helper, numpy_helper
        >>> b = numpy_helper.from_array(np.zeros(2, np.float32), "fc.bias")
        >>> g = helper.make_graph([helper.make_node("Gemm", ["x", "w", "fc.bias"], ["y"], name="fc")], "g", [], [], [b])
        >>> find_biases(helper.make_model(g))[0].uses
        (BiasUse(node='fc', op_type='Gemm', input_index=2),)
    """

    node: str
    op_type: str
    input_index: int


@dataclass(frozen=True)
class BiasInfo:
    """A bias found by structure: its initializer name, shape, kind and uses.

    Example:
        >>> import numpy as np
        >>> from onnx import helper, numpy_helper
        >>> b = numpy_helper.from_array(np.zeros(4, np.float32), "ln.bias")
        >>> ln = helper.make_node("LayerNormalization", ["x", "ln.weight", "ln.bias"], ["y"], name="ln")
        >>> info = find_biases(helper.make_model(helper.make_graph([ln], "g", [], [], [b])))[0]
        >>> info.name, info.shape, info.kind
        ('ln.bias', (4,), 'layernorm')
    """

    name: str
    shape: tuple[int, ...]
    kind: BiasKind
    uses: tuple[BiasUse, ...]


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer}


def find_biases(model: onnx.ModelProto) -> list[BiasInfo]:
    """Every bias in the graph, in graph order, found by where it is used.

    A 1-D float initializer counts when it is a bias input (Gemm, Conv, LayerNorm, ...) or
    is added to a MatMul/Conv/Gemm output; its name does not matter. One tensor used in two
    places is one ``BiasInfo`` with two uses.

    Example:
        >>> import numpy as np
        >>> from onnx import helper, numpy_helper
        >>> shared = numpy_helper.from_array(np.zeros(3, np.float32), "b")
        >>> nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        ...          helper.make_node("Add", ["h", "b"], ["h2"], name="add"),
        ...          helper.make_node("Gemm", ["h2", "w2", "b"], ["y"], name="gemm")]
        >>> [(i.name, i.kind, len(i.uses)) for i in find_biases(helper.make_model(helper.make_graph(nodes, "g", [], [], [shared])))]
        [('b', 'matmul-add', 2)]
    """
    inits = _initializers(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    found: dict[str, tuple[BiasKind, list[BiasUse]]] = {}
    order: list[str] = []

    def record(name: str, kind: BiasKind, node: onnx.NodeProto, index: int) -> None:
        init = inits.get(name)
        if init is None or len(init.dims) != 1 or init.data_type not in _FLOAT_TYPES:
            return
        if name not in found:
            found[name] = (kind, [])
            order.append(name)
        found[name][1].append(BiasUse(node.name, node.op_type, index))

    for node in model.graph.node:
        index = _BIAS_INPUT.get(node.op_type)
        if index is not None and len(node.input) > index and node.input[index]:
            record(node.input[index], _KIND[node.op_type], node, index)
        elif node.op_type == "Add" and len(node.input) == 2:
            for slot, other in ((0, 1), (1, 0)):
                producer = producers.get(node.input[other])
                if producer is not None and producer.op_type in _LINEAR_PRODUCERS:
                    record(node.input[slot], "matmul-add", node, slot)
    return [BiasInfo(n, tuple(inits[n].dims), found[n][0], tuple(found[n][1])) for n in order]


def find_head_weight(model: onnx.ModelProto) -> str | None:
    """The classification head's weight: the 2-D initializer of the Gemm/MatMul nearest the first output.

    Example:
        >>> import numpy as np
        >>> from onnx import helper, numpy_helper
        >>> inits = [numpy_helper.from_array(np.zeros((4, 4), np.float32), "enc.weight"),
        ...          numpy_helper.from_array(np.zeros((4, 2), np.float32), "head.weight")]
        >>> nodes = [helper.make_node("MatMul", ["x", "enc.weight"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
        ...          helper.make_node("MatMul", ["r", "head.weight"], ["logits"])]
        >>> out = helper.make_tensor_value_info("logits", 1, [1, 2])
        >>> find_head_weight(helper.make_model(helper.make_graph(nodes, "g", [], [out], inits)))
        'head.weight'
    """
    inits = _initializers(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    frontier, seen = [model.graph.output[0].name], set()
    while frontier:
        name = frontier.pop(0)
        node = producers.get(name)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in ("Gemm", "MatMul"):
            for inp in node.input[:2]:
                if inp in inits and len(inits[inp].dims) == 2:
                    return inp
        frontier.extend(i for i in node.input if i and i not in inits)
    return None


def cross_check(biases: list[BiasInfo], param_names: list[str] | None) -> list[str]:
    """Framework parameters named ``*.bias`` that the structural search did not find.

    Each is logged as a warning: it stays frozen (e.g. a bias the exporter folded away).

    Example:
        >>> found = [BiasInfo("fc.bias", (2,), "gemm", ())]
        >>> cross_check(found, ["fc.weight", "fc.bias", "norm.bias"])
        ['norm.bias']
    """
    if not param_names:
        return []
    found = {b.name for b in biases}
    missing = [n for n in param_names if (n.endswith(".bias") or n == "bias") and n not in found]
    for name in missing:
        log.warning("parameter %s looks like a bias but is not used as one in the graph; it stays frozen", name)
    return missing


@dataclass(frozen=True)
class TrainableSelection:
    """The chosen trainable tensors and how they were chosen (recorded in the manifest).

    Example:
        >>> import numpy as np
        >>> from onnx import helper, numpy_helper
        >>> inits = [numpy_helper.from_array(np.zeros(2, np.float32), n) for n in ("attn.query.bias", "attn.key.bias")]
        >>> nodes = [helper.make_node("Gemm", ["x", "w", n], [n + ".out"], name=n) for n in ("attn.query.bias", "attn.key.bias")]
        >>> model = helper.make_model(helper.make_graph(nodes, "g", [], [], inits))
        >>> selection = select_trainable(model, find_biases(model), "all-biases", exclude=["key"])
        >>> selection.names, selection.exclude
        (['attn.query.bias'], ['key'])
    """

    names: list[str]
    policy: str
    include: list[str]
    exclude: list[str]
    head_weight: str | None


def select_trainable(
    model: onnx.ModelProto,
    biases: list[BiasInfo],
    policy: str = "all-biases",
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    head_weight: str | None = None,
) -> TrainableSelection:
    """Apply a policy, then include regexes (add any float initializer), then exclude regexes.

    Policies: ``all-biases`` (default), ``paper-subset`` (query biases and the first
    feed-forward bias of each layer, as in the BitFit paper), each optionally with
    ``+head`` (the classification head's weight too).

    Example:
        >>> select_trainable(None, [], "everything")
        Traceback (most recent call last):
        ...
        bitfit.sdk.errors.PolicyError: unknown policy 'everything': use one of all-biases, paper-subset, all-biases+head, paper-subset+head
    """
    if policy not in POLICIES:
        raise PolicyError(f"unknown policy {policy!r}: use one of {', '.join(POLICIES)}")
    base, _, head = policy.partition("+")
    if not biases:
        raise UnsupportedModelError(
            "the model has no biases (no 1-D initializer feeds a Gemm/Conv/LayerNorm/BatchNorm bias or is added "
            "after a MatMul): BitFit needs biases. Add bias terms to the model (e.g. bias=True on Linear layers)."
        )
    names = [b.name for b in biases]
    if base == "paper-subset":
        names = [n for n in names if _PAPER_QUERY.search(n) or _PAPER_FF1.search(n)]
        if not names:
            raise PolicyError("paper-subset matched no query or first feed-forward biases by name; "
                              "use all-biases, or name the tensors with include=[...] regexes")
    head_name = None
    if head == "head":
        head_name = head_weight or find_head_weight(model)
        if head_name is None:
            raise PolicyError("+head: no 2-D Gemm/MatMul weight feeds the first output; pass include=['<head weight name>']")
        if head_name not in names:
            names.append(head_name)
    compiled_in, compiled_ex = _compile(include or [], "include"), _compile(exclude or [], "exclude")
    inits = _initializers(model) if model is not None else {}
    for pattern in compiled_in:
        matched = [n for n, t in inits.items() if pattern.search(n) and t.data_type in _FLOAT_TYPES]
        if not matched:
            raise PolicyError(f"include regex {pattern.pattern!r} matched no float initializer")
        names.extend(n for n in matched if n not in names)
    for pattern in compiled_ex:
        names = [n for n in names if not pattern.search(n)]
    if not names:
        raise PolicyError("the policy and regexes leave no trainable tensor; loosen the exclude regexes")
    return TrainableSelection(names, policy, list(include or []), list(exclude or []), head_name)


def _compile(patterns: list[str], what: str) -> list[re.Pattern[str]]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as err:
            raise PolicyError(f"{what} regex {p!r} is invalid: {err}") from err
    return out


def bias_uses_by_name(biases: list[BiasInfo]) -> dict[str, list[BiasUse]]:
    """Bias name -> every place it is used (what ``split_shared_biases`` needs).

    Example:
        >>> uses = bias_uses_by_name([BiasInfo("b", (2,), "gemm", (BiasUse("fc1", "Gemm", 2), BiasUse("fc2", "Gemm", 2)))])
        >>> [u.node for u in uses["b"]]
        ['fc1', 'fc2']
    """
    out: dict[str, list[BiasUse]] = defaultdict(list)
    for b in biases:
        out[b.name].extend(b.uses)
    return out

