"""Every input export_bundle refuses, with its error type and what the message says, and
the promise that a failed export leaves nothing half-written behind."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import tiny_models as tm
from bitfit.export import export_bundle
from bitfit.sdk.bundle import Bundle
from bitfit.sdk.errors import BitfitError, ExportError, ResourceExhaustedError, UnsupportedModelError, ValidationFailedError


def leftovers(parent) -> list[str]:
    """Work or swap directories an export left in ``parent``."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((".tmp-", ".old-")))


def save_model(graph: onnx.GraphProto, path, ir_version: int = 8) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def net_onnx(path) -> tuple[torch.nn.Module, dict]:
    model, inputs = tm.mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (inputs["x"],), str(path), dynamo=False, opset_version=17, do_constant_folding=False,
                          input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    return model, inputs


def test_export_failures_are_caught_as_export_error_and_reported_by_the_command(tmp_path, capsys, monkeypatch):
    # One `except ExportError` (and the command's `except BitfitError`) catches every kind of failure.
    import bitfit.export.pipeline as pipeline
    from bitfit.sdk.cli import main

    save_model(helper.make_graph([helper.make_node("Relu", ["x"], ["logits"])], "r",
                                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                                 [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])]),
               tmp_path / "r.onnx")
    with pytest.raises(ExportError) as err:
        export_bundle(tmp_path / "r.onnx", tmp_path / "b")
    assert type(err.value) is UnsupportedModelError and isinstance(err.value, BitfitError)
    assert main(["export", str(tmp_path / "r.onnx"), str(tmp_path / "b")]) == 2
    assert "bitfit: error: UnsupportedModelError:" in capsys.readouterr().err
    monkeypatch.setattr(pipeline, "validate_bundle", fail_validation)
    model, inputs = tm.mlp()
    with pytest.raises(ExportError) as err:
        export_bundle(model, tmp_path / "c", example_inputs=inputs)
    assert type(err.value) is ValidationFailedError
    assert list(tmp_path.iterdir()) == [tmp_path / "r.onnx"]


def test_model_without_biases(tmp_path):
    model, inputs = tm.no_bias_net()
    with pytest.raises(UnsupportedModelError, match="no biases") as err:
        export_bundle(model, tmp_path / "b", example_inputs=inputs)
    assert "bias=True" in str(err.value)  # says what to do
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("loss", ["hinge", "cross_entropy", "CE"])
def test_unknown_loss(loss, tmp_path):
    model, inputs = tm.mlp()
    with pytest.raises(ExportError, match=f"unknown loss '{loss}'") as err:
        export_bundle(model, tmp_path / "b", example_inputs=inputs, loss=loss)
    assert "use cross-entropy, mse, bce-with-logits, token-cross-entropy" in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("optimizer", ["lamb", "adam", "SGD"])
def test_unknown_optimizer(optimizer, tmp_path):
    model, inputs = tm.mlp()
    with pytest.raises(ExportError, match=f"unknown optimizer '{optimizer}': use adamw, sgd"):
        export_bundle(model, tmp_path / "b", example_inputs=inputs, optimizer=optimizer)
    assert list(tmp_path.iterdir()) == []


