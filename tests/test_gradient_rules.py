"""Every reverse-mode rule of ``bitfit.export.gradient_graph``, one tiny ONNX graph each.

Each case is a hand-built graph where a trainable initializer feeds the op under test
(directly, or through an ``Add`` upstream so the activation operand carries a gradient
too), with the mse loss on its output. ``build_portable_models`` differentiates it; the
gradient model, run by onnxruntime at the example batch (2) and at an unseen one (5), must
give the loss, the output and every ``<name>_grad`` that torch autograd gives in float64 on
the same math, within float32 rounding. The eval model must give the same loss.

The refusals (an op with no rule on the path, old opsets, ...) are at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from bitfit.export.gradient_graph import NoPortableModel, build_portable_models
from bitfit.sdk.runtime import ort

N = helper.make_node
BATCH, EXAMPLE_BATCH = 5, 2


@dataclass
class Case:
    """A graph ``nodes`` from ``inputs`` (batch first) and initializers to ``out``, and the
    same math in torch (``torch_fn(tensors) -> out``, every tensor by its ONNX name)."""

    nodes: list[onnx.NodeProto]
    inputs: dict[str, np.ndarray]
    trainable: dict[str, np.ndarray]
    torch_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    frozen: dict[str, np.ndarray] = field(default_factory=dict)
    opset: int = 17


def rng_for(name: str) -> np.random.Generator:
    return np.random.default_rng(sum(map(ord, name)))


def normal(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def uniform(rng, low, high, *shape):
    return rng.uniform(low, high, shape).astype(np.float32)


def i64(values) -> np.ndarray:
    return np.asarray(values, np.int64)


def to_model(case: Case, out_rank: int) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), ["batch", *v.shape[1:]])
              for k, v in case.inputs.items()]
    output = helper.make_tensor_value_info("out", TensorProto.FLOAT, [f"out_{i}" for i in range(out_rank)])
    inits = [numpy_helper.from_array(v, k) for k, v in {**case.trainable, **case.frozen}.items()]
    graph = helper.make_graph(case.nodes, "case", inputs, [output], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)])


def torch_reference(case: Case, inputs: dict[str, np.ndarray], labels: np.ndarray | None = None):
    """(loss, output, {name: gradient}) in float64; random labels when none are given."""
    tensors = {k: torch.from_numpy(np.asarray(v, np.float64) if np.asarray(v).dtype == np.float32 else np.asarray(v))
               for k, v in {**inputs, **case.frozen}.items()}
    params = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in case.trainable.items()}
    out = case.torch_fn({**tensors, **params})
    if labels is None:
        labels = rng_for("labels").standard_normal(tuple(out.shape)).astype(np.float32)
    loss = ((out - torch.from_numpy(labels.astype(np.float64))) ** 2).mean()
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return (float(loss.detach()), out.detach().numpy(), labels,
            {k: (g.numpy() if g is not None else np.zeros_like(case.trainable[k], np.float64)) for k, g in zip(params, grads)})


def session(model: onnx.ModelProto):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def check_case(case: Case) -> None:
    """Build the portable models for ``case`` and compare them with torch autograd."""
    _, out, _, _ = torch_reference(case, case.inputs)
    example = {k: v[:EXAMPLE_BATCH] for k, v in case.inputs.items()}
    models = build_portable_models(to_model(case, out.ndim), list(case.trainable), loss="mse", example_inputs=example)
    assert [o.name for o in models.gradient.graph.output] == ["loss", "out", *[f"{n}_grad" for n in case.trainable]]
    gradient, evaluator = session(models.gradient), session(models.eval)
    for inputs in (example, case.inputs):
        ref_loss, ref_out, labels, ref_grads = torch_reference(case, inputs)
        feeds = {**inputs, "labels": labels.astype(np.float32), **case.trainable}
        loss, ours, *grads = gradient.run(None, feeds)
        scale = max(1.0, float(np.abs(ref_out).max()))
        np.testing.assert_allclose(ours, ref_out, rtol=1e-5, atol=1e-5 * scale, err_msg="model output")
        assert float(loss) == pytest.approx(ref_loss, rel=1e-5, abs=1e-7)
        assert float(evaluator.run(["loss"], feeds)[0]) == pytest.approx(ref_loss, rel=1e-5, abs=1e-7)
        for (name, expected), got in zip(ref_grads.items(), grads):
            assert got.shape == expected.shape, name
            largest = float(np.abs(expected).max())
            assert largest > 0, f"{name}: the case must give it a gradient"
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=2e-5 * largest,
                                       err_msg=f"{name}_grad at batch {len(next(iter(inputs.values())))}")


CASES: dict[str, Callable[[], Case]] = {}


def case(name: str):
    def register(builder: Callable[[str], Case]):
        CASES[name] = lambda: builder(name)
        return builder
    return register


# --- elementwise arithmetic, broadcasting both ways ----------------------------------------

BINARY = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}


def _operand(rng, op, *shape):
    """Divisors stay away from zero; everything else is standard normal."""
    return uniform(rng, 0.5, 2.0, *shape) if op == "Div" else normal(rng, *shape)


for _op, _fn in BINARY.items():
    @case(f"{_op}-activation-op-trainable-broadcast")
    def _(name, op=_op, fn=_fn):  # w [3, 1] broadcast over batch (lead) and the last axis
        rng = rng_for(name)
        return Case([N(op, ["x", "w"], ["out"])], {"x": normal(rng, BATCH, 3, 4)}, {"w": _operand(rng, op, 3, 1)},
                    lambda t: fn(t["x"], t["w"]))

    @case(f"{_op}-trainable-op-activation")
    def _(name, op=_op, fn=_fn):  # w [4] on the left, the activation is the divisor for Div
        rng = rng_for(name)
        return Case([N(op, ["w", "x"], ["out"])], {"x": _operand(rng, op, BATCH, 3, 4)}, {"w": normal(rng, 4)},
                    lambda t: fn(t["w"], t["x"]))

    @case(f"{_op}-activation-broadcast-against-trainable")
    def _(name, op=_op, fn=_fn):  # h [B, 1, 4] broadcast over axis 1 of w [3, 4]; c [1, 4] upstream
        rng = rng_for(name)
        shift = 3.0 if op == "Div" else 0.0
        return Case([N("Add", ["x", "c"], ["h"]), N(op, ["h", "w"], ["out"])],
                    {"x": normal(rng, BATCH, 1, 4, scale=0.2) + shift}, {"c": normal(rng, 1, 4, scale=0.2), "w": _operand(rng, op, 3, 4)},
                    lambda t: fn(t["x"] + t["c"], t["w"]))

    @case(f"{_op}-trainable-broadcast-against-activation")
    def _(name, op=_op, fn=_fn):  # w [3, 1] op h [B, 1, 4]: both operands broadcast
        rng = rng_for(name)
        shift = 3.0 if op == "Div" else 0.0
        return Case([N("Add", ["x", "c"], ["h"]), N(op, ["w", "h"], ["out"])],
                    {"x": normal(rng, BATCH, 1, 4, scale=0.2) + shift}, {"c": normal(rng, 4, scale=0.2), "w": _operand(rng, op, 3, 1)},
                    lambda t: fn(t["w"], t["x"] + t["c"]))


@case("Neg")
def _(name):
    rng = rng_for(name)
    return Case([N("Add", ["x", "b"], ["h"]), N("Neg", ["h"], ["out"])], {"x": normal(rng, BATCH, 4)}, {"b": normal(rng, 4)},
                lambda t: -(t["x"] + t["b"]))


@case("fan-out-sums-gradients")
def _(name):  # h feeds two nodes and b feeds two nodes: each gradient is the sum over uses
    rng = rng_for(name)
    return Case([N("Add", ["x", "b"], ["h"]), N("Mul", ["h", "h"], ["sq"]), N("Mul", ["sq", "b"], ["out"])],
                {"x": normal(rng, BATCH, 4)}, {"b": normal(rng, 4)}, lambda t: (t["x"] + t["b"]) ** 2 * t["b"])


def _pow_case(name, exponent, base_shape=(BATCH, 3, 4), bias_shape=(4,)):
    rng = rng_for(name)
    exponent = np.asarray(exponent)
    return Case([N("Add", ["x", "b"], ["h"]), N("Pow", ["h", "e"], ["out"])],
                {"x": uniform(rng, 1.0, 2.0, *base_shape)}, {"b": uniform(rng, 0.0, 0.3, *bias_shape)},
                lambda t: torch.pow(t["x"] + t["b"], t["e"]), frozen={"e": exponent})


case("Pow-square")(lambda name: _pow_case(name, np.float32(2.0)))
case("Pow-cube-int-exponent")(lambda name: _pow_case(name, np.int64(3)))
case("Pow-square-root")(lambda name: _pow_case(name, np.float32(0.5)))
case("Pow-broadcast-exponent")(lambda name: _pow_case(name, np.array([[1.5, 2.0, 3.0, -1.0]] * 3, np.float32),
                                                       base_shape=(BATCH, 1, 4), bias_shape=(1, 4)))

UNARY = {
    # op: (torch function, input range: "positive" or "any")
    "Sqrt": (torch.sqrt, "positive"), "Reciprocal": (torch.reciprocal, "positive"), "Log": (torch.log, "positive"),
    "Exp": (torch.exp, "any"), "Erf": (torch.erf, "any"), "Tanh": (torch.tanh, "any"), "Sigmoid": (torch.sigmoid, "any"),
    "Relu": (torch.relu, "any"), "Softplus": (F.softplus, "any"), "Abs": (torch.abs, "any"),
    "Identity": (lambda v: v, "any"), "Dropout": (lambda v: v, "any"),
}
for _op, (_fn, _range) in UNARY.items():
    @case(_op)
    def _(name, op=_op, fn=_fn, kind=_range):
        rng = rng_for(name)
        x = uniform(rng, 0.5, 2.0, BATCH, 3, 4) if kind == "positive" else normal(rng, BATCH, 3, 4, scale=1.5)
        return Case([N("Add", ["x", "b"], ["h"]), N(op, ["h"], ["out"])], {"x": x}, {"b": normal(rng, 4, scale=0.2)},
                    lambda t: fn(t["x"] + t["b"]))


@case("LeakyRelu")
def _(name):
    rng = rng_for(name)
    return Case([N("Add", ["x", "b"], ["h"]), N("LeakyRelu", ["h"], ["out"], alpha=0.2)], {"x": normal(rng, BATCH, 3, 4)},
                {"b": normal(rng, 4, scale=0.2)}, lambda t: F.leaky_relu(t["x"] + t["b"], 0.2))


@case("Cast-to-float")
def _(name):
    rng = rng_for(name)
    return Case([N("Add", ["x", "b"], ["h"]), N("Cast", ["h"], ["c"], to=TensorProto.FLOAT), N("Tanh", ["c"], ["out"])],
                {"x": normal(rng, BATCH, 4)}, {"b": normal(rng, 4)}, lambda t: torch.tanh(t["x"] + t["b"]))


@case("Gelu-exact")
def _(name):
    rng = rng_for(name)
    return Case([N("Add", ["x", "b"], ["h"]), N("Gelu", ["h"], ["out"])], {"x": normal(rng, BATCH, 3, 4, scale=1.5)},
                {"b": normal(rng, 4, scale=0.2)}, lambda t: F.gelu(t["x"] + t["b"]), opset=20)


def _gelu_pattern_case(name, scale_node="Div", one=1.0, half=0.5, scale=None, extra_use=False):
    """torch's erf GELU, ``x * (1 + erf(x / sqrt 2)) * 0.5``, with ``scale_node`` Div by sqrt 2 or
    Mul by 1 / sqrt 2; other constants, or an extra use of ``erf``, make a lookalike that the
    closed form must not be applied to wrongly."""
    rng = rng_for(name)
    scale = np.float32(scale or (math.sqrt(2) if scale_node == "Div" else 1 / math.sqrt(2)))
    nodes = [N("Add", ["x", "b"], ["h"]), N(scale_node, ["h", "scale"], ["scaled"]), N("Erf", ["scaled"], ["erf"]),
             N("Add", ["erf", "one"], ["one_plus"]), N("Mul", ["h", "one_plus"], ["inner"]), N("Mul", ["inner", "half"], ["gelu"])]
    if extra_use:
        nodes.append(N("Add", ["gelu", "erf"], ["out"]))
    else:
        nodes.append(N("Identity", ["gelu"], ["out"]))

    def reference(t):
        h = t["x"] + t["b"]
        erf = torch.erf(h / float(scale) if scale_node == "Div" else h * float(scale))
        gelu = h * (one + erf) * half
        return gelu + erf if extra_use else gelu
    return Case(nodes, {"x": normal(rng, BATCH, 3, 4, scale=1.5)}, {"b": normal(rng, 4, scale=0.3)}, reference,
                frozen={"scale": scale, "one": np.float32(one), "half": np.float32(half)})


case("Gelu-torch-erf-pattern-div")(lambda name: _gelu_pattern_case(name))
case("Gelu-torch-erf-pattern-mul")(lambda name: _gelu_pattern_case(name, scale_node="Mul"))
case("Gelu-lookalike-other-constant")(lambda name: _gelu_pattern_case(name, one=2.0))
case("Gelu-lookalike-other-half")(lambda name: _gelu_pattern_case(name, half=0.6))
case("Gelu-lookalike-other-scale")(lambda name: _gelu_pattern_case(name, scale=2.0))
case("Gelu-lookalike-erf-used-twice")(lambda name: _gelu_pattern_case(name, extra_use=True))


@case("Where-both-branches-broadcast")
def _(name):  # a [B, 3, 4] from the activation, w [4] broadcast; the condition is an input
    rng = rng_for(name)
    return Case([N("Add", ["x", "c"], ["a"]), N("Where", ["cond", "a", "w"], ["out"])],
                {"x": normal(rng, BATCH, 3, 4), "cond": rng.random((BATCH, 3, 4)) > 0.5},
                {"c": normal(rng, 3, 1), "w": normal(rng, 4)}, lambda t: torch.where(t["cond"], t["x"] + t["c"], t["w"]))


@case("Where-condition-broadcast")
def _(name):  # the condition [B, 1, 4] broadcasts over axis 1, the branches [3, 4] and [B, 3, 1]
    rng = rng_for(name)
    return Case([N("Add", ["x", "c"], ["b_branch"]), N("Where", ["cond", "w", "b_branch"], ["out"])],
                {"x": normal(rng, BATCH, 3, 1), "cond": rng.random((BATCH, 1, 4)) > 0.5},
                {"c": normal(rng, 1), "w": normal(rng, 3, 4)}, lambda t: torch.where(t["cond"], t["w"], t["x"] + t["c"]))


@case("Expand")
def _(name):  # w [3, 1] expanded to x's shape; h [B, 1, 4] expanded over axis 1
    rng = rng_for(name)
    return Case([N("Shape", ["x"], ["sx"]), N("Expand", ["w", "sx"], ["we"]), N("Add", ["y", "c"], ["h"]),
                 N("Expand", ["h", "three"], ["he"]), N("Mul", ["we", "he"], ["wh"]), N("Mul", ["wh", "x"], ["out"])],
                {"x": normal(rng, BATCH, 3, 4), "y": normal(rng, BATCH, 1, 4)}, {"w": normal(rng, 3, 1), "c": normal(rng, 4)},
                lambda t: t["w"].expand_as(t["x"]) * (t["y"] + t["c"]).expand(-1, 3, -1) * t["x"],
                frozen={"three": i64([1, 3, 1])})


def _clip_case(name, low, high):
    rng = rng_for(name)
    frozen, inputs = {}, ["h"]
    for key, value in (("low", low), ("high", high)):
        if value is None:
            inputs.append("")
        else:
            frozen[key] = np.float32(value)
            inputs.append(key)
    while inputs and inputs[-1] == "":
        inputs.pop()
    def reference(t):
        h = t["x"] + t["b"]
        return h if (low, high) == (None, None) else h.clamp(low, high)
    return Case([N("Add", ["x", "b"], ["h"]), N("Clip", inputs, ["out"])], {"x": normal(rng, BATCH, 3, 4)},
                {"b": normal(rng, 4, scale=0.3)}, reference, frozen=frozen)


case("Clip-both-bounds")(lambda name: _clip_case(name, -0.5, 0.7))
case("Clip-max-only")(lambda name: _clip_case(name, None, 0.3))
case("Clip-no-bounds")(lambda name: _clip_case(name, None, None))


# --- linear algebra -------------------------------------------------------------------------

@case("MatMul-trainable-weight")
def _(name):
    rng = rng_for(name)
    return Case([N("MatMul", ["x", "w"], ["out"])], {"x": normal(rng, BATCH, 3)}, {"w": normal(rng, 3, 5)},
                lambda t: t["x"] @ t["w"])


@case("MatMul-activation-frozen-weight")
def _(name):  # dA through Gemm(transB=1) on the stored weight
    rng = rng_for(name)
    return Case([N("Add", ["x", "c"], ["h"]), N("MatMul", ["h", "w"], ["out"])], {"x": normal(rng, BATCH, 3)},
                {"c": normal(rng, 3)}, lambda t: (t["x"] + t["c"]) @ t["w"], frozen={"w": normal(rng, 3, 5)})


@case("MatMul-batched-activation-frozen-weight")
def _(name):
    rng = rng_for(name)
    return Case([N("Add", ["x", "c"], ["h"]), N("MatMul", ["h", "w"], ["out"])], {"x": normal(rng, BATCH, 2, 3, 4)},
                {"c": normal(rng, 4)}, lambda t: (t["x"] + t["c"]) @ t["w"], frozen={"w": normal(rng, 4, 5)})


@case("MatMul-batched-trainable-weight-and-activation")
def _(name):  # both operands want a gradient, weight rank 2 under a rank-3 activation
    rng = rng_for(name)
    return Case([N("Add", ["x", "c"], ["h"]), N("MatMul", ["h", "w"], ["out"])], {"x": normal(rng, BATCH, 2, 3)},
                {"c": normal(rng, 3), "w": normal(rng, 3, 5)}, lambda t: (t["x"] + t["c"]) @ t["w"])


@case("MatMul-broadcast-batch-weight")
def _(name):  # w [1, 4, 5] broadcast over the batch axis
    rng = rng_for(name)
    return Case([N("Add", ["x", "c"], ["h"]), N("MatMul", ["h", "w"], ["out"])], {"x": normal(rng, BATCH, 3, 4)},
                {"c": normal(rng, 4), "w": normal(rng, 1, 4, 5)}, lambda t: (t["x"] + t["c"]) @ t["w"])


@case("MatMul-trainable-left-broadcast-over-batch")
def _(name):  # w [3, 4] @ h [B, 4, 5]: dW sums over the batch
    rng = rng_for(name)
    return Case([N("Add", ["x", "c"], ["h"]), N("MatMul", ["w", "h"], ["out"])], {"x": normal(rng, BATCH, 4, 5)},
                {"c": normal(rng, 5), "w": normal(rng, 3, 4)}, lambda t: t["w"] @ (t["x"] + t["c"]))


@case("MatMul-two-activations-batched")
def _(name):  # attention-like: [B, 1, 3, 4] @ [B, 2, 4, 5], each with a trainable upstream; axis 1 broadcast
    rng = rng_for(name)
    return Case([N("Add", ["q", "cq"], ["qh"]), N("Add", ["k", "ck"], ["kh"]), N("MatMul", ["qh", "kh"], ["out"])],
                {"q": normal(rng, BATCH, 1, 3, 4), "k": normal(rng, BATCH, 2, 4, 5)},
                {"cq": normal(rng, 4), "ck": normal(rng, 1, 1, 4, 1)}, lambda t: (t["q"] + t["cq"]) @ (t["k"] + t["ck"]))


def _gemm_case(name, trans_a, trans_b, alpha, beta, c_shape=(5,)):
    rng = rng_for(name)
    nodes = [N("Add", ["x", "c"], ["h"])]
    a = "h"
    if trans_a:
        nodes.append(N("Transpose", ["h"], ["ht"], perm=[1, 0]))
        a = "ht"
    attrs = {k: v for k, v, default in (("transA", trans_a, 0), ("transB", trans_b, 0), ("alpha", alpha, 1.0), ("beta", beta, 1.0))
             if v != default}
    nodes.append(N("Gemm", [a, "w", "bias"], ["out"], **attrs))
    w = normal(rng, 5, 3) if trans_b else normal(rng, 3, 5)
    return Case(nodes, {"x": normal(rng, BATCH, 3)}, {"c": normal(rng, 3), "w": w, "bias": normal(rng, *c_shape)},
                lambda t: alpha * (t["x"] + t["c"]) @ (t["w"].T if trans_b else t["w"]) + beta * t["bias"])


for _ta in (0, 1):
    for _tb in (0, 1):
        case(f"Gemm-transA{_ta}-transB{_tb}")(lambda name, ta=_ta, tb=_tb: _gemm_case(name, ta, tb, 1.0, 1.0))
        case(f"Gemm-transA{_ta}-transB{_tb}-alpha-beta")(lambda name, ta=_ta, tb=_tb: _gemm_case(name, ta, tb, 0.7, 1.3))
case("Gemm-bias-row-broadcast")(lambda name: _gemm_case(name, 0, 1, 1.0, 0.5, c_shape=(1, 5)))


def _conv_case(name, x_shape, w_shape, bias: bool, **attrs):
    rng = rng_for(name)
    spatial = len(x_shape) - 2
    pads = attrs.get("pads", [0] * 2 * spatial)
    conv = {1: F.conv1d, 2: F.conv2d}[spatial]

    def reference(t):
        h = t["x"] + t["c"]
        torch_pads = [p for i in reversed(range(spatial)) for p in (pads[i], pads[i + spatial])]
        return conv(F.pad(h, torch_pads), t["w"], t.get("b"), stride=attrs.get("strides", 1),
                    dilation=attrs.get("dilations", 1), groups=attrs.get("group", 1))

    # c has the input's full shape, so every position of the input gradient is checked
    # (a per-channel c would only see its spatial sums).
    trainable = {"c": normal(rng, *x_shape[1:], scale=0.3)}
    if bias:
        trainable["b"] = normal(rng, w_shape[0])
    return Case([N("Add", ["x", "c"], ["h"]), N("Conv", ["h", "w", *(["b"] if bias else [])], ["out"], **attrs)],
                {"x": normal(rng, BATCH, *x_shape[1:])}, trainable, reference, frozen={"w": normal(rng, *w_shape, scale=0.5)})


case("Conv-stride2-pad-dilation-groups")(lambda name: _conv_case(
    name, (0, 4, 10, 10), (6, 2, 3, 3), True, strides=[2, 2], pads=[1, 1, 1, 1], dilations=[2, 2], group=2))
case("Conv-asymmetric-pads-stride")(lambda name: _conv_case(
    name, (0, 3, 7, 8), (4, 3, 3, 2), True, strides=[2, 1], pads=[0, 1, 2, 1]))
case("Conv1d-depthwise-stride2-no-bias")(lambda name: _conv_case(
    name, (0, 3, 11), (3, 1, 3), False, strides=[2], pads=[1, 1], group=3))
case("Conv-plain")(lambda name: _conv_case(name, (0, 2, 5, 5), (3, 2, 3, 3), True))


# --- normalisation and reductions -------------------------------------------------------------

def _layernorm_case(name, trainable_parts, axis=-1, with_bias=True):
    rng = rng_for(name)
    shape = (BATCH, 3, 4)
    norm_shape = shape[axis % 3:]
    values = {"c": normal(rng, 4, scale=0.5), "scale": uniform(rng, 0.5, 1.5, *norm_shape), "bias": normal(rng, *norm_shape)}
    trainable = {k: v for k, v in values.items() if k in trainable_parts}
    frozen = {k: v for k, v in values.items() if k not in trainable_parts and (with_bias or k != "bias")}
    return Case([N("Add", ["x", "c"], ["h"]),
                 N("LayerNormalization", ["h", "scale", *(["bias"] if with_bias else [])], ["out"], axis=axis, epsilon=1e-5)],
                {"x": normal(rng, BATCH, 3, 4)}, trainable,
                lambda t: F.layer_norm(t["x"] + t["c"], norm_shape, t["scale"], t.get("bias"), eps=1e-5), frozen=frozen)


case("LayerNormalization-bias")(lambda name: _layernorm_case(name, {"bias"}))
case("LayerNormalization-scale")(lambda name: _layernorm_case(name, {"scale"}))
case("LayerNormalization-input")(lambda name: _layernorm_case(name, {"c"}))
case("LayerNormalization-all-axis1")(lambda name: _layernorm_case(name, {"c", "scale", "bias"}, axis=1))
case("LayerNormalization-input-no-bias")(lambda name: _layernorm_case(name, {"c", "scale"}, with_bias=False))

for _op, _fn in (("Softmax", torch.softmax), ("LogSoftmax", torch.log_softmax)):
    for _axis in (-1, 1):
        @case(f"{_op}-axis{_axis}")
        def _(name, op=_op, fn=_fn, axis=_axis):
            rng = rng_for(name)
            return Case([N("Add", ["x", "b"], ["h"]), N(op, ["h"], ["out"], axis=axis)], {"x": normal(rng, BATCH, 3, 4)},
                        {"b": normal(rng, 3, 4)}, lambda t: fn(t["x"] + t["b"], dim=axis))


def _reduce_case(name, op, axes, keepdims, opset=17, as_input=True):
    rng = rng_for(name)
    frozen, inputs, attrs = {}, ["h"], {"keepdims": keepdims}
    if axes is not None:
        if as_input:
            frozen["axes"] = i64(axes)
            inputs.append("axes")
        else:
            attrs["axes"] = axes
    fn = torch.sum if op == "ReduceSum" else torch.mean

    def reference(t):
        h = t["x"] + t["b"]
        return fn(h, dim=tuple(axes), keepdim=bool(keepdims)) if axes is not None else (
            fn(h).reshape([1] * 3) if keepdims else fn(h))
    return Case([N("Add", ["x", "b"], ["h"]), N(op, inputs, ["out"], **attrs)],
                {"x": normal(rng, BATCH, 3, 4)}, {"b": normal(rng, 3, 1)}, reference,
                frozen=frozen, opset=opset)


case("ReduceSum-axes-input-keepdims1")(lambda name: _reduce_case(name, "ReduceSum", [1], 1))
case("ReduceSum-axes-input-keepdims0-negative")(lambda name: _reduce_case(name, "ReduceSum", [-1], 0))
case("ReduceSum-two-axes-keepdims0")(lambda name: _reduce_case(name, "ReduceSum", [0, 2], 0))
case("ReduceSum-all-axes-keepdims0")(lambda name: _reduce_case(name, "ReduceSum", None, 0))
case("ReduceMean-axes-attr-keepdims1")(lambda name: _reduce_case(name, "ReduceMean", [2], 1, as_input=False))
case("ReduceMean-axes-attr-keepdims0")(lambda name: _reduce_case(name, "ReduceMean", [1, 2], 0, as_input=False))
case("ReduceMean-axes-input-opset18-keepdims0")(lambda name: _reduce_case(name, "ReduceMean", [1], 0, opset=18))
case("ReduceMean-axes-input-opset18-keepdims1")(lambda name: _reduce_case(name, "ReduceMean", [-2, -1], 1, opset=18))
case("ReduceMean-all-axes-keepdims1")(lambda name: _reduce_case(name, "ReduceMean", None, 1))


@case("GlobalAveragePool")
def _(name):
    rng = rng_for(name)
    return Case([N("Add", ["x", "b"], ["h"]), N("GlobalAveragePool", ["h"], ["out"])], {"x": normal(rng, BATCH, 3, 4, 5)},
                {"b": normal(rng, 3, 1, 1)}, lambda t: (t["x"] + t["b"]).mean(dim=(2, 3), keepdim=True))


# --- data movement ---------------------------------------------------------------------------

for _perm in ([0, 2, 1], [2, 0, 1], None):
    @case(f"Transpose-{'default' if _perm is None else ''.join(map(str, _perm))}")
    def _(name, perm=_perm):
        rng = rng_for(name)
        attrs = {} if perm is None else {"perm": perm}
        return Case([N("Add", ["x", "b"], ["h"]), N("Transpose", ["h"], ["out"], **attrs)], {"x": normal(rng, BATCH, 3, 4)},
                    {"b": normal(rng, 3, 1)}, lambda t: (t["x"] + t["b"]).permute(*(perm or [2, 1, 0])))


@case("Concat-axis1")
def _(name):  # the middle piece has no trainable upstream
    rng = rng_for(name)
    return Case([N("Add", ["x", "b"], ["h1"]), N("Mul", ["y", "w"], ["h2"]), N("Concat", ["h1", "z", "h2"], ["out"], axis=1)],
                {"x": normal(rng, BATCH, 3, 4), "y": normal(rng, BATCH, 2, 4), "z": normal(rng, BATCH, 1, 4)},
                {"b": normal(rng, 4), "w": normal(rng, 2, 1)},
                lambda t: torch.cat([t["x"] + t["b"], t["z"], t["y"] * t["w"]], dim=1))


@case("Concat-negative-axis")
def _(name):
    rng = rng_for(name)
    return Case([N("Add", ["x", "b"], ["h1"]), N("Mul", ["h1", "w"], ["h2"]), N("Concat", ["h2", "h1"], ["out"], axis=-1)],
                {"x": normal(rng, BATCH, 3, 4)}, {"b": normal(rng, 4), "w": normal(rng, 3, 1)},
                lambda t: torch.cat([(t["x"] + t["b"]) * t["w"], t["x"] + t["b"]], dim=-1))


def _split_reference(pieces):
    return torch.cat([pieces[0] * pieces[0], torch.tanh(pieces[1])], dim=1)


@case("Split-sizes-input-both-used")
def _(name):
    rng = rng_for(name)
    return Case([N("Add", ["x", "b"], ["h"]), N("Split", ["h", "sizes"], ["s0", "s1"], axis=1),
                 N("Mul", ["s0", "s0"], ["q"]), N("Tanh", ["s1"], ["r"]), N("Concat", ["q", "r"], ["out"], axis=1)],
                {"x": normal(rng, BATCH, 5, 4)}, {"b": normal(rng, 5, 1)},
                lambda t: _split_reference(torch.split(t["x"] + t["b"], [2, 3], dim=1)),
                frozen={"sizes": i64([2, 3])})


@case("Split-one-output-unused")
def _(name):  # the unused piece gets zeros
    rng = rng_for(name)
    return Case([N("Add", ["x", "b"], ["h"]), N("Split", ["h", "sizes"], ["s0", "s1", "s2"], axis=-1),
                 N("Mul", ["s0", "s2"], ["out"])],
                {"x": normal(rng, BATCH, 3, 6)}, {"b": normal(rng, 6)},
                lambda t: (lambda s: s[0] * s[2])(torch.split(t["x"] + t["b"], [2, 2, 2], dim=-1)),
                frozen={"sizes": i64([2, 2, 2])})


@case("Split-num-outputs-opset18")
def _(name):
    rng = rng_for(name)
    return Case([N("Add", ["x", "b"], ["h"]), N("Split", ["h"], ["s0", "s1"], axis=2, num_outputs=2), N("Sub", ["s0", "s1"], ["d"]),
                 N("Mul", ["d", "s0"], ["out"])],
                {"x": normal(rng, BATCH, 3, 4)}, {"b": normal(rng, 4)},
                lambda t: (lambda s: (s[0] - s[1]) * s[0])(torch.split(t["x"] + t["b"], 2, dim=2)), opset=18)


def _slice_case(name, starts, ends, axes, python_slice):
    rng = rng_for(name)
    frozen = {"starts": i64(starts), "ends": i64(ends)}
    inputs = ["h", "starts", "ends"]
    if axes is not None:
        frozen["axes"] = i64(axes)
        inputs.append("axes")
    return Case([N("Add", ["x", "b"], ["h"]), N("Slice", inputs, ["s"]), N("Tanh", ["s"], ["out"])],
                {"x": normal(rng, BATCH, 5, 6)}, {"b": normal(rng, 6)},
                lambda t: torch.tanh((t["x"] + t["b"])[python_slice]), frozen=frozen)


case("Slice-negative-start")(lambda name: _slice_case(name, [-3], [100], [1], np.s_[:, -3:]))
case("Slice-two-axes-negative")(lambda name: _slice_case(name, [1, -4], [4, -1], [1, 2], np.s_[:, 1:4, -4:-1]))
case("Slice-start-beyond-negative-extent")(lambda name: _slice_case(name, [-10], [3], [2], np.s_[:, :, :3]))
case("Slice-no-axes")(lambda name: _slice_case(name, [0, 2, 1], [1000, 5, 6], None, np.s_[:, 2:5, 1:6]))

INT64_MAX = np.iinfo(np.int64).max


def _runtime_slice_case(name, bounds: list[onnx.NodeProto], inputs: list[str], python_slice, frozen=None, steps=None):
    """Slice over ``h = x + b`` whose bounds ``bounds`` compute from ``Shape(h)`` at run time
    (``dim0`` .. ``dim2``: 1-D extents); ``python_slice(h)`` is the same slice in torch."""
    rng = rng_for(name)
    frozen = {**(frozen or {}), **{f"i{k}": i64([k]) for k in range(4)}, "rows": i64(2)}
    shape = [N("Shape", ["h"], ["shape"])] + [N("Slice", ["shape", f"i{k}", f"i{k + 1}"], [f"dim{k}"]) for k in range(3)]
    return Case([N("Add", ["x", "b"], ["h"]), *shape, *bounds, N("Slice", ["h", *inputs], ["s"]), N("Tanh", ["s"], ["out"])],
                {"x": normal(rng, BATCH, 5, 6)}, {"b": normal(rng, 6)},
                lambda t: torch.tanh(python_slice(t["x"] + t["b"])), frozen=frozen)


# Llama's rotate_half as the TorchScript exporter writes it: x[..., x.shape[-1] // 2:] with
# starts from Shape / Gather / Div, and ends, axes and steps each Unsqueeze(a scalar Constant).
case("Slice-runtime-start-rotate-half")(lambda name: _runtime_slice_case(
    name, [N("Gather", ["shape", "two"], ["last_dim"]), N("Div", ["last_dim", "rows"], ["half"]),
           N("Unsqueeze", ["half", "i0"], ["start"]), N("Constant", [], ["end0"], value=numpy_helper.from_array(i64(INT64_MAX))),
           N("Unsqueeze", ["end0", "i0"], ["end"]), N("Unsqueeze", ["two", "i0"], ["axis"]),
           N("Constant", [], ["one"], value=numpy_helper.from_array(i64(1))), N("Unsqueeze", ["one", "i0"], ["step"])],
    ["start", "end", "axis", "step"], lambda h: h[..., h.shape[-1] // 2:], frozen={"two": i64(2)}))
case("Slice-runtime-negative-start-and-end-int32")(lambda name: _runtime_slice_case(
    name, [N("Div", ["dim2", "rows"], ["half"]), N("Neg", ["half"], ["neg_half"]), N("Sub", ["i1", "dim2"], ["one_minus"]),
           N("Add", ["one_minus", "i4"], ["minus_one"]),
           N("Cast", ["neg_half"], ["start32"], to=TensorProto.INT32), N("Cast", ["minus_one"], ["end32"], to=TensorProto.INT32)],
    ["start32", "end32", "axis2"], lambda h: h[:, :, -3:-1], frozen={"axis2": np.array([2], np.int32), "i4": i64([4])}))
case("Slice-runtime-clamped-starts-and-ends-no-axes")(lambda name: _runtime_slice_case(
    name, [N("Mul", ["dim1", "minus3"], ["far_before"]), N("Mul", ["dim1", "hundred"], ["far_after"]),
           N("Concat", ["i0", "far_before", "i2"], ["starts"], axis=0), N("Concat", ["big", "far_after", "big"], ["ends"], axis=0)],
    ["starts", "ends"], lambda h: h[:, :, 2:], frozen={"minus3": i64([-3]), "hundred": i64([100]), "big": i64([INT64_MAX])}))
case("Slice-runtime-start-on-the-batch-axis")(lambda name: _runtime_slice_case(
    name, [N("Div", ["dim0", "rows"], ["half_batch"])], ["half_batch", "end", "i0"], lambda h: h[h.shape[0] // 2:],
    frozen={"end": i64([INT64_MAX])}))
case("Slice-runtime-axes-and-constant-steps")(lambda name: _runtime_slice_case(
    name, [N("Size", ["shape"], ["rank0"]), N("Unsqueeze", ["rank0", "i0"], ["rank"]), N("Sub", ["rank", "i1"], ["last_axis"])],
    ["i1", "five", "last_axis", "i1"], lambda h: h[:, :, 1:5], frozen={"five": i64([5])}))


@case("Slice-runtime-start-beyond-the-end-gives-an-empty-slice")
def _(name):  # starts 2 * dim > dim: clamped to dim, an empty slice whose gradient pads to zeros
    built = _runtime_slice_case(name, [N("Mul", ["dim2", "rows"], ["beyond"])], ["beyond", "end", "i2"], lambda h: h[:, :, 12:],
                                frozen={"end": i64([INT64_MAX])})
    built.nodes[-1] = N("Concat", ["s", "h"], ["out"], axis=2)
    built.torch_fn = lambda t: torch.cat([(t["x"] + t["b"])[:, :, 12:], t["x"] + t["b"]], 2)
    return built


def _gather(h: torch.Tensor, indices: np.ndarray, axis: int) -> torch.Tensor:
    """numpy-style ``take``: negative indices count from the end, the result has the indices' shape."""
    axis %= h.dim()
    index = torch.from_numpy(np.asarray(indices % h.shape[axis], np.int64)).reshape(-1)
    return torch.index_select(h, axis, index).reshape(*h.shape[:axis], *indices.shape, *h.shape[axis + 1:])


