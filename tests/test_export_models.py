"""export_bundle on tiny torch models, .onnx files and Hugging Face directories: every
bundle holds its listed files, trains exactly the biases, reproduces its source and
keeps its per-row promise."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch

import tiny_models as tm
from bitfit.export import export_bundle
from bitfit.sdk.bundle import Bundle
from bitfit.sdk.ort_training import ort, training_api
from bitfit.sdk.trainer import TrainingSession

TORCH_CASES = {
    # name: (builder, export kwargs)
    "mlp": (tm.mlp, {"labels": ["a", "b", "c"]}),
    "cnn": (tm.cnn, {}),
    "bert": (tm.tiny_bert_classifier, {}),
    "gpt2": (tm.tiny_gpt2, {"task": "causal-lm"}),
    "zero-bias": (tm.zero_bias_net, {}),
}


def torch_tensors(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Every parameter and float buffer, as numpy copies."""
    out = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    out.update({n: b.numpy().copy() for n, b in model.named_buffers() if b.is_floating_point()})
    return out


def run_torch(model: torch.nn.Module, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model(*[torch.from_numpy(v) for v in feeds.values()]).numpy()


def session(bundle: Bundle):
    return ort.InferenceSession(str(bundle.file("inference_model")), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(name)`` -> (name, model, example inputs, tensors before export, bundle),
    exported once per module for each tiny torch model."""
    cache = {}

    def get(name: str):
        if name not in cache:
            builder, kwargs = TORCH_CASES[name]
            model, inputs = builder()
            before = torch_tensors(model)
            with tm.traceable_masks():
                bundle = export_bundle(model, tmp_path_factory.mktemp(name) / "bundle", example_inputs=inputs, **kwargs)
            cache[name] = (name, model, inputs, before, bundle)
        return cache[name]

    return get


@pytest.fixture(params=sorted(TORCH_CASES))
def torch_case(request, exported):
    return exported(request.param)


def test_torch_bundle_is_complete_and_valid(torch_case, check_bundle):
    name, model, _, before, bundle = torch_case
    base = set(bundle.base_weights())
    # Base weights are exactly the model's parameters plus the float buffers the graph
    # reads (GPT-2's unused masked_bias is not): no exporter helper tensors, nothing
    # merged away, and (check_bundle compares values) no leftover perturbation.
    params = {n for n, _ in model.named_parameters()}
    assert params <= base <= set(before)
    check_bundle(bundle, trainable=tm.bias_names(model), weights={n: before[n] for n in base})
    m = bundle.manifest
    assert m.source["kind"] == "torch"
    assert all(t.role == "bias" for t in m.trainable)
    assert m.policy["total_values"] == sum(before[n].size for n in base)
    assert m.policy["split_shared_biases"] == {}
    assert m.policy["unmatched_framework_biases"] == []
    assert m.source["parameter_order"] and set(m.source["parameter_order"]) <= set(before)


def test_export_leaves_the_torch_module_unchanged(torch_case):
    _, model, _, before, _ = torch_case
    after = torch_tensors(model)
    assert after.keys() == before.keys()
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)


def test_inference_model_without_bias_feeds_equals_torch(torch_case):
    _, model, inputs, _, bundle = torch_case
    feeds = {k: v.numpy() for k, v in inputs.items()}
    ours = session(bundle).run([bundle.manifest.logits_output], feeds)[0]
    np.testing.assert_allclose(ours, run_torch(model, feeds), atol=1e-5, rtol=1e-4)


def test_inference_model_with_new_biases_equals_torch_with_those_biases(torch_case):
    """Feeding a delta (one value for every row) is the same as changing the torch biases."""
    _, model, inputs, _, bundle = torch_case
    feeds = {k: v.numpy() for k, v in inputs.items()}
    rng = np.random.default_rng(1)
    changed = copy.deepcopy(model)
    bias_feeds = {}
    params = dict(changed.named_parameters())
    for t in bundle.manifest.trainable:
        value = (params[t.name].detach().numpy() + rng.standard_normal(t.shape) * 0.1).astype(np.float32)
        with torch.no_grad():
            params[t.name].copy_(torch.from_numpy(value))
        bias_feeds[t.name] = value.reshape(t.inference_shape)
    ours = session(bundle).run([bundle.manifest.logits_output], {**feeds, **bias_feeds})[0]
    expected = run_torch(changed, feeds)
    assert np.abs(expected - run_torch(model, feeds)).max() > 1e-3  # the new biases matter
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=1e-4)


def test_mlp_names_and_fraction(exported):
    _, model, _, _, bundle = exported("mlp")
    m = bundle.manifest
    assert [t.name for t in m.trainable] == ["0.bias", "2.bias", "4.bias"]
    assert [t.shape for t in m.trainable] == [[16], [16], [3]]
    assert m.policy["trainable_values"] == 35
    assert m.policy["total_values"] == sum(p.numel() for p in model.parameters()) == 4 * 16 + 16 + 16 * 16 + 16 + 16 * 3 + 3
    assert m.policy["fraction"] == pytest.approx(35 / 403)
    assert m.labels == ["a", "b", "c"] and m.task == "classification" and m.loss == "cross-entropy"
    assert [(i.name, i.dtype, i.shape) for i in m.inputs] == [("x", "float32", ["batch", 4])]
    assert [(o.name, o.shape) for o in m.outputs] == [("logits", ["batch", 3])]
    assert m.per_row is True
    assert Bundle.open(bundle.path).manifest.to_json() == m.to_json()
    assert json.loads((bundle.path / "manifest.json").read_text())["format"] == "bitfit-bundle"


def test_cnn_batchnorm_statistics_stay_frozen_in_training(exported):
    name, model, inputs, before, bundle = exported("cnn")
    assert [t.name for t in bundle.manifest.trainable] == ["conv1.bias", "bn1.bias", "conv2.bias", "bn2.bias", "head.bias"]
    # ORT would train BatchNorm with batch statistics and overwrite the running ones; the
    # export rewrites it with frozen statistics, so no BatchNormInternal in training mode.
    training = onnx.load(str(bundle.file("training_model")), load_external_data=False)
    assert not [n for n in training.graph.node if n.op_type == "BatchNormInternal"]
    assert len(bundle.manifest.source["repairs"]["batchnorm_frozen_statistics"]) == 2
    trainer = TrainingSession(bundle, learning_rate=0.1)
    for _ in range(3):
        trainer.train_step({"image": inputs["image"].numpy()}, np.array([0, 2], np.int64))
    stats = trainer.parameter_values(["bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var"])
    for key, value in stats.items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)


def test_bert_biases_and_repairs(exported):
    name, model, _, _, bundle = exported("bert")
    m = bundle.manifest
    assert len(m.trainable) == 19  # embeddings LN + 8 per layer x 2 + pooler + classifier
    assert m.per_row is True
    assert len(m.source["repairs"]["layernorm_stat_outputs"]) == 5
    kinds = {t.name: t for t in m.trainable}
    assert kinds["inner.bert.encoder.layer.0.attention.self.query.bias"].shape == [32]
    assert kinds["inner.bert.encoder.layer.1.intermediate.dense.bias"].shape == [64]


def test_gpt2_is_not_per_row_and_says_why(exported):
    name, model, inputs, _, bundle = exported("gpt2")
    m = bundle.manifest
    assert m.task == "causal-lm" and m.loss == "token-cross-entropy" and m.ignore_index == -100
    # GPT-2's Conv1D is addmm over [batch*seq, d]: no batch-first axis to give each row a bias.
    assert m.per_row is False
    reason = m.source["per_row_reason"]
    assert "batch dimension first" in reason and "Gemm" in reason
    assert all(t.inference_shape == t.shape for t in m.trainable)
    assert [o.shape for o in m.outputs] == [["batch", "sequence", tm.VOCAB]]
    # The tied input/output embedding stays one tensor.
    assert "inner.transformer.wte.weight" in bundle.base_weights()
    assert "inner.lm_head.weight" not in bundle.base_weights()


def test_zero_initialised_biases_stay_separate_tensors(exported):
    name, model, inputs, _, bundle = exported("zero-bias")
    m = bundle.manifest
    assert [t.name for t in m.trainable] == ["a.bias", "b.bias", "c.bias", "out.bias"]
    assert m.policy["split_shared_biases"] == {}
    assert m.validation["one_step_trainable_changed"] == 4
    for value in bundle.trainable_base().values():
        assert not value.any()
    trainer = TrainingSession(bundle, learning_rate=0.1)
    trainer.train_step({"x": inputs["x"].numpy()}, np.array([1, 5], np.int64))
    trained = trainer.trainable_values()
    assert all(trained[n].any() for n in trained), "each zero bias learns on its own"
    assert not np.array_equal(trained["a.bias"], trained["b.bias"])


def test_plain_torchscript_export_would_merge_zero_biases(tmp_path):
    """Why the zero-bias case matters: without bitfit's care the exporter merges them."""
    import warnings

    model, inputs = tm.zero_bias_net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (inputs["x"],), str(tmp_path / "raw.onnx"), dynamo=False, opset_version=17,
                          do_constant_folding=False, input_names=["x"], output_names=["logits"])
    raw = onnx.load(str(tmp_path / "raw.onnx"))
    assert len([i for i in raw.graph.initializer if i.name.endswith(".bias")]) < 4


class RotaryScaled(torch.nn.Module):
    """A Linear whose output is scaled by cos(position x inv_freq), computed as Llama's rotary
    embedding computes it: the TorchScript exporter writes the ``inv_freq`` buffer as a
    ``Constant`` node named ``onnx::Expand_N``, not as an initializer named after it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, 4, 2).float() / 4)), persistent=False)

    def forward(self, x):
        pos = torch.arange(x.shape[1], dtype=torch.float32)[None, :, None].expand(x.shape[0], -1, -1)
        freqs = (pos @ self.inv_freq[None, None, :].expand(x.shape[0], 1, -1))
        return self.lin(x) * torch.cat([freqs, freqs], -1).cos()


def test_a_buffer_exported_under_another_name_keeps_its_true_value():
    """Export perturbs parameters to keep them apart, and restores them by name; a buffer
    the exporter renames must not be perturbed at all (the offset would stay in the graph:
    here 1e-3 of 40 radians at the last position)."""
    from bitfit.export.sources import from_torch

    torch.manual_seed(0)
    model, x = RotaryScaled().eval(), torch.randn(2, 40, 4)
    before = {n: b.clone() for n, b in model.named_buffers()}
    src = from_torch(model, {"x": x})
    assert "inv_freq" not in {i.name for i in src.model.graph.initializer}  # exported as a Constant node
    ours = ort.InferenceSession(src.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(ours, run_torch(model, {"x": x.numpy()}), atol=1e-5)
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())


def test_fresh_batchnorm_statistics_of_equal_width_export_train_and_stay_frozen(tmp_path):
    """Unperturbed buffers may be merged by the exporter (two fresh BatchNorms of one width
    have equal statistics): harmless, since they never train."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 3)).eval()
    image = torch.randn(2, 3, 8, 8)
    bundle = export_bundle(model, tmp_path / "bn", example_inputs={"image": image})
    assert [t.name for t in bundle.manifest.trainable] == ["0.bias", "1.bias", "3.bias", "4.bias", "7.bias"]
    assert bundle.manifest.validation["inference_vs_source_max_abs_diff"] < 1e-5
    assert bundle.manifest.backend_available("portable")


def test_tuple_inputs_are_named_after_forward_and_dict_names_are_kept(tmp_path):
    """A tuple of example tensors takes forward()'s parameter names (SmallCNN.forward(self,
    image)); a dict's own names win over them."""
    model, inputs = tm.cnn()
    bundle = export_bundle(model, tmp_path / "tuple", example_inputs=(inputs["image"],))
    assert [i.name for i in bundle.manifest.inputs] == ["image"]
    assert [i.name for i in session(bundle).get_inputs()][:1] == ["image"]
    bundle = export_bundle(model, tmp_path / "dict", example_inputs={"pixels": inputs["image"]})
    assert [i.name for i in bundle.manifest.inputs] == ["pixels"]


def test_inputs_without_a_derivable_name_are_numbered():
    """*args and names that would clash (an output, the labels, a parameter) fall back to input_N."""
    from bitfit.export.sources import from_torch

    class Star(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(2, 2)

        def forward(self, labels, *rest):
            return self.fc(labels + rest[0])

    src = from_torch(Star(), (torch.randn(2, 2), torch.randn(2, 2)))
    assert [i.name for i in src.model.graph.input] == ["input_0", "input_1"]
    assert list(src.example_inputs) == ["input_0", "input_1"]


@pytest.mark.parametrize("case", ["mlp", "cnn", "bert"])
def test_per_row_biases_equal_row_by_row_runs(case, exported):
    _, model, inputs, _, bundle = exported(case)
    assert bundle.manifest.per_row
    sess = session(bundle)
    out = bundle.manifest.logits_output
    # A batch of 3 (the export saw 2): every row gets its own bias values.
    feeds = {k: np.concatenate([v.numpy(), v.numpy()[:1]]) for k, v in inputs.items()}
    base = bundle.trainable_base()
    rng = np.random.default_rng(0)
    rows = {t.name: np.stack([base[t.name] + rng.standard_normal(t.shape).astype(np.float32) * 0.2 for _ in range(3)])
            for t in bundle.manifest.trainable}
    together = sess.run([out], {**feeds, **rows})[0]
    apart = np.concatenate([sess.run([out], {**{k: v[i:i + 1] for k, v in feeds.items()},
                                             **{k: v[i:i + 1] for k, v in rows.items()}})[0] for i in range(3)])
    np.testing.assert_allclose(together, apart, atol=1e-5)
    # Row i with row i's bias differs from row i with row j's bias: the rows really differ.
    swapped = sess.run([out], {**feeds, **{k: v[::-1].copy() for k, v in rows.items()}})[0]
    assert np.abs(swapped[0] - together[0]).max() > 1e-4
    # No bias fed: the source model; the base bias fed once as [1, d]: the same.
    np.testing.assert_allclose(sess.run([out], feeds)[0], run_torch(model, feeds), atol=1e-5, rtol=1e-4)
    once = {t.name: base[t.name].reshape(t.inference_shape) for t in bundle.manifest.trainable}
    np.testing.assert_allclose(sess.run([out], {**feeds, **once})[0], run_torch(model, feeds), atol=1e-5, rtol=1e-4)


def test_one_sgd_step_matches_torch(tmp_path):
    """The training graph computes torch's gradient (eval-mode BatchNorm included)."""
    model, inputs = tm.cnn()
    bundle = export_bundle(model, tmp_path / "b", example_inputs=inputs, optimizer="sgd")
    labels = np.array([0, 2], np.int64)
    trainer = TrainingSession(bundle, learning_rate=0.5)
    loss = trainer.train_step({"image": inputs["image"].numpy()}, labels)
    reference = copy.deepcopy(model).eval()
    torch_loss = torch.nn.functional.cross_entropy(reference(inputs["image"]), torch.from_numpy(labels))
    torch_loss.backward()
    assert loss == pytest.approx(torch_loss.item(), abs=1e-5)
    trained = trainer.trainable_values()
    for name, param in reference.named_parameters():
        if name in trained:
            np.testing.assert_allclose(trained[name], (param - 0.5 * param.grad).detach().numpy(), atol=1e-5, err_msg=name)


def test_ort_format_writes_mobile_models_and_full_checkpoint(tmp_path, check_bundle):
    model, inputs = tm.mlp()
    bundle = export_bundle(model, tmp_path / "b", example_inputs=inputs, ort_format=True)
    check_bundle(bundle, trainable=tm.bias_names(model), weights=torch_tensors(model))
    files = bundle.manifest.files
    for key in ("mobile_training_model", "mobile_eval_model", "mobile_optimizer_model", "mobile_inference_model"):
        assert files[key].path.startswith("mobile/") and files[key].path.endswith(".ort"), key
    assert files["mobile_checkpoint"].path == "mobile/checkpoint"
    assert not list((tmp_path / "b" / "mobile").glob("*.onnx"))
    # Mobile apps load the full checkpoint directly: it holds every weight, frozen ones too.
    state = training_api.CheckpointState.load_checkpoint(str(bundle.file("mobile_checkpoint")))
    weights = torch_tensors(model)
    for name, value in weights.items():
        np.testing.assert_array_equal(state.parameters[name].data, value, err_msg=name)
        assert state.parameters[name].requires_grad == name.endswith("bias")
    assert files["mobile_checkpoint"].bytes > files["checkpoint"].bytes  # the desktop one is shapes-only
    # The .ort inference model runs and matches the ONNX one.
    feeds = {"x": inputs["x"].numpy()}
    mobile = ort.InferenceSession(str(bundle.file("mobile_inference_model")), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(mobile.run(None, feeds)[0], run_torch(model, feeds), atol=1e-5)
    assert {i.name for i in mobile.get_overridable_initializers()} >= set(tm.bias_names(model))


# --- .onnx files ------------------------------------------------------------------------


def torch_to_onnx(model: torch.nn.Module, inputs: dict[str, torch.Tensor], path) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, tuple(inputs.values()), str(path), dynamo=False, opset_version=17,
                          do_constant_folding=False, input_names=list(inputs), output_names=["logits"],
                          dynamic_axes={**{k: {0: "batch"} for k in inputs}, "logits": {0: "batch"}})


@pytest.fixture(scope="module")
def distinct_net():
    """A ZeroBiasNet with random (distinct) biases, so its plain export keeps every bias."""
    return tm.distinct_bias_net()


def test_onnx_file_source(distinct_net, tmp_path, check_bundle):
    model, inputs = distinct_net
    torch_to_onnx(model, inputs, tmp_path / "net.onnx")
    bundle = export_bundle(tmp_path / "net.onnx", tmp_path / "b")
    check_bundle(bundle, trainable=tm.bias_names(model), weights=torch_tensors(model))
    m = bundle.manifest
    assert m.source["kind"] == "onnx" and m.source["name"] == "net"
    assert m.per_row is True
    feeds = {"x": np.random.default_rng(3).standard_normal((5, 8)).astype(np.float32)}
    np.testing.assert_allclose(session(bundle).run(None, feeds)[0], run_torch(model, feeds), atol=1e-5)


def test_onnx_file_with_a_shared_bias_is_split(distinct_net, tmp_path, check_bundle):
    model, inputs = distinct_net
    torch_to_onnx(model, inputs, tmp_path / "net.onnx")
    graph = onnx.load(str(tmp_path / "net.onnx"))
    gemms = [n for n in graph.graph.node if n.op_type == "Gemm"]
    assert [g.input[2] for g in gemms[:2]] == ["a.bias", "b.bias"]
    gemms[1].input[2] = "a.bias"  # what an exporter's de-duplication does
    graph.graph.initializer.remove(next(i for i in graph.graph.initializer if i.name == "b.bias"))
    onnx.save(graph, str(tmp_path / "shared.onnx"))

    bundle = export_bundle(tmp_path / "shared.onnx", tmp_path / "b")
    check_bundle(bundle, trainable=["a.bias", "a.bias.__copy1", "c.bias", "out.bias"])
    m = bundle.manifest
    assert m.policy["split_shared_biases"] == {"a.bias": ["a.bias.__copy1"]}
    base = bundle.trainable_base()
    np.testing.assert_array_equal(base["a.bias"], base["a.bias.__copy1"])
    assert m.validation["one_step_trainable_changed"] == 4
    # Both copies train, and separately.
    trainer = TrainingSession(bundle, learning_rate=0.1)
    trainer.train_step({"x": inputs["x"].numpy()}, np.array([1, 5], np.int64))
    trained = trainer.trainable_values()
    assert not np.array_equal(trained["a.bias"], base["a.bias"])
    assert not np.array_equal(trained["a.bias.__copy1"], base["a.bias"])
    assert not np.array_equal(trained["a.bias"], trained["a.bias.__copy1"])
    # The inference graph takes each copy as its own input: changing one changes the output.
    sess = session(bundle)
    feeds = {"x": inputs["x"].numpy()}
    plain = sess.run(None, feeds)[0]
    bumped = sess.run(None, {**feeds, "a.bias.__copy1": (base["a.bias"] + 0.5).reshape(1, -1)})[0]
    assert np.abs(bumped - plain).max() > 1e-3


# --- Hugging Face directories (optimum) -------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A saved tiny BertForSequenceClassification with a WordLevel tokenizer.json."""
    path = tmp_path_factory.mktemp("hf") / "tiny-bert"
    return path, tm.save_tiny_bert_hf_dir(path)


HF_TASKS = {
    "text-classification": ({}, "classification", "cross-entropy", ["neg", "neu", "pos"]),
    "token-classification": ({}, "token-classification", "token-cross-entropy", ["neg", "neu", "pos"]),
    "feature-extraction": ({"labels": ["x", "y"]}, "classification", "cross-entropy", ["x", "y"]),
}


@pytest.fixture(scope="module")
def hf_exported(hf_dir, tmp_path_factory):
    """``hf_exported(task)`` -> (task, saved model, bundle), exported once per module per task."""
    cache = {}

    def get(task: str):
        if task not in cache:
            path, model = hf_dir
            bundle = export_bundle(path, tmp_path_factory.mktemp("hfb") / task, hf_task=task, **HF_TASKS[task][0])
            cache[task] = (task, model, bundle)
        return cache[task]

    return get


@pytest.fixture(params=sorted(HF_TASKS))
def hf_bundle(request, hf_exported):
    return hf_exported(request.param)


def test_hf_directory_bundle(hf_bundle, check_bundle):
    task, model, bundle = hf_bundle
    _, manifest_task, loss, labels = HF_TASKS[task]
    encoder_biases = [n.removeprefix("bert.") for n in tm.bias_names(model) if n.startswith("bert.encoder") or n.startswith("bert.embeddings")]
    if task == "text-classification":
        expected = tm.bias_names(model)
    elif task == "token-classification":  # no pooler; a new token classifier
        expected = [n for n in tm.bias_names(model) if "pooler" not in n]
    else:  # the bare encoder (no pooler) and the grafted head
        expected = encoder_biases + ["head.bias"]
    check_bundle(bundle, trainable=expected)
    m = bundle.manifest
    assert m.source["kind"] == "hf" and m.source["name"] == "tiny-bert"
    assert (m.task, m.loss, m.labels) == (manifest_task, loss, labels)
    assert m.per_row is True
    assert m.text is not None and m.text.tokenizer == "tokenizer.json"
    assert (m.text.input_ids, m.text.attention_mask, m.text.token_type_ids) == ("input_ids", "attention_mask", "token_type_ids")
    assert {i.name for i in m.inputs} == {"input_ids", "attention_mask", "token_type_ids"}
    assert m.files["tokenizer"].path == "tokenizer.json"
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(bundle.file("tokenizer"))).encode("w1 w2 zz").ids == [5, 6, 1]
    if task == "text-classification":  # the saved weights are the bundle's weights
        weights = {f"{n}": p.detach().numpy() for n, p in model.named_parameters()}
        base = bundle.base_weights()
        for name, value in weights.items():
            np.testing.assert_array_equal(base[name], value, err_msg=name)
    if task == "feature-extraction":
        head = next(t for t in m.trainable if t.name == "head.bias")
        assert head.shape == [2] and m.outputs[0].shape[-1] == 2
        assert "head.weight" in bundle.base_weights()
    if task == "token-classification":
        assert m.ignore_index == -100
        assert m.outputs[0].shape == ["batch_size", "sequence_length", 3]
        # The token loss skips positions labelled ignore_index.
        trainer = TrainingSession(bundle)
        feeds = {i.name: np.ones((2, 5), np.int64) * (7 if i.name == "input_ids" else 1) for i in m.inputs}
        feeds["token_type_ids"][:] = 0
        labels = np.array([[0, 1, 2, -100, -100], [2, 2, -100, 1, 0]], np.int64)
        loss, logits = trainer.evaluate(feeds, labels)
        keep = labels != -100
        expected = torch.nn.functional.cross_entropy(torch.from_numpy(logits[keep]), torch.from_numpy(labels[keep]))
        assert loss == pytest.approx(expected.item(), abs=1e-5)


def test_hf_text_classification_matches_transformers(hf_exported):
    _, model, bundle = hf_exported("text-classification")
    rng = np.random.default_rng(4)
    feeds = {"input_ids": rng.integers(4, 44, (3, 7)).astype(np.int64), "attention_mask": np.ones((3, 7), np.int64),
             "token_type_ids": np.zeros((3, 7), np.int64)}
    feeds["attention_mask"][2, 4:] = 0
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    np.testing.assert_allclose(session(bundle).run(["logits"], feeds)[0], expected, atol=1e-5)


def test_hf_feature_extraction_head_policy_trains_the_grafted_head(hf_dir, tmp_path, check_bundle):
    path, _ = hf_dir
    bundle = export_bundle(path, tmp_path / "b", hf_task="feature-extraction", labels=["x", "y", "z"], policy="all-biases+head")
    m = bundle.manifest
    head = m.trainable[-1]
    assert (head.name, head.role, head.shape) == ("head.weight", "head-weight", [32, 3])
    assert [t.name for t in m.trainable][-2:] == ["head.bias", "head.weight"]
    assert m.per_row is False and "head.weight" in m.source["per_row_reason"]
    check_bundle(bundle)