def test_dynamically_quantized_graph_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
        helper.make_node("MatMulInteger", ["xq", "wq", "xz", "wz"], ["acc"]),
        helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["accf", "xs"], ["scaled"]),
        helper.make_node("Mul", ["scaled", "ws"], ["h0"]),
        helper.make_node("MatMul", ["h0", "w2"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["logits"]),
    ]
    inits = [
        numpy_helper.from_array(rng.integers(0, 255, (4, 3)).astype(np.uint8), "wq"),
        numpy_helper.from_array(np.array(128, np.uint8), "wz"),
        numpy_helper.from_array(np.array(0.01, np.float32), "ws"),
        numpy_helper.from_array(rng.standard_normal((3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.zeros(3, np.float32), "b"),
    ]
    save_model(helper.make_graph(nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                                 [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], inits),
               tmp_path / "q.onnx")
    with pytest.raises(UnsupportedModelError, match="DynamicQuantizeLinear, MatMulInteger") as err:
        export_bundle(tmp_path / "q.onnx", tmp_path / "b")
    assert "cannot differentiate" in str(err.value) and "no dynamic quantization" in str(err.value)
    assert not (tmp_path / "b").exists() and leftovers(tmp_path) == []


def test_sequence_ops_are_refused(tmp_path):
    """What the dynamo exporter makes of torch.split without optimisation (pitfall 5)."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["hb"]),
        helper.make_node("SplitToSequence", ["hb", "split"], ["seq"], axis=1),
        helper.make_node("SequenceAt", ["seq", "zero"], ["logits"]),
    ]
    inits = [numpy_helper.from_array(np.ones((4, 6), np.float32), "w"), numpy_helper.from_array(np.zeros(6, np.float32), "b"),
             numpy_helper.from_array(np.array([3, 3], np.int64), "split"), numpy_helper.from_array(np.array(0, np.int64), "zero")]
    save_model(helper.make_graph(nodes, "s", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                                 [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], inits),
               tmp_path / "s.onnx")
    with pytest.raises(UnsupportedModelError, match="SequenceAt, SplitToSequence") as err:
        export_bundle(tmp_path / "s.onnx", tmp_path / "b")
    assert "dynamo=False" in str(err.value)


def test_half_precision_initializers_are_refused(tmp_path):
    nodes = [helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT), helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Add", ["h", "b"], ["logits"])]
    inits = [numpy_helper.from_array(np.ones((4, 3), np.float16), "w16"), numpy_helper.from_array(np.zeros(3, np.float32), "b")]
    save_model(helper.make_graph(nodes, "h", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                                 [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], inits),
               tmp_path / "h.onnx")
    with pytest.raises(UnsupportedModelError, match=r"\['w16'\] are not float32") as err:
        export_bundle(tmp_path / "h.onnx", tmp_path / "b")
    assert "Export the model in float32" in str(err.value)


def test_existing_out_dir_without_overwrite(tmp_path):
    model, inputs = tm.mlp()
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists: pass overwrite=True"):
        export_bundle(model, out, example_inputs=inputs)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert leftovers(tmp_path) == []


def test_external_data_beside_the_model_is_read(tmp_path, check_bundle):
    model, _ = net_onnx(tmp_path / "plain.onnx")
    (tmp_path / "m").mkdir()
    onnx.save(onnx.load(str(tmp_path / "plain.onnx")), str(tmp_path / "m" / "net.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="net.bin", size_threshold=0)
    bundle = export_bundle(tmp_path / "m" / "net.onnx", tmp_path / "b")
    check_bundle(bundle, trainable=tm.bias_names(model), weights={n: p.detach().numpy() for n, p in model.named_parameters()})


@pytest.mark.parametrize("location", ["../x.bin", "sub/../../x.bin", "/tmp/x.bin"])
def test_external_data_outside_the_model_directory_is_refused(location, tmp_path):
    net_onnx(tmp_path / "plain.onnx")
    (tmp_path / "m").mkdir()
    onnx.save(onnx.load(str(tmp_path / "plain.onnx")), str(tmp_path / "m" / "net.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="net.bin", size_threshold=0)
    shutil.copyfile(tmp_path / "m" / "net.bin", tmp_path / "x.bin")  # the data exists: only its place is wrong
    model = onnx.load(str(tmp_path / "m" / "net.onnx"), load_external_data=False)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(tmp_path / "m" / "evil.onnx"))
    with pytest.raises(UnsupportedModelError, match=f"stores its data at '{location}', outside") as err:
        export_bundle(tmp_path / "m" / "evil.onnx", tmp_path / "b")
    assert "Keep external data files beside the model" in str(err.value)
    assert not (tmp_path / "b").exists()


def _external_tensor(name: str, location: str) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[4])
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    tensor.external_data.add(key="length", value="16")
    return tensor


@pytest.mark.parametrize("hidden_in", ["constant attribute", "if-branch initializer"])
def test_external_data_hidden_in_a_subgraph_or_attribute_is_refused(hidden_in, tmp_path):
    """onnx.load reads external data of every tensor, not only top-level initializers: a
    reference inside a Constant's attribute or an If branch must be refused the same way."""
    (tmp_path / "m").mkdir()
    (tmp_path / "secret.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())  # exists: only its place is wrong
    evil = _external_tensor("hidden", "../secret.bin")
    out = helper.make_tensor_value_info("hidden_out", TensorProto.FLOAT, [4])
    if hidden_in == "constant attribute":
        extra = [helper.make_node("Constant", [], ["hidden_out"], value=evil, name="c")]
        where = "graph.node[1].attribute[0].t[0]"
    else:
        branch = helper.make_graph([helper.make_node("Identity", ["hidden"], ["hidden_out"])], "b", [], [out], [evil])
        cond = numpy_helper.from_array(np.array(True), "cond")
        extra = [helper.make_node("Constant", [], ["cond"], value=cond, name="k"),
                 helper.make_node("If", ["cond"], ["hidden_out"], then_branch=branch, else_branch=branch, name="if")]
        where = "graph.node[2].attribute[0].g[0].initializer[0]"
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["logits"], name="gemm"), *extra], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4]), out],
        [numpy_helper.from_array(np.eye(4, dtype=np.float32), "w"), numpy_helper.from_array(np.zeros(4, np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (tmp_path / "m" / "evil.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(UnsupportedModelError) as err:
        export_bundle(tmp_path / "m" / "evil.onnx", tmp_path / "b")
    assert f"tensor 'hidden' ({where}) stores its data at '../secret.bin', outside" in str(err.value)
    assert "Keep external data files beside the model" in str(err.value)
    assert not (tmp_path / "b").exists() and leftovers(tmp_path) == []


def test_onnx_file_that_onnxruntime_cannot_load_is_unsupported(tmp_path):
    """Not a bare onnxruntime InvalidGraph: the model (an op ORT lacks) is the cause, and the message says so."""
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc"), helper.make_node("NoSuchOp", ["h"], ["logits"], name="odd")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        [numpy_helper.from_array(np.eye(2, dtype=np.float32), "w"), numpy_helper.from_array(np.zeros(2, np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "odd.onnx"))  # not check_model: the checker would refuse the op too
    with pytest.raises(UnsupportedModelError, match=r"onnxruntime .* cannot load .*odd.onnx \(InvalidGraph: .*NoSuchOp"):
        export_bundle(tmp_path / "odd.onnx", tmp_path / "b")
    assert not (tmp_path / "b").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("config, match", [
    ("{not json", r"transformers cannot read .*config.json"),
    ('{"model_type": "bert"}', r"transformers cannot load the text-classification model in .*model.safetensors"),
])
def test_hf_directory_transformers_cannot_load_is_an_export_error(config, match, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(config)
    with pytest.raises(ExportError, match=match):
        export_bundle(tmp_path / "hf", tmp_path / "b", hf_task="text-classification")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("failure, expected, match", [
    (OSError(28, "No space left on device"), ExportError, "could not write the training artifacts .*No space left"),
    (RuntimeError("std::bad_alloc"), ResourceExhaustedError, "ran out of memory building the training graph"),
    (RuntimeError("No gradient registered for op Foo"), UnsupportedModelError, "could not build the training graph: No gradient"),
])
def test_a_training_artifact_failure_names_its_real_cause(failure, expected, match, tmp_path, monkeypatch):
    """Only a failure of the gradient builder itself says the model is unsupported."""
    from onnxruntime.training import artifacts as ort_artifacts

    from bitfit.export.artifacts import generate_training_artifacts

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(ort_artifacts, "generate_artifacts", fail)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["logits"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        [numpy_helper.from_array(np.eye(2, dtype=np.float32), "w"), numpy_helper.from_array(np.zeros(2, np.float32), "b")]))
    with pytest.raises(expected, match=match) as err:
        generate_training_artifacts(model, ["b"], ["w"], tmp_path, loss="cross-entropy")
    assert type(err.value) is expected


def test_missing_onnx_file(tmp_path):
    with pytest.raises(ExportError, match="does not exist: pass the path of a forward .onnx model"):
        export_bundle(tmp_path / "nope.onnx", tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_unreadable_onnx_file(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"this is not a protobuf at all \xff\xfe")
    with pytest.raises(ExportError, match="is not a readable ONNX model"):
        export_bundle(tmp_path / "junk.onnx", tmp_path / "b")


def test_onnx_file_without_initializers(tmp_path):
    save_model(helper.make_graph([helper.make_node("Relu", ["x"], ["logits"])], "r",
                                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                                 [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])]),
               tmp_path / "r.onnx")
    with pytest.raises(UnsupportedModelError, match="has no initializers"):
        export_bundle(tmp_path / "r.onnx", tmp_path / "b")


def test_onnx_file_whose_exporter_merged_zero_biases(tmp_path):
    """The plain TorchScript export of zero biases reads one bias through Identity nodes."""
    model, inputs = tm.zero_bias_net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (inputs["x"],), str(tmp_path / "z.onnx"), dynamo=False, opset_version=17,
                          do_constant_folding=False, input_names=["x"], output_names=["logits"])
    with pytest.raises(UnsupportedModelError, match="also used as a non-bias input") as err:
        export_bundle(tmp_path / "z.onnx", tmp_path / "b")
    assert "exclude=" in str(err.value)
    assert not (tmp_path / "b").exists() and leftovers(tmp_path) == []


def test_path_that_is_neither_a_model_directory_nor_onnx(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(ExportError, match="neither 'minilm', a Hugging Face model directory, nor an .onnx file"):
        export_bundle(tmp_path / "model.pt", tmp_path / "b")


def test_directory_needs_hf_task_and_config(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ExportError, match="needs hf_task= text-classification, token-classification or feature-extraction"):
        export_bundle(tmp_path / "m", tmp_path / "b")
    with pytest.raises(ExportError, match=r"not a Hugging Face model directory \(no config.json\)"):
        export_bundle(tmp_path / "m", tmp_path / "b", hf_task="text-classification")
    assert not (tmp_path / "b").exists()


def test_unknown_hf_task(tmp_path):
    tm.tiny_bert_hf().save_pretrained(tmp_path / "m")
    with pytest.raises(ExportError, match="unknown Hugging Face task 'summarization'"):
        export_bundle(tmp_path / "m", tmp_path / "b", hf_task="summarization")


def test_feature_extraction_needs_labels(tmp_path):
    tm.tiny_bert_hf().save_pretrained(tmp_path / "m")
    with pytest.raises(ExportError, match="feature-extraction needs labels"):
        export_bundle(tmp_path / "m", tmp_path / "b", hf_task="feature-extraction")
    assert not (tmp_path / "b").exists() and leftovers(tmp_path) == []


def test_minilm_needs_labels(tmp_path):
    with pytest.raises(ExportError, match="'minilm' needs labels"):
        export_bundle("minilm", tmp_path / "b")


def test_torch_module_needs_example_inputs(tmp_path):
    model, _ = tm.mlp()
    with pytest.raises(ExportError, match="needs example_inputs="):
        export_bundle(model, tmp_path / "b")
    with pytest.raises(ExportError, match="example_inputs is empty"):
        export_bundle(model, tmp_path / "b", example_inputs={})


def test_untraceable_module_is_an_export_error(tmp_path):
    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x):
            raise RuntimeError("unordered_map::at")

    with pytest.raises(ExportError, match="could not trace the module: unordered_map::at"):
        export_bundle(Broken(), tmp_path / "b", example_inputs={"x": torch.randn(2, 4)})
    assert list(tmp_path.iterdir()) == []


def test_token_loss_needs_token_logits(tmp_path):
    model, inputs = tm.mlp()
    with pytest.raises(UnsupportedModelError, match=r"needs \[batch, sequence, classes\] logits, logits has rank 2"):
        export_bundle(model, tmp_path / "b", example_inputs=inputs, loss="token-cross-entropy")
    assert list(tmp_path.iterdir()) == []


# --- nothing half-written ----------------------------------------------------------------


def fail_validation(*args, **kwargs):
    raise ValidationFailedError("forced by the test")


def test_failed_validation_leaves_nothing(tmp_path, monkeypatch):
    import bitfit.export.pipeline as pipeline

    monkeypatch.setattr(pipeline, "validate_bundle", fail_validation)
    model, inputs = tm.mlp()
    with pytest.raises(ValidationFailedError, match="forced by the test"):
        export_bundle(model, tmp_path / "b", example_inputs=inputs)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()])