def _gather_case(name, indices, axis, opset=16):
    rng = rng_for(name)
    return Case([N("Add", ["x", "b"], ["h"]), N("Gather", ["h", "idx"], ["g"], axis=axis), N("Tanh", ["g"], ["out"])],
                {"x": normal(rng, BATCH, 5, 4)}, {"b": normal(rng, 5, 1)},
                lambda t: torch.tanh(_gather(t["x"] + t["b"], indices, axis)), frozen={"idx": indices}, opset=opset)


case("Gather-scalar-index")(lambda name: _gather_case(name, i64(2), 1))
case("Gather-1d-repeated-negative")(lambda name: _gather_case(name, i64([3, -1, 3]), 1))
case("Gather-2d-indices-last-axis")(lambda name: _gather_case(name, i64([[0, 2], [3, 3]]), -1, opset=17))
case("Gather-int32-indices")(lambda name: _gather_case(name, np.array([4, 0], np.int32), 1))


@case("Gather-trainable-table-by-input-ids")
def _(name):  # an embedding table that is itself trainable, ids from the input
    rng = rng_for(name)
    return Case([N("Gather", ["table", "ids"], ["e"]), N("Mul", ["e", "x"], ["out"])],
                {"ids": rng.integers(0, 6, (BATCH, 3)).astype(np.int64), "x": normal(rng, BATCH, 3, 4)},
                {"table": normal(rng, 6, 4)}, lambda t: t["table"][t["ids"]] * t["x"])


