"""Graph repairs for onnxruntime-training 1.19.2 and structural bias discovery, on small
hand-built ONNX graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bitfit.export.biases import BiasUse, bias_uses_by_name, cross_check, find_biases, find_head_weight
from bitfit.export.repairs import (
    MAX_IR_VERSION,
    add_dropout_mask_outputs,
    add_layernorm_stat_outputs,
    cap_ir_version,
    ensure_named_nodes,
    freeze_batchnorm_statistics,
    refuse_unsupported,
    repair_for_training,
    split_shared_biases,
)
from bitfit.sdk.errors import UnsupportedModelError
from bitfit.sdk.runtime import ort

F = TensorProto.FLOAT


def model_of(nodes, inputs, outputs, inits, ir_version: int = 8) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = ir_version
    return model


def vi(name, shape, dtype=F):
    return helper.make_tensor_value_info(name, dtype, shape)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs=None) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(outputs, feeds)


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --- LayerNormalization / Dropout optional outputs -------------------------------------------


def layernorm_model() -> onnx.ModelProto:
    return model_of([helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], name="ln", axis=-1, epsilon=1e-5)],
                    [vi("x", [2, 4])], [vi("y", [2, 4])], {"s": rand(4, seed=1), "b": rand(4, seed=2)})


def test_layernorm_gets_mean_and_inv_std_outputs_without_changing_y():
    model = layernorm_model()
    x = rand(2, 4)
    before = run(model, {"x": x})[0]
    assert add_layernorm_stat_outputs(model) == ["ln"]
    assert list(model.graph.node[0].output) == ["y", "ln.__mean", "ln.__inv_std_dev"]
    onnx.checker.check_model(model)
    model.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in ("ln.__mean", "ln.__inv_std_dev"))
    y, mean, inv_std = run(model, {"x": x}, ["y", "ln.__mean", "ln.__inv_std_dev"])
    np.testing.assert_allclose(y, before, atol=1e-6)
    np.testing.assert_allclose(mean.ravel(), x.mean(-1), atol=1e-6)
    np.testing.assert_allclose(inv_std.ravel(), 1 / np.sqrt(x.var(-1) + 1e-5), rtol=1e-4)
    assert add_layernorm_stat_outputs(model) == []  # idempotent


def test_layernorm_with_all_outputs_is_left_alone():
    model = model_of([helper.make_node("LayerNormalization", ["x", "s", "b"], ["y", "m", "i"], name="ln")],
                     [vi("x", [2, 4])], [vi("y", [2, 4])], {"s": rand(4), "b": rand(4)})
    assert add_layernorm_stat_outputs(model) == []
    assert list(model.graph.node[0].output) == ["y", "m", "i"]


def test_dropout_gets_its_mask_output():
    model = model_of([helper.make_node("Dropout", ["x"], ["y"], name="drop"), helper.make_node("Dropout", ["y"], ["z", "m"], name="d2")],
                     [vi("x", [2, 4])], [vi("z", [2, 4])], {})
    assert add_dropout_mask_outputs(model) == ["drop"]
    assert list(model.graph.node[0].output) == ["y", "drop.__mask"]
    assert list(model.graph.node[1].output) == ["z", "m"]
    onnx.checker.check_model(model)
    x = rand(2, 4)
    np.testing.assert_array_equal(run(model, {"x": x})[0], x)  # inference mode: identity
    assert add_dropout_mask_outputs(model) == []


# --- IR version -------------------------------------------------------------------------------


def test_cap_ir_version_lowers_14_to_10():
    model = layernorm_model()
    model.ir_version = 14
    assert cap_ir_version(model) is True
    assert model.ir_version == MAX_IR_VERSION == 10


@pytest.mark.parametrize("version", [7, 8, 10])
def test_cap_ir_version_keeps_older_versions(version):
    model = layernorm_model()
    model.ir_version = version
    assert cap_ir_version(model) is False
    assert model.ir_version == version


def test_repair_for_training_reports_every_repair():
    model = model_of([helper.make_node("LayerNormalization", ["x", "s", "b"], ["h"]),  # unnamed: gets a name
                      helper.make_node("Dropout", ["h"], ["y"])],
                     [vi("x", [2, 4])], [vi("y", [2, 4])], {"s": rand(4), "b": rand(4)}, ir_version=14)
    report = repair_for_training(model)
    assert report == {"layernorm_stat_outputs": ["LayerNormalization_0"], "dropout_mask_outputs": ["Dropout_1"],
                      "batchnorm_frozen_statistics": [], "ir_version_capped": ["10"]}
    assert model.ir_version == 10
    onnx.checker.check_model(model)


def test_ensure_named_nodes_makes_names_unique():
    model = model_of([helper.make_node("Relu", ["x"], ["a"], name="n"), helper.make_node("Relu", ["a"], ["b"], name="n"),
                      helper.make_node("Relu", ["b"], ["y"])], [vi("x", [1])], [vi("y", [1])], {})
    ensure_named_nodes(model)
    assert [n.name for n in model.graph.node] == ["n", "Relu_1", "Relu_2"]


# --- BatchNormalization with frozen statistics ----------------------------------------------------


@pytest.mark.parametrize("shape", [[3, 4], [3, 4, 5], [3, 4, 5, 6]])
def test_frozen_batchnorm_computes_the_same_as_batchnorm(shape):
    c = shape[1]
    inits = {"scale": rand(c, seed=1), "bias": rand(c, seed=2), "mean": rand(c, seed=3),
             "var": np.abs(rand(c, seed=4)) + 0.5}
    model = model_of([helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"], name="bn", epsilon=1e-3)],
                     [vi("x", ["n", *shape[1:]])], [vi("y", ["n", *shape[1:]])], inits)
    x = rand(*shape, seed=5)
    expected = run(model, {"x": x})[0]
    assert freeze_batchnorm_statistics(model) == ["bn"]
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}
    # No new initializers (every initializer must be a base weight), and the bias still
    # feeds the graph on its own.
    assert sorted(i.name for i in model.graph.initializer) == ["bias", "mean", "scale", "var"]
    assert sum("bias" in n.input for n in model.graph.node) == 1
    onnx.checker.check_model(model)
    np.testing.assert_allclose(run(model, {"x": x})[0], expected, atol=1e-5)
    assert freeze_batchnorm_statistics(model) == []


def test_training_mode_batchnorm_is_left_alone():
    c = 4
    inits = {"scale": rand(c), "bias": rand(c), "mean": rand(c), "var": np.ones(c, np.float32)}
    model = model_of([helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y", "rm", "rv"],
                                       name="bn", training_mode=1)], [vi("x", [2, c])], [vi("y", [2, c])], inits)
    assert freeze_batchnorm_statistics(model) == []
    assert model.graph.node[0].op_type == "BatchNormalization"


# --- shared biases -----------------------------------------------------------------------------


def two_gemms_sharing_a_bias(extra_use: bool = False) -> onnx.ModelProto:
    nodes = [helper.make_node("Gemm", ["x", "w1", "b"], ["h"], name="g1", transB=1),
             helper.make_node("Gemm", ["h", "w2", "b"], ["y"], name="g2", transB=1)]
    outputs = [vi("y", ["n", 4])]
    if extra_use:
        nodes.append(helper.make_node("Mul", ["y", "b"], ["z"], name="mul"))
        outputs = [vi("z", ["n", 4])]
    return model_of(nodes, [vi("x", ["n", 4])], outputs, {"w1": rand(4, 4, seed=1), "w2": rand(4, 4, seed=2), "b": rand(4, seed=3)})


def test_split_shared_biases_gives_each_use_its_own_copy():
    model = two_gemms_sharing_a_bias()
    x = rand(3, 4)
    before = run(model, {"x": x})[0]
    uses = bias_uses_by_name(find_biases(model))
    assert uses["b"] == [BiasUse("g1", "Gemm", 2), BiasUse("g2", "Gemm", 2)]
    copies = split_shared_biases(model, ["b"], uses)
    assert copies == {"b": ["b.__copy1"]}
    assert [n.input[2] for n in model.graph.node] == ["b", "b.__copy1"]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    np.testing.assert_array_equal(inits["b.__copy1"], inits["b"])
    np.testing.assert_array_equal(run(model, {"x": x})[0], before)
    assert {b.name for b in find_biases(model)} == {"b", "b.__copy1"}


def test_split_shared_biases_ignores_frozen_and_single_use_biases():
    model = two_gemms_sharing_a_bias()
    uses = bias_uses_by_name(find_biases(model))
    assert split_shared_biases(model, [], uses) == {}  # "b" is not trainable: stays shared
    assert [n.input[2] for n in model.graph.node] == ["b", "b"]
    single = layernorm_model()
    assert split_shared_biases(single, ["b"], bias_uses_by_name(find_biases(single))) == {}


def test_split_shared_biases_refuses_a_bias_also_used_as_data():
    model = two_gemms_sharing_a_bias(extra_use=True)
    with pytest.raises(UnsupportedModelError, match="bias b is also used as a non-bias input"):
        split_shared_biases(model, ["b"], bias_uses_by_name(find_biases(model)))


# --- bias discovery ----------------------------------------------------------------------------


def every_kind_model() -> onnx.ModelProto:
    """Conv -> BatchNorm -> flatten -> Gemm -> LayerNorm -> MatMul + bias (bias on the left) -> out."""
    nodes = [
        helper.make_node("Conv", ["img", "k", "conv.bias"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["cb"], name="bn"),
        helper.make_node("ReduceMean", ["cb"], ["pooled"], name="pool", axes=[2, 3], keepdims=0),
        helper.make_node("Gemm", ["pooled", "fc.weight", "fc.bias"], ["f"], name="fc", transB=1),
        helper.make_node("LayerNormalization", ["f", "ln.weight", "ln.bias"], ["n"], name="ln"),
        helper.make_node("MatMul", ["n", "out.weight"], ["m"], name="out.matmul"),
        helper.make_node("Add", ["out.bias", "m"], ["logits"], name="out.add"),
        helper.make_node("Add", ["logits", "not.a.bias"], ["shifted"], name="plain.add"),  # Add after Add: not a bias
    ]
    inits = {"k": rand(2, 3, 3, 3), "conv.bias": rand(2), "bn.scale": rand(2), "bn.bias": rand(2), "bn.mean": rand(2),
             "bn.var": np.ones(2, np.float32), "fc.weight": rand(5, 2), "fc.bias": rand(5),
             "ln.weight": rand(5), "ln.bias": rand(5), "out.weight": rand(5, 3), "out.bias": rand(3), "not.a.bias": rand(3)}
    return model_of(nodes, [vi("img", ["n", 3, 4, 4])], [vi("logits", ["n", 3])], inits)


def test_find_biases_finds_every_kind_in_graph_order():
    model = every_kind_model()
    onnx.checker.check_model(model)
    found = [(b.name, b.kind, b.shape) for b in find_biases(model)]
    assert found == [("conv.bias", "conv", (2,)), ("bn.bias", "batchnorm", (2,)), ("fc.bias", "gemm", (5,)),
                     ("ln.bias", "layernorm", (5,)), ("out.bias", "matmul-add", (3,))]
    out = next(b for b in find_biases(model) if b.name == "out.bias")
    assert out.uses == (BiasUse("out.add", "Add", 0),)


def test_find_biases_skips_non_initializers_and_non_vectors():
    nodes = [helper.make_node("Gemm", ["x", "w", "b2d"], ["h"], name="g2d", transB=1),   # 2-D C: not a bias vector
             helper.make_node("Gemm", ["h", "w", "dyn"], ["y"], name="gdyn", transB=1)]  # C is a graph input
    model = model_of(nodes, [vi("x", ["n", 4]), vi("dyn", [4])], [vi("y", ["n", 4])], {"w": rand(4, 4), "b2d": rand(1, 4)})
    assert find_biases(model) == []


def test_find_head_weight():
    assert find_head_weight(every_kind_model()) == "out.weight"
    gemm_head = model_of([helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="a", transB=1),
                          helper.make_node("Relu", ["h"], ["r"], name="relu"),
                          helper.make_node("Gemm", ["r", "head.w", "head.b"], ["y"], name="head", transB=1)],
                         [vi("x", ["n", 4])], [vi("y", ["n", 2])], {"w1": rand(4, 4), "b1": rand(4), "head.w": rand(2, 4), "head.b": rand(2)})
    assert find_head_weight(gemm_head) == "head.w"
    conv_only = model_of([helper.make_node("Conv", ["img", "k", "kb"], ["y"], name="conv")], [vi("img", ["n", 3, 4, 4])],
                         [vi("y", ["n", 2, 2, 2])], {"k": rand(2, 3, 3, 3), "kb": rand(2)})
    assert find_head_weight(conv_only) is None


def test_cross_check_reports_framework_biases_the_graph_does_not_use_as_biases():
    model = every_kind_model()
    names = ["conv.bias", "fc.bias", "unused.bias", "fc.weight", "bias"]
    assert cross_check(find_biases(model), names) == ["unused.bias", "bias"]
    assert cross_check(find_biases(model), None) == []


def test_refuse_unsupported_names_the_ops():
    model = model_of([helper.make_node("Loop", ["n", "c"], ["y"], body=helper.make_graph([], "b", [], []))],
                     [vi("n", [], TensorProto.INT64), vi("c", [], TensorProto.BOOL)], [vi("y", [1])], {})
    with pytest.raises(UnsupportedModelError, match="the graph uses Loop, which ONNX Runtime training cannot differentiate"):
        refuse_unsupported(model)
    refuse_unsupported(every_kind_model())  # a plain float graph passes
