"""export_bundle writes the portable training model (bundle format 2) for every source kind,
loss and policy; its gradients match torch autograd at any batch size and sequence length;
it stores the weights once and uses only standard ONNX; ``ort_training`` decides the
onnxruntime-training artifacts; format-1 bundles still open.

The per-op differentiation rules are in test_gradient_rules.py.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

import tiny_models as tm
from bitfit.export import export_bundle
from bitfit.export.pipeline import NO_TRAINING_API
from bitfit.sdk.bundle import BACKEND_FILES, Bundle, manifest_checksum
from bitfit.sdk.errors import BackendUnavailableError, BundleInvalidError, ExportError
from bitfit.sdk.runtime import has_training_api, ort

PORTABLE_KEYS = BACKEND_FILES["portable"]
ORT_TRAINING_KEYS = BACKEND_FILES["ort-training"]
PAPER = [f"inner.bert.encoder.layer.{i}.{part}.bias" for i in (0, 1)
         for part in ("attention.self.query", "intermediate.dense")]
TORCH_AUTOGRAD = "torch-autograd"
ORT_BUILDER = "onnxruntime-training gradient builder"


def torch_to_onnx(model: torch.nn.Module, inputs: dict[str, torch.Tensor], path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, tuple(inputs.values()), str(path), dynamo=False, opset_version=17,
                          do_constant_folding=False, input_names=list(inputs), output_names=["logits"],
                          dynamic_axes={**{k: {0: "batch"} for k in inputs}, "logits": {0: "batch"}})


def distinct_net():
    """ZeroBiasNet with random, distinct biases (a plain ONNX export keeps each one)."""
    return tm.distinct_bias_net()


def wide_mlp():
    """~1.1 M weights and a handful of nodes: the weights dominate the bundle's size."""
    return tm.mlp(inputs=64, hidden=1024, outputs=3, seed=2)


class LeakyMax(torch.nn.Module):
    """A Linear layer, then ``maximum(h, h / 2)`` (ONNX ``Max``): no portable gradient rule
    for it, while ORT's gradient builder has one."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        return torch.maximum(h, 0.5 * h)


def leaky_max_net():
    torch.manual_seed(0)
    return LeakyMax().eval(), {"x": torch.randn(2, 4)}


# name: (builder, export kwargs, expected gradient reference, source kind)
TORCH_SOURCES = {
    "mlp": (tm.mlp, {"labels": ["a", "b", "c"]}),  # ort_training="auto": both backends
    "cnn": (tm.cnn, {"ort_training": "never"}),
    "bert": (tm.tiny_bert_classifier, {"ort_training": "never"}),
    "tagger": (tm.token_tagger, {"task": "token-classification", "ort_training": "never"}),
    "gpt2": (tm.tiny_gpt2, {"task": "causal-lm", "ort_training": "never"}),
    "mse": (lambda: tm.mlp(outputs=2), {"task": "regression", "ort_training": "never"}),
    "bce": (lambda: tm.mlp(outputs=4), {"task": "multilabel", "labels": list("wxyz"), "ort_training": "never"}),
    # paper-subset, +head, include and exclude regexes in one bundle: the head weight and the
    # LayerNorm scales (a scale gradient path) train, the attention-output LayerNorms do not.
    "policies": (tm.tiny_bert_classifier, {"policy": "paper-subset+head", "include": [r"LayerNorm\.weight$"],
                                          "exclude": [r"attention\.output\.LayerNorm"], "ort_training": "never"}),
    "wide": (wide_mlp, {}),
}
LOSSES = {"mlp": "cross-entropy", "cnn": "cross-entropy", "bert": "cross-entropy", "tagger": "token-cross-entropy",
          "gpt2": "token-cross-entropy", "mse": "mse", "bce": "bce-with-logits", "policies": "cross-entropy",
          "wide": "cross-entropy"}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A saved tiny BertForSequenceClassification with a WordLevel tokenizer.json."""
    path = tmp_path_factory.mktemp("hf") / "tiny-bert"
    return path, tm.save_tiny_bert_hf_dir(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, hf_dir):
    """``exported(name)`` -> (source model or None, example inputs or None, bundle), once per module."""
    cache = {}

    def get(name: str):
        if name in cache:
            return cache[name]
        root = tmp_path_factory.mktemp(name)
        if name in TORCH_SOURCES:
            builder, kwargs = TORCH_SOURCES[name]
            model, inputs = builder()
            bundle = export_bundle(model, root / "bundle", example_inputs=inputs, verbose=False, **kwargs)
        elif name == "onnx-file":
            model, inputs = distinct_net()
            torch_to_onnx(model, inputs, root / "net.onnx")
            bundle = export_bundle(root / "net.onnx", root / "bundle", verbose=False)
        elif name == "hf-text":
            path, model = hf_dir
            inputs = None
            bundle = export_bundle(path, root / "bundle", hf_task="text-classification", ort_training="never", verbose=False)
        elif name == "hf-features":
            path, model = hf_dir[0], None
            inputs = None
            bundle = export_bundle(path, root / "bundle", hf_task="feature-extraction", labels=["x", "y"],
                                   ort_training="never", verbose=False)
        cache[name] = (model, inputs, bundle)
        return cache[name]

    return get