@case("Reshape-Flatten-Squeeze-Unsqueeze")
def _(name):
    rng = rng_for(name)
    return Case([N("Add", ["x", "b"], ["h"]), N("Reshape", ["h", "flat"], ["r"]), N("Unsqueeze", ["r", "one"], ["u"]),
                 N("Mul", ["u", "w"], ["m"]), N("Squeeze", ["m", "one"], ["s"]), N("Reshape", ["s", "back"], ["r2"]),
                 N("Flatten", ["r2"], ["out"], axis=2)],
                {"x": normal(rng, BATCH, 3, 4)}, {"b": normal(rng, 3, 1), "w": normal(rng, 12)},
                lambda t: ((t["x"] + t["b"]).reshape(-1, 1, 12) * t["w"]).reshape(-1, 6),
                frozen={"flat": i64([0, -1]), "one": i64([1]), "back": i64([-1, 2, 3, 2])})


@case("zero-gradient-off-the-path")
def _(name):  # w feeds nothing that reaches the output: its gradient is zeros
    rng = rng_for(name)
    return Case([N("Add", ["x", "b"], ["out"]), N("Mul", ["x", "w"], ["unused"])], {"x": normal(rng, BATCH, 4)},
                {"b": normal(rng, 4), "w": normal(rng, 4)}, lambda t: t["x"] + t["b"] + 0 * t["w"])


