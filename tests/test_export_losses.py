"""Losses and optimizers: each exports, validates, and computes what torch computes."""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import get_args

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

import tiny_models as tm
from bitfit.export import export_bundle
from bitfit.export.artifacts import LOSS_FOR_TASK, loss_for
from bitfit.export.validate import example_labels
from bitfit.sdk.bundle import LossName, OptimizerName, Task
from bitfit.sdk.errors import ExportError, ValidationFailedError
from bitfit.sdk.trainer import TrainingSession


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """``bundles(name)`` -> (model, example inputs, bundle), exported once per module."""
    specs = {
        "regression": (lambda: tm.mlp(outputs=1), {"task": "regression"}),
        "multilabel": (lambda: tm.mlp(outputs=4), {"task": "multilabel", "labels": ["w", "x", "y", "z"]}),
        "tokens": (tm.token_tagger, {"task": "token-classification"}),
        "tokens-ignore-minus-one": (tm.token_tagger, {"task": "token-classification", "ignore_index": -1}),
        "classification-sgd": (tm.mlp, {"optimizer": "sgd", "labels": ["a", "b", "c"]}),
        "classification-adamw": (tm.mlp, {"labels": ["a", "b", "c"]}),
        "mse-explicit": (lambda: tm.mlp(outputs=2), {"loss": "mse", "optimizer": "sgd"}),
    }
    cache = {}

    def get(name: str):
        if name not in cache:
            builder, kwargs = specs[name]
            model, inputs = builder()
            bundle = export_bundle(model, tmp_path_factory.mktemp(name) / "b", example_inputs=inputs, **kwargs)
            cache[name] = (model, inputs, bundle)
        return cache[name]

    return get


def numpy_feeds(inputs):
    return {k: v.numpy() for k, v in inputs.items()}


LOSS_CASES = [
    ("regression", "regression", "mse", "adamw"),
    ("multilabel", "multilabel", "bce-with-logits", "adamw"),
    ("tokens", "token-classification", "token-cross-entropy", "adamw"),
    ("classification-sgd", "classification", "cross-entropy", "sgd"),
    ("mse-explicit", "classification", "mse", "sgd"),
]


def test_every_loss_optimizer_and_task_of_the_manifest_format_is_covered():
    """The Literals in bitfit.sdk.bundle are the one list: a loss or optimizer added there
    without an export case here, or a task without a default loss, fails this test."""
    assert {case[2] for case in LOSS_CASES} == set(get_args(LossName))
    assert {case[3] for case in LOSS_CASES} == set(get_args(OptimizerName))
    assert sorted(LOSS_FOR_TASK) == sorted(get_args(Task)) and set(LOSS_FOR_TASK.values()) <= set(get_args(LossName))
    with pytest.raises(ExportError, match="unknown task 'ranking': use one of classification, regression"):
        loss_for("ranking")
    rng = np.random.default_rng(0)
    shapes = {"cross-entropy": (4,), "token-cross-entropy": (4, 5), "mse": (4, 5, 3), "bce-with-logits": (4, 5, 3)}
    for loss in get_args(LossName):
        labels = example_labels(SimpleNamespace(manifest=SimpleNamespace(loss=loss)), np.zeros((4, 5, 3), np.float32), rng)
        assert labels.shape == shapes[loss], loss
    with pytest.raises(ValidationFailedError, match="loss 'hinge'"):
        example_labels(SimpleNamespace(manifest=SimpleNamespace(loss="hinge")), np.zeros((4, 3), np.float32), rng)


@pytest.mark.parametrize("name, task, loss, optimizer", LOSS_CASES)
def test_each_loss_and_optimizer_exports_and_validates(name, task, loss, optimizer, bundles, check_bundle):
    model, _, bundle = bundles(name)
    check_bundle(bundle, trainable=tm.bias_names(model))
    m = bundle.manifest
    assert (m.task, m.loss, m.optimizer) == (task, loss, optimizer)
    assert m.ignore_index == (-100 if loss == "token-cross-entropy" else None)
    assert m.label_input == "labels"
    ops = {n.op_type for n in onnx.load(str(bundle.file("optimizer_model"))).graph.node}
    assert ops == {"SGDOptimizerV2" if optimizer == "sgd" else "AdamWOptimizer"}


def test_multilabel_records_its_labels(bundles):
    _, _, bundle = bundles("multilabel")
    assert bundle.manifest.labels == ["w", "x", "y", "z"]
    assert bundle.manifest.outputs[0].shape == ["batch", 4]


def test_mse_loss_equals_torch(bundles):
    model, inputs, bundle = bundles("regression")
    target = np.array([[0.5], [-1.0]], np.float32)
    loss, logits = TrainingSession(bundle).evaluate(numpy_feeds(inputs), target)
    with torch.no_grad():
        expected = F.mse_loss(model(inputs["x"]), torch.from_numpy(target)).item()
    assert loss == pytest.approx(expected, rel=1e-5)
    assert logits.shape == (2, 1)