def test_failure_while_writing_leaves_nothing(failure, tmp_path, monkeypatch):
    import bitfit.export.pipeline as pipeline

    def broken(*args, **kwargs):
        raise failure

    monkeypatch.setattr(pipeline, "write_manifest", broken)
    model, inputs = tm.mlp()
    with pytest.raises(type(failure)):
        export_bundle(model, tmp_path / "nested" / "b", example_inputs=inputs)
    assert list((tmp_path / "nested").iterdir()) == []


def test_failed_overwrite_keeps_the_old_bundle(tmp_path, monkeypatch):
    import bitfit.export.pipeline as pipeline

    model, inputs = tm.mlp()
    old = export_bundle(model, tmp_path / "b", example_inputs=inputs)
    old_manifest = (tmp_path / "b" / "manifest.json").read_text()
    old_files = sorted(p.relative_to(tmp_path / "b").as_posix() for p in (tmp_path / "b").rglob("*"))

    monkeypatch.setattr(pipeline, "validate_bundle", fail_validation)
    with pytest.raises(ValidationFailedError):
        export_bundle(model, tmp_path / "b", example_inputs=inputs, policy="all-biases+head", overwrite=True)
    assert (tmp_path / "b" / "manifest.json").read_text() == old_manifest
    assert sorted(p.relative_to(tmp_path / "b").as_posix() for p in (tmp_path / "b").rglob("*")) == old_files
    assert Bundle.open(tmp_path / "b").manifest.to_json() == old.manifest.to_json()  # hashes still match
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_successful_overwrite_replaces_the_bundle(tmp_path):
    model, inputs = tm.mlp()
    export_bundle(model, tmp_path / "b", example_inputs=inputs)
    (tmp_path / "b" / "stale.txt").write_text("from the old bundle")
    new = export_bundle(model, tmp_path / "b", example_inputs=inputs, policy="all-biases+head", overwrite=True)
    assert new.manifest.policy["name"] == "all-biases+head"
    assert Bundle.open(tmp_path / "b").manifest.policy["name"] == "all-biases+head"
    assert not (tmp_path / "b" / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["b"]