@pytest.mark.parametrize("name", [n for n in CASES if n != "zero-gradient-off-the-path"])
def test_rule_matches_torch_autograd(name):
    check_case(CASES[name]())


def test_a_trainable_off_the_path_gets_a_zero_gradient_and_is_named():
    built = CASES["zero-gradient-off-the-path"]()
    example = {k: v[:EXAMPLE_BATCH] for k, v in built.inputs.items()}
    models = build_portable_models(to_model(built, 2), ["b", "w"], loss="mse", example_inputs=example)
    assert models.stats["zero_gradient"] == ["w"]
    labels = np.zeros((EXAMPLE_BATCH, 4), np.float32)
    _, _, b_grad, w_grad = session(models.gradient).run(None, {**example, "labels": labels, **built.trainable})
    np.testing.assert_array_equal(w_grad, np.zeros(4, np.float32))
    np.testing.assert_allclose(b_grad, 2 * (example["x"] + built.trainable["b"]).mean(axis=0) / 4, rtol=1e-5)
    # Only the path to the loss is differentiated: the Mul feeding "unused" gets no backward node.
    backward = [n for n in models.gradient.graph.node if n.name.startswith("bitfit.grad/") and n.op_type == "Mul"]
    assert not any("x" in n.input for n in backward)


# --- the losses on a hand-built graph (the bundles' losses are in test_portable_export.py) ------