def test_bce_with_logits_loss_equals_torch(bundles):
    model, inputs, bundle = bundles("multilabel")
    target = np.array([[1, 0, 1, 1], [0, 0, 1, 0]], np.float32)
    loss, _ = TrainingSession(bundle).evaluate(numpy_feeds(inputs), target)
    with torch.no_grad():
        expected = F.binary_cross_entropy_with_logits(model(inputs["x"]), torch.from_numpy(target)).item()
    assert loss == pytest.approx(expected, rel=1e-5)


def test_cross_entropy_loss_equals_torch(bundles):
    model, inputs, bundle = bundles("classification-adamw")
    target = np.array([2, 0], np.int64)
    loss, _ = TrainingSession(bundle).evaluate(numpy_feeds(inputs), target)
    with torch.no_grad():
        expected = F.cross_entropy(model(inputs["x"]), torch.from_numpy(target)).item()
    assert loss == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name, ignore", [("tokens", -100), ("tokens-ignore-minus-one", -1)])
def test_token_cross_entropy_skips_ignored_positions(name, ignore, bundles):
    model, inputs, bundle = bundles(name)
    assert bundle.manifest.ignore_index == ignore
    assert bundle.manifest.outputs[0].shape == ["batch", "sequence", 5]
    labels = np.array([[0, 1, 2, 3, ignore, ignore], [4, ignore, 0, 1, 2, 3]], np.int64)
    trainer = TrainingSession(bundle)
    loss, logits = trainer.evaluate(numpy_feeds(inputs), labels)
    with torch.no_grad():
        torch_logits = model(inputs["input_ids"])
        expected = F.cross_entropy(torch_logits.reshape(-1, 5), torch.from_numpy(labels).reshape(-1), ignore_index=ignore).item()
        everything = F.cross_entropy(torch_logits.reshape(-1, 5), torch.from_numpy(np.where(labels == ignore, 0, labels)).reshape(-1)).item()
    assert loss == pytest.approx(expected, rel=1e-5)
    assert abs(expected - everything) > 1e-3  # the ignored positions would have changed the loss
    np.testing.assert_allclose(logits, torch_logits.numpy(), atol=1e-5)


def test_token_training_moves_only_the_trainable_tensors(bundles):
    model, inputs, bundle = bundles("tokens")
    trainer = TrainingSession(bundle, learning_rate=0.05)
    order = bundle.manifest.source["parameter_order"]
    before = trainer.parameter_values(order)
    labels = np.zeros((2, tm.SEQ), np.int64)
    losses = [trainer.train_step(numpy_feeds(inputs), labels) for _ in range(5)]
    after = trainer.parameter_values(order)
    assert losses[-1] < losses[0]
    for name in order:
        assert np.array_equal(before[name], after[name]) != (name in tm.bias_names(model)), name


@pytest.mark.parametrize("name, target", [
    ("classification-sgd", np.array([1, 2], np.int64)),
    ("mse-explicit", np.array([[0.3, -0.2], [1.0, 0.0]], np.float32)),
])
def test_sgd_step_is_bias_minus_lr_times_torch_gradient(name, target, bundles):
    model, inputs, bundle = bundles(name)
    lr = 0.3
    trainer = TrainingSession(bundle, learning_rate=lr)
    loss = trainer.train_step(numpy_feeds(inputs), target)
    reference = copy.deepcopy(model)
    out = reference(inputs["x"])
    torch_loss = F.cross_entropy(out, torch.from_numpy(target)) if target.dtype == np.int64 else F.mse_loss(out, torch.from_numpy(target))
    torch_loss.backward()
    assert loss == pytest.approx(torch_loss.item(), rel=1e-5)
    trained = trainer.trainable_values()
    for pname, param in reference.named_parameters():
        if pname in trained:
            np.testing.assert_allclose(trained[pname], (param - lr * param.grad).detach().numpy(), atol=1e-6, err_msg=pname)


def test_adamw_first_step_matches_the_adamw_formula(bundles):
    """Step 1 of AdamW (beta2 0.999, eps 1e-6, bias correction, no weight decay):
    update = lr * sqrt(1 - beta2) * g / (sqrt(1 - beta2) * |g| + eps), i.e. ~lr * sign(g)."""
    model, inputs, bundle = bundles("classification-adamw")
    lr = 1e-2
    trainer = TrainingSession(bundle, learning_rate=lr)
    start = trainer.trainable_values()
    target = np.array([1, 2], np.int64)
    trainer.train_step(numpy_feeds(inputs), target)
    trained = trainer.trainable_values()
    reference = copy.deepcopy(model)
    F.cross_entropy(reference(inputs["x"]), torch.from_numpy(target)).backward()
    root = np.sqrt(1 - 0.999)
    for pname, param in reference.named_parameters():
        if pname in trained:
            grad = param.grad.numpy()
            expected = -lr * root * grad / (root * np.abs(grad) + 1e-6)
            np.testing.assert_allclose(trained[pname] - start[pname], expected, rtol=1e-3, atol=1e-7, err_msg=pname)
            assert np.abs(trained[pname] - start[pname]).max() > 0.9 * lr