ALL_SOURCES = [*TORCH_SOURCES, "onnx-file", "hf-text", "hf-features"]
REFERENCES = {**{n: TORCH_AUTOGRAD for n in TORCH_SOURCES}, "hf-text": TORCH_AUTOGRAD, "hf-features": TORCH_AUTOGRAD,
              "onnx-file": ORT_BUILDER if has_training_api() else "finite-differences"}


def gradient_session(bundle: Bundle, key: str = "portable_gradient_model"):
    return ort.InferenceSession(str(bundle.file(key)), providers=["CPUExecutionProvider"])


def run_gradient(bundle: Bundle, feeds: dict[str, np.ndarray], labels: np.ndarray):
    """(loss, model output, {name: gradient}) from the bundle's portable gradient model."""
    session = gradient_session(bundle)
    names = [o.name for o in session.get_outputs()]
    outs = dict(zip(names, session.run(None, {**feeds, bundle.manifest.label_input: labels, **bundle.trainable_base()})))
    return float(outs["loss"]), outs[bundle.manifest.logits_output], {
        t.name: outs[f"{t.name}_grad"] for t in bundle.manifest.trainable}


def torch_loss(loss: str, out: torch.Tensor, labels: np.ndarray, ignore_index: int = -100) -> torch.Tensor:
    target = torch.from_numpy(labels)
    if loss == "cross-entropy":
        return F.cross_entropy(out, target)
    if loss == "token-cross-entropy":
        return F.cross_entropy(out.transpose(1, 2), target, ignore_index=ignore_index)
    if loss == "mse":
        return F.mse_loss(out, target)
    return F.binary_cross_entropy_with_logits(out, target)


def torch_reference(model: torch.nn.Module, call, loss: str, labels: np.ndarray, names: list[str]):
    """(loss, output, {name: gradient}) by torch autograd, ``call(model)`` giving the output."""
    params = dict(model.named_parameters())
    out = call(model)
    value = torch_loss(loss, out, labels)
    grads = torch.autograd.grad(value, [params[n] for n in names])
    return float(value), out.detach().numpy(), {n: g.numpy() for n, g in zip(names, grads)}


def assert_gradients_match(ours, expected, tolerance: float = 2e-5) -> None:
    """Loss, output and every gradient within ``tolerance`` of the largest reference gradient."""
    loss, out, grads = ours
    ref_loss, ref_out, ref_grads = expected
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(out, ref_out, atol=1e-5 * max(1.0, float(np.abs(ref_out).max())), rtol=1e-4)
    assert grads.keys() == ref_grads.keys()
    largest = max(float(np.abs(g).max()) for g in ref_grads.values())
    assert largest > 0
    for name, value in ref_grads.items():
        assert grads[name].shape == value.shape, name
        error = float(np.abs(grads[name] - value).max()) / largest
        assert error <= tolerance, f"{name}: {error:.3g} of the largest gradient"


