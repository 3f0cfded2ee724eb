"""``bitfit.sdk.metrics`` against hand-computed values and plain-numpy reference formulas
(no sklearn): F1 (macro, per label, micro), token metrics with an ignore index, each loss's
``mean_loss``, ``merge_batches`` padding; and the same numbers through ``personalize`` and
``evaluate``."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitfit.sdk import Personalizer
from bitfit.sdk.data import split_holdout
from bitfit.sdk.metrics import (
    better, classification_metrics, mean_loss, merge_batches, multilabel_metrics, perplexity, primary_metric,
    regression_metrics, task_metrics, token_metrics,
)
from bitfit.sdk.training_plan import plan_training

from sdk_fixtures import *  # noqa: F401,F403  (fixtures and helpers)
from task_fixtures import *  # noqa: F401,F403
from task_fixtures import habit_data


# -- references: what the metrics mean, written out plainly ------------------------------------


def reference_f1(predicted: np.ndarray, truth: np.ndarray, cls) -> float:
    """F1 of one class from its confusion counts; 1.0 when the class is neither present nor predicted."""
    tp = int(np.sum((predicted == cls) & (truth == cls)))
    fp = int(np.sum((predicted == cls) & (truth != cls)))
    fn = int(np.sum((predicted != cls) & (truth == cls)))
    if tp + fp + fn == 0:
        return 1.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def reference_macro_f1(predicted: np.ndarray, truth: np.ndarray) -> float:
    classes = sorted(set(predicted.tolist()) | set(truth.tolist()))
    return float(np.mean([reference_f1(predicted, truth, c) for c in classes]))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


# -- classification ----------------------------------------------------------------------------


def test_macro_f1_by_hand():
    # class 0: tp 1, fp 1, fn 0 -> 2/3; class 1: tp 2, fp 0, fn 1 -> 4/5; class 2: tp 1 -> 1.
    m = classification_metrics(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 2]))
    assert m["accuracy"] == pytest.approx(4 / 5)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 4 / 5 + 1) / 3)


def test_macro_f1_counts_a_class_that_is_only_predicted():
    # Class 2 never occurs but is predicted once: its F1 is 0 and it pulls the mean down.
    m = classification_metrics(np.array([0, 2]), np.array([0, 0]))
    assert m == {"accuracy": 0.5, "macro_f1": pytest.approx((2 / 3 + 0.0) / 2)}


def test_macro_f1_ignores_classes_absent_from_both():
    # A class the model has but neither labels nor predictions use does not dilute the mean.
    assert classification_metrics(np.array([1, 1, 3]), np.array([1, 1, 3]), classes=5)["macro_f1"] == 1.0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=60))
def test_classification_metrics_match_the_reference(pairs):
    predicted, truth = (np.array(x) for x in zip(*pairs))
    m = classification_metrics(predicted, truth)
    assert m["accuracy"] == pytest.approx(float(np.mean(predicted == truth)))
    assert m["macro_f1"] == pytest.approx(reference_macro_f1(predicted, truth))


def test_task_metrics_of_a_classifier_take_the_argmax_of_the_logits():
    logits = np.array([[2.0, 0.1, 0.0], [0.3, 1.0, 0.2], [0.9, 0.2, 3.0], [0.0, 5.0, 0.0]])
    labels = np.array([0, 1, 1, 1])
    assert task_metrics("cross-entropy", logits, labels) == classification_metrics(np.array([0, 1, 2, 1]), labels)
    assert classification_metrics(np.array([]), np.array([])) == {}


# -- multi-label -------------------------------------------------------------------------------


def test_per_label_f1_by_hand():
    predicted = np.array([[1, 0, 1], [1, 1, 0], [0, 0, 0], [1, 0, 1]], bool)
    truth = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 1, 1]], bool)
    m = multilabel_metrics(predicted, truth, label_names=["x", "y", "z"])
    # x: tp 2, fp 1, fn 0 -> 4/5; y: tp 1, fp 0, fn 1 -> 2/3; z: tp 1, fp 1, fn 0 -> 2/3.
    assert m["f1/x"] == pytest.approx(4 / 5) and m["f1/y"] == pytest.approx(2 / 3) and m["f1/z"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((4 / 5 + 2 / 3 + 2 / 3) / 3)
    assert m["micro_f1"] == pytest.approx(2 * 4 / (2 * 4 + 2 + 1))  # tp 4, fp 2, fn 1 over every label
    assert m["subset_accuracy"] == pytest.approx(1 / 4)  # only the all-empty row is exactly right
    assert m["label_accuracy"] == pytest.approx(9 / 12)


def test_a_label_never_set_nor_predicted_scores_one_and_unnamed_labels_get_indices():
    m = multilabel_metrics(np.array([[1, 0], [0, 0]], bool), np.array([[1, 0], [0, 0]], bool))
    assert m["f1/0"] == 1.0 and m["f1/1"] == 1.0  # nothing to find and nothing found
    # Names that do not fit the width are not used.
    assert "f1/1" in multilabel_metrics(np.array([[1, 0]], bool), np.array([[1, 0]], bool), label_names=["only"])


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 20), st.integers(1, 5), st.integers(0, 2**16))
def test_multilabel_metrics_match_the_reference(rows, width, seed):
    rng = np.random.default_rng(seed)
    predicted, truth = rng.random((rows, width)) < 0.4, rng.random((rows, width)) < 0.4
    names = [f"l{j}" for j in range(width)]
    m = multilabel_metrics(predicted, truth, label_names=names)
    per_label = [reference_f1(predicted[:, j], truth[:, j], True) for j in range(width)]
    assert [m[f"f1/{n}"] for n in names] == pytest.approx(per_label)
    assert m["macro_f1"] == pytest.approx(np.mean(per_label))
    assert m["micro_f1"] == pytest.approx(reference_f1(predicted.ravel(), truth.ravel(), True))
    assert m["subset_accuracy"] == pytest.approx(np.mean([(p == t).all() for p, t in zip(predicted, truth)]))


def test_multilabel_task_metrics_threshold_logits_at_zero_and_labels_at_half():
    logits = np.array([[0.1, -0.1], [-2.0, 3.0]])
    labels = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert task_metrics("bce-with-logits", logits, labels)["subset_accuracy"] == 1.0
    assert task_metrics("bce-with-logits", -logits, labels)["subset_accuracy"] == 0.0


# -- tokens ------------------------------------------------------------------------------------


def test_token_metrics_by_hand():
    predicted = np.array([[1, 2, 0, 4], [3, 3, 1, 0]])
    labels = np.array([[1, 0, -100, -100], [3, 3, 2, -100]])
    m = token_metrics(predicted, labels)
    assert m["tokens"] == 5.0
    assert m["token_accuracy"] == pytest.approx(3 / 5)  # 1, 3, 3 right; 2 for 0 and 1 for 2 wrong
    kept = labels != -100
    assert m["macro_f1"] == pytest.approx(reference_macro_f1(predicted[kept], labels[kept]))


def test_token_metrics_do_not_look_at_ignored_positions():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (6, 9))
    labels[rng.random(labels.shape) < 0.4] = -100
    predicted = rng.integers(0, 5, labels.shape)
    scrambled = np.where(labels == -100, rng.integers(0, 5, labels.shape), predicted)
    assert token_metrics(predicted, labels) == token_metrics(scrambled, labels)
    # Another ignore index works the same way; with none, every position counts.
    assert token_metrics(predicted, np.where(labels == -100, -1, labels), ignore_index=-1) == token_metrics(predicted, labels)
    assert token_metrics(predicted, np.where(labels == -100, 0, labels), ignore_index=None)["tokens"] == labels.size


def test_token_metrics_with_every_position_ignored():
    assert token_metrics(np.zeros((2, 3), int), np.full((2, 3), -100)) == {"tokens": 0.0}
    assert mean_loss("token-cross-entropy", np.zeros((2, 3, 4)), np.full((2, 3), -100)) == 0.0


# -- regression and perplexity -----------------------------------------------------------------


def test_regression_metrics_by_hand():
    m = regression_metrics(np.array([[1.5], [2.0], [-1.0]]), np.array([1.0, 3.0, -1.0]))
    assert m["mae"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert m["rmse"] == pytest.approx(math.sqrt((0.25 + 1.0) / 3))
    wide = regression_metrics(np.array([[0.0, 1.0], [2.0, 2.0]]), np.array([[1.0, 1.0], [2.0, 0.0]]))
    assert wide == {"mae": pytest.approx(3 / 4), "rmse": pytest.approx(math.sqrt(5 / 4))}
    assert task_metrics("mse", np.array([[1.5], [2.0], [-1.0]]), np.array([1.0, 3.0, -1.0])) == m


def test_perplexity_is_exp_of_the_loss_and_inf_past_overflow():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(50.0)) == pytest.approx(50.0)
    assert perplexity(1e4) == math.inf


def test_primary_metric_and_better():
    assert [primary_metric(t) for t in ("classification", "regression", "multilabel", "token-classification",
                                        "causal-lm")] == ["accuracy", "mae", "micro_f1", "token_accuracy", "perplexity"]
    assert better("perplexity", 10.0, 20.0) and not better("accuracy", 0.5, 0.5) and better("macro_f1", 0.6, 0.5)


# -- losses ------------------------------------------------------------------------------------


def test_cross_entropy_is_minus_mean_log_softmax_of_the_label():
    logits = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0], [1.0, 3.0, 0.2]])
    labels = np.array([0, 2, 1])
    expected = -np.mean([math.log(math.exp(row[y]) / sum(math.exp(v) for v in row)) for row, y in zip(logits, labels)])
    assert mean_loss("cross-entropy", logits, labels) == pytest.approx(expected)
    assert mean_loss("cross-entropy", np.array([[0.0, 0.0]]), np.array([1])) == pytest.approx(math.log(2))
    # Large logits stay finite (log-sum-exp with the max taken out).
    assert mean_loss("cross-entropy", np.array([[1000.0, 0.0]]), np.array([1])) == pytest.approx(1000.0)


def test_token_cross_entropy_averages_the_counted_tokens_only():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 5, 7))
    labels = rng.integers(0, 7, (3, 5))
    labels[0, 3:] = labels[2, 1] = -100
    kept = labels != -100
    picked = np.take_along_axis(log_softmax(logits), np.where(kept, labels, 0)[..., None], -1)[..., 0]
    assert mean_loss("token-cross-entropy", logits, labels) == pytest.approx(-picked[kept].sum() / kept.sum())
    assert mean_loss("token-cross-entropy", logits, np.where(kept, labels, -1), ignore_index=-1) == \
        pytest.approx(-picked[kept].mean())


def test_mse_is_the_mean_squared_difference():
    outputs, targets = np.array([[1.0], [3.0], [0.5]]), np.array([0.0, 3.0, -0.5])
    assert mean_loss("mse", outputs, targets) == pytest.approx((1.0 + 0.0 + 1.0) / 3)
    wide = np.array([[1.0, 2.0], [0.0, 0.0]])
    assert mean_loss("mse", wide, np.zeros((2, 2))) == pytest.approx(5 / 4)


def test_bce_with_logits_is_the_binary_cross_entropy_of_the_sigmoid():
    logits = np.array([[0.3, -1.2, 2.0], [0.0, 4.0, -0.7]])
    targets = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    p = 1 / (1 + np.exp(-logits))
    expected = -np.mean(targets * np.log(p) + (1 - targets) * np.log(1 - p))
    assert mean_loss("bce-with-logits", logits, targets) == pytest.approx(expected)
    # Stable where the sigmoid saturates: a confident right answer costs ~0, a wrong one ~|logit|.
    assert mean_loss("bce-with-logits", np.array([[100.0, -100.0]]), np.array([[1.0, 0.0]])) == pytest.approx(0.0, abs=1e-30)
    assert mean_loss("bce-with-logits", np.array([[100.0]]), np.array([[0.0]])) == pytest.approx(100.0)


def test_unknown_losses_are_refused():
    with pytest.raises(ValueError, match="no loss 'hinge'"):
        mean_loss("hinge", np.zeros((1, 2)), np.zeros(1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no metrics for loss 'hinge'"):
        task_metrics("hinge", np.zeros((1, 2)), np.zeros(1))  # type: ignore[arg-type]


# -- merge_batches -----------------------------------------------------------------------------


def test_merge_batches_pads_token_batches_with_the_ignore_index():
    a_out, a_lab = np.ones((2, 3, 4)), np.array([[0, 1, 2], [3, -100, -100]])
    b_out, b_lab = np.full((1, 5, 4), 2.0), np.array([[1, 1, 1, 1, 1]])
    outputs, labels = merge_batches([(a_out, a_lab), (b_out, b_lab)])
    assert outputs.shape == (3, 5, 4) and labels.shape == (3, 5)
    np.testing.assert_array_equal(outputs[:2, 3:], 0.0)  # padded outputs
    np.testing.assert_array_equal(labels[:2, 3:], -100)  # ... never counted
    np.testing.assert_array_equal(outputs[:2, :3], a_out)
    np.testing.assert_array_equal(labels[2], b_lab[0])
    _, custom = merge_batches([(a_out, a_lab), (b_out, b_lab)], ignore_index=-1)
    np.testing.assert_array_equal(custom[:2, 3:], -1)


def test_metrics_of_merged_batches_equal_those_of_all_tokens_together():
    rng = np.random.default_rng(2)
    parts = []
    for length in (3, 7, 5):
        labels = rng.integers(0, 4, (2, length))
        labels[:, -1] = -100
        parts.append((rng.normal(size=(2, length, 4)), labels))
    outputs, labels = merge_batches(parts)
    flat_out = np.concatenate([o.reshape(-1, 4) for o, _ in parts])
    flat_lab = np.concatenate([lab.ravel() for _, lab in parts])
    assert token_metrics(outputs.argmax(-1), labels) == token_metrics(flat_out.argmax(-1), flat_lab)
    assert mean_loss("token-cross-entropy", outputs, labels) == pytest.approx(mean_loss("token-cross-entropy", flat_out, flat_lab))


def test_merge_batches_concatenates_row_batches():
    outputs, labels = merge_batches([(np.zeros((2, 3)), np.array([0, 1])), (np.ones((1, 3)), np.array([2]))])
    assert outputs.shape == (3, 3) and labels.tolist() == [0, 1, 2]
    outputs, labels = merge_batches([(np.zeros((2, 1)), np.array([0.5, 1.0])), (np.ones((3, 1)), np.zeros(3))])
    assert outputs.shape == (5, 1) and labels.shape == (5,)
    outputs, labels = merge_batches([(np.zeros((2, 4)), np.zeros((2, 4))), (np.ones((1, 4)), np.ones((1, 4)))])
    assert outputs.shape == labels.shape == (3, 4)  # multi-label: not mistaken for tokens


# -- the same numbers through personalize and evaluate -----------------------------------------


def held_out(count: int, seed: int, labels=None, holdout=None):
    """The examples personalize held out (the same rng draws as personalize's own split)."""
    rng = np.random.default_rng(seed)
    plan = plan_training(count, learning_rate=1e-2, holdout=holdout)
    _, index = split_holdout(count, plan.holdout, rng, labels=labels)
    return index


def test_evaluate_on_the_holdout_reproduces_personalizes_metrics(numeric_bundle, tmp_path):
    """personalize scores the holdout through the training graph, evaluate through inference
    and numpy: the two agree."""
    p = Personalizer(numeric_bundle, store=tmp_path / "store")
    features, labels = habit_data(120, seed=6)
    result = p.personalize((features, labels), user="ana", encoding="fp32", seed=3, progress_bar=False)
    index = held_out(len(labels), seed=3, labels=labels)
    assert len(index) == result.holdout_examples
    for user, expected in ((None, result.metrics_before), ("ana", result.metrics_after)):
        evaluated = p.evaluate((features[index], labels[index]), user=user)
        assert evaluated.pop("examples") == len(index)
        assert evaluated == pytest.approx(expected, rel=1e-4)


def test_token_holdout_loss_is_a_mean_over_counted_tokens(token_bundle, tmp_path):
    """A holdout of 100 rows is scored in two batches (64 + 36) with different numbers of
    labelled tokens: its loss is the mean over every labelled token, not a mean of batch means,
    through personalize (training graph) and evaluate (inference + numpy) alike."""
    p = Personalizer(token_bundle, store=tmp_path / "store")
    rng = np.random.default_rng(7)
    ids = rng.integers(5, 100, size=(200, 6)).astype(np.int64)
    labels = np.full(ids.shape, -100, np.int64)
    dense = rng.random(200) < 0.5  # half the rows label every token with tag 1, the rest one token with tag 3
    labels[dense] = 1
    labels[~dense, 0] = 3
    result = p.personalize(({"input_ids": ids}, labels), user="ana", holdout=0.5, encoding="fp32", seed=4,
                           progress_bar=False)
    index = held_out(len(ids), seed=4, holdout=0.5)
    assert len(index) == result.holdout_examples == 100
    for user, expected in ((None, result.metrics_before), ("ana", result.metrics_after)):
        logits = p.predict({"input_ids": ids[index]}, user=user).logits
        assert expected["loss"] == pytest.approx(mean_loss("token-cross-entropy", logits, labels[index]), rel=1e-4)
        evaluated = p.evaluate(({"input_ids": ids[index]}, labels[index]), user=user)
        evaluated.pop("examples")
        assert evaluated == pytest.approx(expected, rel=1e-4)
        assert evaluated["tokens"] == (labels[index] != -100).sum()
