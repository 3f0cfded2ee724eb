"""Trainable-set policies: all-biases, paper-subset, +head, include/exclude regexes, and
every way a policy is refused."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import tiny_models as tm
from bitfit.export import POLICIES, export_bundle, find_biases, select_trainable
from bitfit.export.sources import from_torch
from bitfit.sdk.errors import ExportError, PolicyError, UnsupportedModelError
from bitfit.sdk.trainer import TrainingSession

QUERY = "inner.bert.encoder.layer.{}.attention.self.query.bias"
FF1 = "inner.bert.encoder.layer.{}.intermediate.dense.bias"
PAPER = [QUERY.format(0), FF1.format(0), QUERY.format(1), FF1.format(1)]
HEAD = "inner.classifier.weight"


@pytest.fixture(scope="module")
def bert():
    model, inputs = tm.tiny_bert_classifier()
    return model, inputs, from_torch(model, inputs).model


@pytest.fixture(scope="module")
def bert_biases(bert):
    return find_biases(bert[2])


def test_every_listed_policy_selects_its_own_set(bert, bert_biases):
    # Every name in POLICIES is accepted and means something different: the paper subset is a
    # strict part of all biases, and "+head" adds the classifier weight to either.
    selections = {policy: select_trainable(bert[2], bert_biases, policy) for policy in POLICIES}
    assert set(POLICIES) == {"all-biases", "paper-subset", "all-biases+head", "paper-subset+head"}
    everything, paper = set(selections["all-biases"].names), set(selections["paper-subset"].names)
    assert paper < everything and paper
    for base in ("all-biases", "paper-subset"):
        plain, head = selections[base], selections[f"{base}+head"]
        assert plain.head_weight is None and head.head_weight == "inner.classifier.weight"
        assert set(head.names) == set(plain.names) | {"inner.classifier.weight"}


def test_all_biases_selects_every_bias_in_graph_order(bert, bert_biases):
    model, _, graph = bert
    selection = select_trainable(graph, bert_biases, "all-biases")
    assert set(selection.names) == set(tm.bias_names(model))
    assert len(selection.names) == 19
    assert selection.head_weight is None
    assert selection.names[0] == "inner.bert.embeddings.LayerNorm.bias"
    assert selection.names[-1] == "inner.classifier.bias"


def test_paper_subset_selects_query_and_first_feed_forward_biases(bert, bert_biases):
    selection = select_trainable(bert[2], bert_biases, "paper-subset")
    assert selection.names == PAPER


def test_paper_subset_plus_head_finds_the_classifier_weight(bert, bert_biases):
    selection = select_trainable(bert[2], bert_biases, "paper-subset+head")
    assert selection.names == [*PAPER, HEAD]
    assert selection.head_weight == HEAD


def test_paper_subset_export(bert, tmp_path, check_bundle):
    model, inputs, _ = bert
    bundle = export_bundle(model, tmp_path / "b", example_inputs=inputs, policy="paper-subset")
    check_bundle(bundle, trainable=PAPER)
    m = bundle.manifest
    assert m.policy["name"] == "paper-subset"
    assert m.policy["trainable_values"] == 2 * (32 + 64)
    assert m.per_row is True
    assert m.validation["one_step_trainable_changed"] == 4


def test_paper_subset_plus_head_export(bert, tmp_path, check_bundle):
    model, inputs, _ = bert
    bundle = export_bundle(model, tmp_path / "b", example_inputs=inputs, policy="paper-subset+head")
    check_bundle(bundle, trainable=[*PAPER, HEAD])
    m = bundle.manifest
    head = m.trainable[-1]
    assert (head.name, head.role, head.shape, head.inference_shape) == (HEAD, "head-weight", [3, 32], [3, 32])
    assert all(t.role == "bias" for t in m.trainable[:-1])
    # A [classes, hidden] matrix cannot take a per-row value: the bundle says so.
    assert m.per_row is False
    assert HEAD in m.source["per_row_reason"] and "1-D" in m.source["per_row_reason"]
    assert m.policy["name"] == "paper-subset+head"
    assert m.policy["trainable_values"] == 2 * (32 + 64) + 3 * 32
    np.testing.assert_array_equal(bundle.base_weights([HEAD])[HEAD], model.inner.classifier.weight.detach().numpy())


def test_all_biases_plus_head_trains_the_head_weight(tmp_path, check_bundle):
    model, inputs = tm.mlp()
    bundle = export_bundle(model, tmp_path / "b", example_inputs=inputs, policy="all-biases+head")
    check_bundle(bundle, trainable=["0.bias", "2.bias", "4.bias", "4.weight"])
    m = bundle.manifest
    assert [t.role for t in m.trainable] == ["bias", "bias", "bias", "head-weight"]
    assert m.per_row is False and "4.weight" in m.source["per_row_reason"]
    assert m.validation["one_step_trainable_changed"] == 4
    trainer = TrainingSession(bundle, learning_rate=0.1)
    before = trainer.parameter_values(["2.weight", "4.weight"])
    trainer.train_step({"x": inputs["x"].numpy()}, np.array([0, 1], np.int64))
    after = trainer.parameter_values(["2.weight", "4.weight"])
    assert not np.array_equal(before["4.weight"], after["4.weight"])
    np.testing.assert_array_equal(before["2.weight"], after["2.weight"])


def test_include_and_exclude_regexes(bert, tmp_path, check_bundle):
    model, inputs, _ = bert
    include, exclude = [r"LayerNorm\.weight$"], [r"attention\.output\.LayerNorm"]
    bundle = export_bundle(model, tmp_path / "b", example_inputs=inputs, include=include, exclude=exclude)
    biases = [n for n in tm.bias_names(model) if "attention.output.LayerNorm" not in n]
    norm_weights = ["inner.bert.embeddings.LayerNorm.weight", "inner.bert.encoder.layer.0.output.LayerNorm.weight",
                    "inner.bert.encoder.layer.1.output.LayerNorm.weight"]
    check_bundle(bundle, trainable=biases + norm_weights)
    m = bundle.manifest
    assert (m.policy["include"], m.policy["exclude"]) == (include, exclude)
    roles = {t.name: t.role for t in m.trainable}
    assert {roles[n] for n in norm_weights} == {"other"}
    assert {roles[n] for n in biases} == {"bias"}
    # A LayerNorm scale is not a bias: the per-row rewrite only handles biases.
    assert m.per_row is False and m.source["per_row_reason"]


def test_exclude_only(bert, bert_biases):
    selection = select_trainable(bert[2], bert_biases, "all-biases", exclude=[r"LayerNorm", r"pooler"])
    assert len(selection.names) == 19 - 5 - 1
    assert not [n for n in selection.names if "LayerNorm" in n or "pooler" in n]


def test_include_adds_only_float_initializers():
    graph = _graph_with_head(extra_int=True)
    biases = find_biases(graph)
    selection = select_trainable(graph, biases, "all-biases", include=[r".*"])
    assert set(selection.names) == {"w", "b"}  # not the int64 "shape" initializer


# --- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["everything", "all-biases+tail", "head", ""])
def test_unknown_policy_is_refused_with_the_list_of_policies(policy, bert, bert_biases):
    with pytest.raises(PolicyError, match="unknown policy") as err:
        select_trainable(bert[2], bert_biases, policy)
    assert "all-biases, paper-subset, all-biases+head, paper-subset+head" in str(err.value)


@pytest.mark.parametrize("policy", ["everything", "all-biases+tail"])
def test_export_with_unknown_policy_writes_nothing(policy, tmp_path):
    model, inputs = tm.mlp()
    with pytest.raises(PolicyError, match=r"unknown policy .*use one of all-biases"):
        export_bundle(model, tmp_path / "b", example_inputs=inputs, policy=policy)
    assert list(tmp_path.iterdir()) == []


def test_include_matching_nothing_is_refused(tmp_path):
    model, inputs = tm.mlp()
    with pytest.raises(PolicyError, match="include regex 'nothing_here' matched no float initializer"):
        export_bundle(model, tmp_path / "b", example_inputs=inputs, include=["nothing_here"])
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("what", ["include", "exclude"])
def test_invalid_regex_is_refused(what, tmp_path):
    model, inputs = tm.mlp()
    with pytest.raises(PolicyError, match=rf"{what} regex '\(' is invalid"):
        export_bundle(model, tmp_path / "b", example_inputs=inputs, **{what: ["("]})
    assert not (tmp_path / "b").exists()


def test_excluding_everything_is_refused(bert, bert_biases):
    with pytest.raises(PolicyError, match="leave no trainable tensor"):
        select_trainable(bert[2], bert_biases, "all-biases", exclude=["bias"])


def test_paper_subset_without_matching_names_is_refused(tmp_path):
    model, inputs = tm.mlp()
    with pytest.raises(PolicyError, match="paper-subset matched no query or first feed-forward biases"):
        export_bundle(model, tmp_path / "b", example_inputs=inputs, policy="paper-subset")


def test_head_policy_without_a_head_is_refused():
    graph = _graph_without_head()
    with pytest.raises(PolicyError, match=r"\+head: no 2-D Gemm/MatMul weight feeds the first output"):
        select_trainable(graph, find_biases(graph), "all-biases+head")


def test_no_biases_is_an_unsupported_model_not_a_policy_error():
    graph = _graph_without_head()
    with pytest.raises(UnsupportedModelError, match="no biases"):
        select_trainable(graph, [], "all-biases")


def test_a_bad_policy_is_caught_as_export_error_and_as_value_error(tmp_path):
    # Callers catch a bad argument as ValueError and any export failure as ExportError: both work.
    model, inputs = tm.mlp()
    with pytest.raises(ValueError, match="unknown policy 'bogus'"):
        export_bundle(model, tmp_path / "a", example_inputs=inputs, policy="bogus")
    with pytest.raises(ExportError, match="include regex 'no-such-tensor' matched no float initializer"):
        export_bundle(model, tmp_path / "b", example_inputs=inputs, include=["no-such-tensor"])
    assert list(tmp_path.iterdir()) == []


def _graph_with_head(extra_int: bool = False) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.ones((4, 3), np.float32), "w"), numpy_helper.from_array(np.zeros(3, np.float32), "b")]
    if extra_int:
        inits.append(numpy_helper.from_array(np.array([1, 3], np.int64), "shape"))
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Add", ["h", "b"], ["y"], name="add")],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])], inits)
    return helper.make_model(g)


def _graph_without_head() -> onnx.ModelProto:
    """A 1x1 Conv with a bias feeding the output: biases, but no Gemm/MatMul head."""
    inits = [numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "k"), numpy_helper.from_array(np.zeros(2, np.float32), "kb")]
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "k", "kb"], ["y"], name="conv")], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2, 4, 4])], inits)
    return helper.make_model(g)