def random_labels(loss: str, out_shape: tuple[int, ...], rng: np.random.Generator, ignore_index: int = -100) -> np.ndarray:
    if loss == "cross-entropy":
        return rng.integers(0, out_shape[-1], out_shape[0]).astype(np.int64)
    if loss == "token-cross-entropy":
        labels = rng.integers(0, out_shape[-1], out_shape[:2]).astype(np.int64)
        labels[0, : out_shape[1] // 2] = ignore_index  # ignored positions
        labels[1:, -1] = ignore_index
        return labels
    if loss == "mse":
        return rng.standard_normal(out_shape).astype(np.float32)
    return (rng.random(out_shape) > 0.5).astype(np.float32)


# --- every source kind, loss and policy ----------------------------------------------------------

@pytest.mark.parametrize("name", ALL_SOURCES)
def test_bundle_has_the_portable_model_validated_against_its_reference(name, exported):
    _, _, bundle = exported(name)
    m = bundle.manifest
    assert m.format_version == 2
    for key in PORTABLE_KEYS:
        assert (bundle.path / m.files[key].path).is_file(), key
    assert m.training_backends["portable"] == {"available": True, "reason": ""}
    assert m.backend_available("portable")
    check = m.validation["portable"]
    assert check["gradient_reference"] == REFERENCES[name]
    assert 0 <= check["worst_gradient_error_relative"] <= 1e-4
    assert check["frozen_tensors_are_constants"] is True
    assert check["output_vs_inference_max_abs_diff"] <= 1e-4
    assert check["eval_vs_inference_after_step_max_abs_diff"] <= 1e-4
    assert m.loss == LOSSES.get(name, "cross-entropy")
    assert Bundle.open(bundle.path).manifest.to_json() == m.to_json()


@pytest.mark.parametrize("name", list(TORCH_SOURCES))
def test_torch_bundle_gradients_equal_torch_autograd_with_every_loss(name, exported):
    """Independent of the export's own check: fresh labels (token losses with ignored
    positions), the whole trainable set of the policy, torch's loss functions."""
    model, inputs, bundle = exported(name)
    m = bundle.manifest
    feeds = {k: v.numpy() for k, v in inputs.items()}
    out_shape = tuple(model(*inputs.values()).shape)
    labels = random_labels(m.loss, out_shape, np.random.default_rng(7))
    names = [t.name for t in m.trainable]
    expected = torch_reference(model, lambda mod: mod(*inputs.values()), m.loss, labels, names)
    assert_gradients_match(run_gradient(bundle, feeds, labels), expected)


def test_token_loss_skips_ignored_positions(exported):
    """The tagger reads each token alone, so what stands at an ignored position cannot
    change the loss or a gradient; un-ignoring a position does."""
    model, inputs, bundle = exported("tagger")
    assert bundle.manifest.ignore_index == -100
    ids = inputs["input_ids"].numpy()
    labels = random_labels("token-cross-entropy", (2, tm.SEQ, 5), np.random.default_rng(3))
    loss, _, grads = run_gradient(bundle, {"input_ids": ids}, labels)
    with torch.no_grad():
        logits = model(inputs["input_ids"])
    keep = labels != -100
    assert loss == pytest.approx(float(F.cross_entropy(logits[torch.from_numpy(keep)], torch.from_numpy(labels[keep]))), rel=1e-5)
    other_ids = np.where(keep, ids, (ids + 17) % tm.VOCAB)
    other_loss, _, other_grads = run_gradient(bundle, {"input_ids": other_ids}, labels)
    assert other_loss == pytest.approx(loss, rel=1e-6)
    for name, grad in grads.items():
        np.testing.assert_allclose(other_grads[name], grad, rtol=1e-5, atol=1e-7, err_msg=name)
    counted = np.where(keep, labels, 0)
    assert abs(run_gradient(bundle, {"input_ids": other_ids}, counted)[0] - loss) > 1e-4
    # A batch with nothing to learn from: loss 0 and zero gradients (not 0 / 0).
    nothing_loss, _, nothing = run_gradient(bundle, {"input_ids": ids}, np.full_like(labels, -100))
    assert nothing_loss == 0.0
    assert all(not g.any() for g in nothing.values()), "an all-ignored batch must not give NaN or nonzero gradients"


def test_policies_bundle_trains_exactly_the_selected_tensors(exported):
    model, _, bundle = exported("policies")
    m = bundle.manifest
    names = [t.name for t in m.trainable]
    assert names[:4] == PAPER and "inner.classifier.weight" in names
    scales = [n for n in names if n.endswith("LayerNorm.weight")]
    assert scales and not [n for n in scales if "attention.output" in n]
    gradient = gradient_session(bundle)
    trainable_inputs = [i.name for i in gradient.get_inputs()][-len(names):]
    assert trainable_inputs == names
    assert [o.name for o in gradient.get_outputs()][2:] == [f"{n}_grad" for n in names]
    shapes = {o.name: o.shape for o in gradient.get_outputs()}
    assert shapes["inner.classifier.weight_grad"] == [3, 32]
    assert (m.policy["name"], m.policy["include"], m.policy["exclude"]) == (
        "paper-subset+head", [r"LayerNorm\.weight$"], [r"attention\.output\.LayerNorm"])
    assert next(t for t in m.trainable if t.name == "inner.classifier.weight").role == "head-weight"


def test_onnx_file_gradients_equal_torch_autograd(exported):
    model, inputs, bundle = exported("onnx-file")
    assert bundle.manifest.source["kind"] == "onnx"
    assert bundle.manifest.backend_available("ort-training") == has_training_api()
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 8)).astype(np.float32)
    labels = random_labels("cross-entropy", (4, 8), rng)
    names = [t.name for t in bundle.manifest.trainable]
    assert names == tm.bias_names(model)
    expected = torch_reference(model, lambda mod: mod(torch.from_numpy(x)), "cross-entropy", labels, names)
    assert_gradients_match(run_gradient(bundle, {"x": x}, labels), expected)