def _loss_case(loss: str, rng):
    out_shape = (BATCH, 4, 3) if loss == "token-cross-entropy" else (BATCH, 3)
    x = normal(rng, *out_shape)
    b = normal(rng, 3)
    graph = helper.make_graph([N("Add", ["x", "b"], ["logits"])], "loss",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *out_shape[1:]])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", *out_shape[1:]])],
                              [numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if loss == "cross-entropy":
        labels = rng.integers(0, 3, BATCH).astype(np.int64)
        fn = lambda z, y: F.cross_entropy(z, y)  # noqa: E731
    elif loss == "token-cross-entropy":
        labels = rng.integers(0, 3, (BATCH, 4)).astype(np.int64)
        labels[0, 1:] = -100
        labels[3, 0] = -100
        fn = lambda z, y: F.cross_entropy(z.transpose(1, 2), y, ignore_index=-100)  # noqa: E731
    elif loss == "mse":
        labels = normal(rng, *out_shape)
        fn = F.mse_loss
    else:
        labels = (rng.random(out_shape) > 0.5).astype(np.float32)
        fn = F.binary_cross_entropy_with_logits
    return model, {"x": x}, labels, b, fn


@pytest.mark.parametrize("loss", ["cross-entropy", "token-cross-entropy", "mse", "bce-with-logits"])
def test_each_loss_and_its_seed_gradient_match_torch(loss):
    model, inputs, labels, b, fn = _loss_case(loss, rng_for(loss))
    models = build_portable_models(model, ["b"], loss=loss, example_inputs={"x": inputs["x"][:2]},
                                   ignore_index=-100 if loss == "token-cross-entropy" else None)
    got_loss, _, got_grad = session(models.gradient).run(None, {**inputs, "labels": labels, "b": b})
    bias = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    target = torch.from_numpy(labels if labels.dtype == np.int64 else labels.astype(np.float64))
    expected = fn(torch.from_numpy(inputs["x"].astype(np.float64)) + bias, target)
    expected.backward()
    assert float(got_loss) == pytest.approx(expected.item(), rel=1e-5)
    np.testing.assert_allclose(got_grad, bias.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_token_loss_of_an_all_ignored_batch_is_zero_with_zero_gradients():
    model, inputs, labels, b, _ = _loss_case("token-cross-entropy", rng_for("token-cross-entropy"))
    models = build_portable_models(model, ["b"], loss="token-cross-entropy", example_inputs={"x": inputs["x"][:2]},
                                   ignore_index=-100)
    loss, _, grad = session(models.gradient).run(None, {**inputs, "labels": np.full_like(labels, -100), "b": b})
    assert float(loss) == 0.0
    np.testing.assert_array_equal(grad, np.zeros_like(b))


# --- refusals ----------------------------------------------------------------------------------

def _simple_model(nodes, opset=17, domain_opsets=(), inits=None):
    inits = inits or {"b": np.zeros(4, np.float32)}
    graph = helper.make_graph(nodes, "refuse", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *domain_opsets])


EXAMPLE = {"x": np.ones((2, 4), np.float32)}


@pytest.mark.parametrize("op, attrs", [("Hardmax", {}), ("Mod", {"fmod": 1})])
def test_an_op_without_a_rule_on_the_path_is_refused_naming_it(op, attrs):
    inputs = ["h", "b"] if op == "Mod" else ["h"]
    model = _simple_model([N("Add", ["x", "b"], ["h"]), N(op, inputs, ["out"], **attrs)])
    with pytest.raises(NoPortableModel, match=rf"no portable gradient rule for ops on the training path: {op} x1"):
        build_portable_models(model, ["b"], loss="mse", example_inputs=EXAMPLE)


def test_an_op_without_a_rule_off_the_path_is_fine():
    """Hardmax reads only the input: no gradient flows through it, so it needs no rule."""
    model = _simple_model([N("Hardmax", ["x"], ["hx"]), N("Add", ["hx", "b"], ["out"])])
    models = build_portable_models(model, ["b"], loss="mse", example_inputs=EXAMPLE)
    x = np.array([[0.0, 3.0, 1.0, 2.0], [5.0, 1.0, 0.0, 0.0]], np.float32)
    labels = np.zeros((2, 4), np.float32)
    _, out, grad = session(models.gradient).run(None, {"x": x, "labels": labels, "b": np.full(4, 0.5, np.float32)})
    np.testing.assert_array_equal(out, np.eye(4, dtype=np.float32)[[1, 0]] + 0.5)
    np.testing.assert_allclose(grad, (2 * out / 8).sum(axis=0), rtol=1e-6)


@pytest.mark.parametrize("opset", [11, 12])
def test_an_opset_below_13_is_refused_with_its_reason(opset):
    model = _simple_model([N("Add", ["x", "b"], ["out"])], opset=opset)
    with pytest.raises(NoPortableModel, match=rf"uses opset {opset}; a portable training model needs opset >= 13 \(re-export"):
        build_portable_models(model, ["b"], loss="mse", example_inputs=EXAMPLE)


def test_gather_on_the_path_below_opset_16_is_refused():
    model = _simple_model([N("Add", ["x", "b"], ["h"]), N("Gather", ["h", "idx"], ["out"], axis=1)], opset=15,
                          inits={"b": np.zeros(4, np.float32), "idx": i64([0, 1, 2, 3])})
    with pytest.raises(NoPortableModel, match="Gather .*needs opset >= 16"):
        build_portable_models(model, ["b"], loss="mse", example_inputs=EXAMPLE)


def test_non_standard_ops_are_refused():
    model = _simple_model([N("Add", ["x", "b"], ["h"]), N("FastGelu", ["h"], ["out"], domain="com.microsoft")],
                          domain_opsets=[helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(NoPortableModel, match=r"non-standard ops \['com.microsoft.FastGelu'\]"):
        build_portable_models(model, ["b"], loss="mse", example_inputs=EXAMPLE)


def test_a_trainable_convolution_weight_is_refused():
    graph = helper.make_graph([N("Reshape", ["x", "shape"], ["x4"]), N("Conv", ["x4", "w"], ["c"]), N("Flatten", ["c"], ["out"])],
                              "refuse", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4])],
                              [numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w"),
                               numpy_helper.from_array(i64([-1, 4, 1, 1]), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(NoPortableModel, match="a trainable convolution weight has no portable gradient rule"):
        build_portable_models(model, ["w"], loss="mse", example_inputs=EXAMPLE)


def test_a_trained_exponent_is_refused():
    model = _simple_model([N("Pow", ["x", "b"], ["out"])])
    with pytest.raises(NoPortableModel, match="non-constant exponent"):
        build_portable_models(model, ["b"], loss="mse", example_inputs=EXAMPLE)


def test_a_trainable_name_that_is_not_an_initializer_is_refused():
    model = _simple_model([N("Add", ["x", "b"], ["out"])])
    with pytest.raises(NoPortableModel, match=r"trainable tensors \['nope'\] are not initializers"):
        build_portable_models(model, ["nope"], loss="mse", example_inputs=EXAMPLE)



def test_a_slice_with_steps_computed_at_run_time_is_refused():
    built = _runtime_slice_case("steps", [N("Sub", ["dim1", "i4"], ["step"])], ["i0", "big", "i1", "step"], lambda h: h,
                                frozen={"big": i64([INT64_MAX]), "i4": i64([4])})
    example = {k: v[:EXAMPLE_BATCH] for k, v in built.inputs.items()}
    with pytest.raises(NoPortableModel, match="steps computed at run time"):
        build_portable_models(to_model(built, 3), list(built.trainable), loss="mse", example_inputs=example)


def test_torch_gelu_pattern_gets_the_shorter_closed_form():
    """The closed form for torch's erf GELU needs fewer backward nodes than the chain rule
    over the same graph with another constant (which is not GELU)."""
    def backward_nodes(name):
        built = CASES[name]()
        example = {k: v[:EXAMPLE_BATCH] for k, v in built.inputs.items()}
        models = build_portable_models(to_model(built, 3), ["b"], loss="mse", example_inputs=example)
        return models.stats["gradient_nodes"] - models.stats["eval_nodes"]

    assert backward_nodes("Gelu-torch-erf-pattern-div") < backward_nodes("Gelu-lookalike-other-constant")