def test_hf_directory_gradients_equal_transformers_autograd(exported):
    model, _, bundle = exported("hf-text")
    assert bundle.manifest.source["kind"] == "hf"
    rng = np.random.default_rng(4)
    feeds = {"input_ids": rng.integers(4, 44, (3, 7)).astype(np.int64), "attention_mask": np.ones((3, 7), np.int64),
             "token_type_ids": np.zeros((3, 7), np.int64)}
    feeds["attention_mask"][2, 4:] = 0
    labels = np.array([0, 2, 1], np.int64)
    names = [t.name for t in bundle.manifest.trainable]
    expected = torch_reference(model, lambda mod: mod(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits,
                               "cross-entropy", labels, names)
    assert_gradients_match(run_gradient(bundle, feeds, labels), expected)


def test_hf_feature_extraction_trains_the_grafted_head_too(exported):
    _, _, bundle = exported("hf-features")
    names = [t.name for t in bundle.manifest.trainable]
    assert names[-1] == "head.bias" and bundle.manifest.labels == ["x", "y"]
    feeds = {"input_ids": np.full((2, 5), 7, np.int64), "attention_mask": np.ones((2, 5), np.int64),
             "token_type_ids": np.zeros((2, 5), np.int64)}
    loss, out, grads = run_gradient(bundle, feeds, np.array([0, 1], np.int64))
    assert out.shape == (2, 2) and np.isfinite(loss)
    assert all(grads[n].any() for n in names), "every trainable tensor gets a gradient"


@pytest.mark.integration
def test_minilm_bundle_has_a_validated_portable_model(minilm_bundle):
    m = minilm_bundle.manifest
    assert m.backend_available("portable")
    check = m.validation["portable"]
    assert check["gradient_reference"] == TORCH_AUTOGRAD
    assert check["worst_gradient_error_relative"] <= 1e-4
    assert_portable_models_are_standard_onnx(minilm_bundle)
    assert_weights_stored_once(minilm_bundle)


# --- dynamic axes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, shapes", [("bert", [(1, 3), (5, 7), (2, 16)]), ("gpt2", [(1, 2), (3, 9)])])
def test_one_gradient_model_serves_every_batch_size_and_length(name, shapes, exported):
    model, _, bundle = exported(name)
    m = bundle.manifest
    names = [t.name for t in m.trainable]
    rng = np.random.default_rng(11)
    for batch, length in shapes:
        ids = rng.integers(5, tm.VOCAB, (batch, length)).astype(np.int64)
        mask = np.ones((batch, length), np.int64)
        mask[-1, length // 2 + 1:] = 0
        feeds = {"input_ids": ids, "attention_mask": mask}
        logits_shape = (batch, 3) if m.loss == "cross-entropy" else (batch, length, tm.VOCAB)
        labels = random_labels(m.loss, logits_shape, rng)
        expected = torch_reference(model, lambda mod: mod(*(torch.from_numpy(v) for v in feeds.values())), m.loss, labels, names)
        assert_gradients_match(run_gradient(bundle, feeds, labels), expected)


# --- bundle facts ---------------------------------------------------------------------------------

def _portable_models(bundle: Bundle) -> dict[str, onnx.ModelProto]:
    return {key: onnx.load(str(bundle.file(key)), load_external_data=False) for key in PORTABLE_KEYS}


def assert_portable_models_are_standard_onnx(bundle: Bundle) -> None:
    for key, model in _portable_models(bundle).items():
        assert model.ir_version <= 10, key
        assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}, key
        assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}, key
        assert next(o.version for o in model.opset_import) == bundle.manifest.opset >= 13, key


def assert_weights_stored_once(bundle: Bundle) -> None:
    """No frozen weight is inline in a portable model: each reads weights.safetensors, and
    the trainable tensors are inputs."""
    weights = bundle.manifest.files["weights"].path
    base = bundle.base_weights()
    trainable = {t.name for t in bundle.manifest.trainable}
    for key, model in _portable_models(bundle).items():
        graph = model.graph
        assert not trainable & {i.name for i in graph.initializer}, key
        assert trainable <= {i.name for i in graph.input}, key
        for init in graph.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                location = {e.key: e.value for e in init.external_data}["location"]
                assert location == weights, (key, init.name)
            else:
                size = len(init.raw_data) + 4 * (len(init.float_data) + len(init.int32_data)) + 8 * len(init.int64_data)
                assert size <= 1024 and init.name not in base, f"{key}: {init.name} ({size} bytes) is inline"


@pytest.mark.parametrize("name", ALL_SOURCES)
def test_portable_models_are_standard_onnx_reading_the_weights_file(name, exported):
    _, _, bundle = exported(name)
    assert_portable_models_are_standard_onnx(bundle)
    assert_weights_stored_once(bundle)


def test_weights_are_stored_once(exported):
    """A bundle of a model whose weights dominate is hardly larger than its weights, with
    both training backends in it."""
    _, _, bundle = exported("wide")
    assert bundle.manifest.backend_available("portable")
    assert bundle.manifest.backend_available("ort-training") == has_training_api()
    weights = (bundle.path / bundle.manifest.files["weights"].path).stat().st_size
    assert weights > 4_000_000
    total = sum(p.stat().st_size for p in bundle.path.rglob("*") if p.is_file())
    assert total / weights <= 1.05


# --- ort_training ----------------------------------------------------------------------------------

def test_never_gives_a_portable_only_bundle_that_opens(exported):
    _, _, bundle = exported("cnn")
    m = bundle.manifest
    assert not [k for k in ORT_TRAINING_KEYS if k in m.files]
    assert not list(bundle.path.glob("training_model.onnx")) and not list(bundle.path.glob("checkpoint*"))
    assert m.training_backends["ort-training"] == {"available": False, "reason": "ort_training='never' was asked"}
    assert m.backend_reason("ort-training") == "ort_training='never' was asked"
    reopened = Bundle.open(bundle.path)
    assert reopened.manifest.backend_available("portable") and not reopened.manifest.backend_available("ort-training")
    assert "one_step_frozen_unchanged" not in m.validation  # no ORT-training check without its artifacts


def test_required_without_the_training_api_is_backend_unavailable(tmp_path, monkeypatch):
    monkeypatch.setattr("bitfit.export.pipeline.has_training_api", lambda: False)
    model, inputs = tm.mlp()
    with pytest.raises(BackendUnavailableError, match="ort_training='required' but .*onnxruntime-training"):
        export_bundle(model, tmp_path / "b", example_inputs=inputs, ort_training="required", verbose=False)
    assert not (tmp_path / "b").exists()


def test_auto_without_the_training_api_writes_a_portable_only_bundle_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr("bitfit.export.pipeline.has_training_api", lambda: False)
    model, inputs = tm.mlp()
    bundle = export_bundle(model, tmp_path / "b", example_inputs=inputs, verbose=False)
    m = bundle.manifest
    assert m.training_backends["portable"] == {"available": True, "reason": ""}
    assert m.training_backends["ort-training"] == {"available": False, "reason": NO_TRAINING_API}
    assert "onnxruntime-training" in m.backend_reason("ort-training")
    assert not [k for k in ORT_TRAINING_KEYS if k in m.files]
    assert m.validation["portable"]["gradient_reference"] == TORCH_AUTOGRAD
    assert Bundle.open(bundle.path).manifest.to_json() == m.to_json()


def test_no_portable_rule_and_never_is_an_export_error_leaving_nothing(tmp_path):
    model, inputs = leaky_max_net()
    out = tmp_path / "out" / "b"
    with pytest.raises(ExportError, match=r"cannot have a portable training model \(no portable gradient rule for ops on "
                                          r"the training path: Max x1\).*ort_training='never'.*no backend could train it"):
        export_bundle(model, out, example_inputs=inputs, ort_training="never", verbose=False)
    assert not out.exists()
    assert not list((tmp_path / "out").iterdir())  # no work directory left behind either


@pytest.mark.skipif(not has_training_api(), reason="needs onnxruntime-training")
def test_no_portable_rule_with_the_training_api_gives_an_ort_training_bundle_saying_why(tmp_path):
    model, inputs = leaky_max_net()
    bundle = export_bundle(model, tmp_path / "b", example_inputs=inputs, verbose=False)
    m = bundle.manifest
    assert m.training_backends["portable"]["available"] is False
    assert m.backend_reason("portable") == "no portable gradient rule for ops on the training path: Max x1"
    assert m.backend_available("ort-training")
    assert not [k for k in PORTABLE_KEYS if k in m.files] and not list(bundle.path.glob("portable_*"))
    assert "portable" not in m.validation


# --- format 1 ----------------------------------------------------------------------------------------

def _rewrite_manifest(bundle_dir: Path, edit) -> None:
    path = bundle_dir / "manifest.json"
    raw = json.loads(path.read_text())
    raw.pop("checksum")
    edit(raw)
    raw["checksum"] = manifest_checksum(raw)
    path.write_text(json.dumps(raw, indent=2))


def test_format_1_bundle_opens_with_portable_unavailable_saying_re_export(exported, tmp_path):
    _, _, bundle = exported("mlp")
    assert bundle.manifest.backend_available("ort-training"), "format 1 bundles have the ORT-training artifacts"
    copy = tmp_path / "format1"
    shutil.copytree(bundle.path, copy)

    def to_format_1(raw):
        raw["format_version"] = 1
        del raw["training_backends"]
        for key in PORTABLE_KEYS:
            (copy / raw["files"].pop(key)["path"]).unlink()
        raw["validation"].pop("portable")
        raw["source"].pop("portable")

    _rewrite_manifest(copy, to_format_1)
    old = Bundle.open(copy)
    m = old.manifest
    assert m.format_version == 1
    assert m.training_backends["portable"]["available"] is False
    assert not m.backend_available("portable") and m.backend_available("ort-training")
    reason = m.backend_reason("portable")
    assert "format 1" in reason and "re-export" in reason


def test_unknown_format_version_is_refused_clearly(exported, tmp_path):
    _, _, bundle = exported("mlp")
    copy = tmp_path / "format3"
    shutil.copytree(bundle.path, copy)
    _rewrite_manifest(copy, lambda raw: raw.update(format_version=3))
    with pytest.raises(BundleInvalidError, match=r"format_version 3 is not supported by this bitfit \(reads versions 1, 2\)"):
        Bundle.open(copy)
