"""Every task end to end on a tiny bundle: personalize, predict, evaluate and the ``bitfit``
command, for regression (MSE), multi-label (BCE), token classification (token CE with an
ignore index), causal LM (plain texts) and numeric bundles (bare arrays vs dicts)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bitfit.sdk import Personalizer
from bitfit.sdk.cli import main
from bitfit.sdk.errors import InvalidUserDataError
from bitfit.sdk.metrics import mean_loss

from sdk_fixtures import *  # noqa: F401,F403  (fixtures and helpers)
from sdk_fixtures import write_jsonl
from task_fixtures import *  # noqa: F401,F403
from task_fixtures import MULTILABELS, bag_texts, habit_data, lm_style

QUIET = {"progress_bar": False}
SHIFT = 3.0
"""What the regression user adds to every target the base model would give."""


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# -- regression (MSE) --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def regression(bag_bundle, tmp_path_factory):
    """A user whose targets are the base model's outputs + SHIFT; 200 to train on, 60 unseen."""
    p = Personalizer(bag_bundle("regression"), store=tmp_path_factory.mktemp("regression") / "store")
    texts = bag_texts(260, seed=3)
    targets = [value + SHIFT for value in p.predict(texts).labels]
    train = list(zip(texts[:200], targets[:200]))
    unseen = list(zip(texts[200:], targets[200:]))
    result = p.personalize(train, user="ana", **QUIET)
    return p, result, train, unseen


def test_regression_learns_a_shift_the_base_does_not_know(regression):
    p, result, _, unseen = regression
    assert result.saved and result.version == 1 and result.holdout_examples == 20
    assert result.metrics_before["mae"] == pytest.approx(SHIFT, abs=1e-4)  # the base misses by exactly the shift
    assert result.metrics_after["mae"] < result.metrics_before["mae"] - 0.2
    user, base = p.evaluate(unseen, user="ana"), p.evaluate(unseen)
    assert base["mae"] == pytest.approx(SHIFT, abs=1e-4)
    assert user["mae"] < base["mae"] - 0.2 and user["rmse"] < base["rmse"]
    assert user["examples"] == len(unseen)


def test_regression_predict_returns_floats_moved_towards_the_users_targets(regression):
    p, _, _, unseen = regression
    texts, targets = [t for t, _ in unseen], np.array([y for _, y in unseen])
    user, base = p.predict(texts, user="ana"), p.predict(texts)
    assert len(user.labels) == len(texts) and all(type(v) is float for v in user.labels)
    assert user.logits.shape == (len(texts), 1)
    assert np.all(np.array(user.labels) > np.array(base.labels))
    assert np.abs(np.array(user.labels) - targets).mean() < np.abs(np.array(base.labels) - targets).mean()


def test_regression_metrics_are_mae_and_rmse_with_no_accuracy(regression):
    p, result, _, unseen = regression
    for metrics in (result.metrics_before, result.metrics_after):
        assert set(metrics) == {"loss", "mae", "rmse"}
        assert metrics["loss"] == pytest.approx(metrics["rmse"] ** 2, rel=1e-4)  # the MSE loss is RMSE squared
    assert result.accuracy_before is None and result.accuracy_after is None
    assert result.loss_before == result.metrics_before["loss"] and result.loss_after == result.metrics_after["loss"]
    evaluated = p.evaluate(unseen, user="ana")
    assert set(evaluated) == {"loss", "mae", "rmse", "examples"}
    assert evaluated["loss"] == pytest.approx(evaluated["rmse"] ** 2, rel=1e-4)


def test_regression_through_the_command(regression, bag_bundle, tmp_path, capsys):
    _, _, train, unseen = regression
    bundle, store = bag_bundle("regression"), tmp_path / "store"
    data = write_jsonl(tmp_path / "ana.jsonl", [{"text": t, "label": y} for t, y in train])
    code, out, err = run(capsys, "personalize", bundle, "--user", "ana", "--data", data, "--store", store)
    assert code == 0, err
    assert "user ana: version 1" in out and "mae 3.000 -> " in out and "rmse" in out and "accuracy" not in out
    code, out, _ = run(capsys, "predict", bundle, "--user", "ana", "--store", store, unseen[0][0])
    assert code == 0
    printed = float(out.split("\t")[0])
    expected = Personalizer(bundle, store=store).predict([unseen[0][0]], user="ana").labels[0]
    assert printed == pytest.approx(expected, rel=1e-5)


# -- multi-label (BCE with logits) -------------------------------------------------------------


@pytest.fixture(scope="module")
def multilabel(bag_bundle, tmp_path_factory):
    """A user who tags every text with the label the base model sets least (a habit), on top
    of what the base model says; labels as lists of names."""
    p = Personalizer(bag_bundle("multilabel"), store=tmp_path_factory.mktemp("multilabel") / "store")
    texts = bag_texts(260, seed=4)
    base = p.predict(texts).labels
    habit = min(MULTILABELS, key=lambda name: sum(name in row for row in base))
    assert sum(habit in row for row in base) < 0.5 * len(texts), "the base should rarely set the habit label"
    labelled = [(t, sorted(set(row) | {habit}, key=MULTILABELS.index)) for t, row in zip(texts, base)]
    result = p.personalize(labelled[:200], user="ana", **QUIET)
    return p, result, habit, labelled[:200], labelled[200:]


def test_multilabel_learns_a_label_the_user_always_sets(multilabel):
    p, result, habit, _, unseen = multilabel
    assert result.saved
    assert result.metrics_after[f"f1/{habit}"] > result.metrics_before[f"f1/{habit}"] + 0.3
    assert result.metrics_after["micro_f1"] > result.metrics_before["micro_f1"]
    user, base = p.evaluate(unseen, user="ana"), p.evaluate(unseen)
    assert user[f"f1/{habit}"] > 0.9 > base[f"f1/{habit}"]
    assert user["subset_accuracy"] > base["subset_accuracy"]


def test_multilabel_metrics_have_an_f1_per_label_name(multilabel):
    p, result, _, _, unseen = multilabel
    per_label = {f"f1/{name}" for name in MULTILABELS}
    summary = {"loss", "subset_accuracy", "label_accuracy", "micro_f1", "macro_f1"}
    assert set(result.metrics_before) == set(result.metrics_after) == summary | per_label
    evaluated = p.evaluate(unseen, user="ana")
    assert set(evaluated) == summary | per_label | {"examples"}
    assert evaluated["macro_f1"] == pytest.approx(np.mean([evaluated[k] for k in per_label]))
    assert result.accuracy_before is None


def test_multilabel_predict_returns_lists_of_label_names(multilabel):
    p, _, habit, _, unseen = multilabel
    texts = [t for t, _ in unseen]
    user, base = p.predict(texts, user="ana"), p.predict(texts)
    assert all(isinstance(row, list) and set(row) <= set(MULTILABELS) for row in user.labels)
    assert user.probabilities.shape == (len(texts), len(MULTILABELS))
    assert np.mean([habit in row for row in user.labels]) > 0.9 > np.mean([habit in row for row in base.labels])
    assert [row for row in user.labels] == [[n for n, pr in zip(MULTILABELS, probs) if pr > 0.5] for probs in user.probabilities]


def test_multilabel_through_the_command(multilabel, bag_bundle, tmp_path, capsys):
    _, _, habit, train, unseen = multilabel
    bundle, store = bag_bundle("multilabel"), tmp_path / "store"
    data = write_jsonl(tmp_path / "ana.jsonl", [{"text": t, "label": labels} for t, labels in train])
    code, out, err = run(capsys, "personalize", bundle, "--user", "ana", "--data", data, "--store", store)
    assert code == 0, err
    assert "user ana: version 1" in out and "micro_f1" in out
    code, out, _ = run(capsys, "predict", bundle, "--user", "ana", "--store", store, "--json", unseen[0][0])
    assert code == 0
    row = json.loads(out)
    assert habit in row["label"] and len(row["probabilities"]) == len(MULTILABELS)


# -- token classification (token cross-entropy, ignore index -100) -----------------------------

TAG = 2
"""The tag the token user gives every token they label."""


def token_data(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [count, 6] and labels: TAG, except the last two positions (and the first of
    every third row) set to the ignore index."""
    ids = np.random.default_rng(seed).integers(5, 100, size=(count, 6)).astype(np.int64)
    labels = np.full(ids.shape, TAG, np.int64)
    labels[:, 4:] = -100
    labels[::3, 0] = -100
    return ids, labels


@pytest.fixture(scope="module")
def tokens(token_bundle, tmp_path_factory):
    p = Personalizer(token_bundle, store=tmp_path_factory.mktemp("tokens") / "store")
    ids, labels = token_data(120, seed=0)
    result = p.personalize(({"input_ids": ids}, labels), user="ana", **QUIET)
    return p, result, token_data(30, seed=1)


def test_token_classification_learns_the_users_tag(tokens):
    p, result, (ids, labels) = tokens
    assert p.bundle.manifest.ignore_index == -100
    assert result.saved and result.holdout_examples == 12
    assert result.metrics_after["token_accuracy"] > result.metrics_before["token_accuracy"] + 0.3
    assert result.loss_after < result.loss_before
    user, base = p.evaluate(({"input_ids": ids}, labels), user="ana"), p.evaluate(({"input_ids": ids}, labels))
    assert user["token_accuracy"] > base["token_accuracy"] + 0.3
    assert result.accuracy_before is None


def test_token_classification_ignored_positions_do_not_count(tokens):
    p, result, (ids, labels) = tokens
    keep = labels != -100
    # The holdout's 12 rows have 3 or 4 labelled tokens each, never the 6 they hold.
    assert 3 * 12 <= result.metrics_before["tokens"] == result.metrics_after["tokens"] <= 4 * 12
    evaluated = p.evaluate(({"input_ids": ids}, labels), user="ana")
    assert evaluated["tokens"] == keep.sum() < labels.size
    logits = p.predict({"input_ids": ids}, user="ana").logits
    assert evaluated["token_accuracy"] == pytest.approx(float((logits.argmax(-1) == labels)[keep].mean()))
    # The loss averages the labelled tokens only: the same number as cross-entropy over them.
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, np.where(keep, labels, 0)[..., None], -1)[..., 0]
    assert evaluated["loss"] == pytest.approx(float(-picked[keep].mean()), rel=1e-4)


def test_token_classification_predict_gives_a_tag_per_token(tokens):
    p, _, (ids, _) = tokens
    for given in (ids[:3], {"input_ids": ids[:3]}):
        prediction = p.predict(given, user="ana")
        assert prediction.logits.shape == (3, 6, 5)
        assert np.array(prediction.labels).shape == (3, 6)
        assert prediction.labels == prediction.logits.argmax(-1).tolist()
    assert np.mean(np.array(p.predict(ids, user="ana").labels) == TAG) > np.mean(np.array(p.predict(ids).labels) == TAG)


def test_token_classification_command_refuses_a_file_and_says_what_to_use(token_bundle, tmp_path, capsys):
    """Token labels are arrays: ``bitfit personalize`` (files of text) says to use the Python API."""
    data = write_jsonl(tmp_path / "ana.jsonl", [{"text": "a b c", "label": 1}])
    code, out, err = run(capsys, "personalize", token_bundle, "--user", "ana", "--data", data, "--store", tmp_path / "s")
    assert code == 2 and out == ""
    assert "InvalidArgumentError" in err and "numeric inputs" in err and "Personalizer(bundle).personalize(" in err
    code, out, _ = run(capsys, "info", token_bundle)
    assert code == 0 and "task token-classification, loss token-cross-entropy" in out


# -- causal LM (plain texts; the labels are the next tokens) -----------------------------------


@pytest.fixture(scope="module")
def causal_lm(lm_bundle, tmp_path_factory):
    """A user who writes the words w10..w15 in a fixed cycle; unseen texts are longer ones."""
    p = Personalizer(lm_bundle, store=tmp_path_factory.mktemp("lm") / "store")
    texts = list(dict.fromkeys(lm_style(200, seed=0)))
    unseen = list(dict.fromkeys(lm_style(20, seed=1, lengths=(20, 30))))
    assert not set(unseen) & set(texts)
    result = p.personalize(texts, user="ana", **QUIET)
    return p, result, texts, unseen


def test_causal_lm_learns_the_users_style_from_plain_texts(causal_lm):
    p, result, texts, unseen = causal_lm
    assert result.saved and result.examples_used + result.holdout_examples == len(texts)
    assert result.metrics_after["perplexity"] < result.metrics_before["perplexity"] - 5
    assert result.loss_after < result.loss_before
    user, base = p.evaluate(unseen, user="ana"), p.evaluate(unseen)
    assert user["perplexity"] < base["perplexity"] - 5 and user["loss"] < base["loss"]


def test_causal_lm_perplexity_is_exp_of_the_loss(causal_lm):
    p, result, _, unseen = causal_lm
    for metrics in (result.metrics_before, result.metrics_after, p.evaluate(unseen, user="ana"), p.evaluate(unseen)):
        assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-9)
    assert result.accuracy_before is None


def test_causal_lm_evaluate_scores_each_next_token(causal_lm):
    """evaluate's loss is the mean cross-entropy of every token given the ones before it."""
    p, _, _, unseen = causal_lm
    evaluated = p.evaluate(unseen, user="ana")
    logits = p.predict(unseen, user="ana").logits
    vocab = p.predictor.encoder.tokenizer.get_vocab()
    outputs, labels = [], []
    for row, text in zip(logits, unseen):
        ids = [vocab[w] for w in text.split()]
        outputs.append(row[: len(ids) - 1])
        labels.append(ids[1:])
    expected = mean_loss("token-cross-entropy", np.concatenate(outputs), np.concatenate(labels))
    assert evaluated["loss"] == pytest.approx(expected, rel=1e-4)
    assert evaluated["tokens"] == sum(len(t.split()) - 1 for t in unseen)


def test_causal_lm_predict_gives_next_token_logits(causal_lm):
    p, _, _, unseen = causal_lm
    prediction = p.predict(unseen[:2], user="ana")
    longest = max(len(t.split()) for t in unseen[:2])
    assert prediction.logits.shape == (2, longest, 100)
    # In the user's cycle the word after w12 is w13: the personalized model ranks it higher.
    vocab = p.predictor.encoder.tokenizer.get_vocab()
    after = p.predict(["w10 w11 w12"], user="ana").probabilities[0, -1, vocab["w13"]]
    before = p.predict(["w10 w11 w12"]).probabilities[0, -1, vocab["w13"]]
    assert after > before


def test_causal_lm_through_the_command(causal_lm, lm_bundle, tmp_path, capsys):
    _, _, texts, _ = causal_lm
    data = tmp_path / "ana.txt"
    data.write_text("\n".join(texts) + "\n", encoding="utf-8")
    store = tmp_path / "store"
    code, out, err = run(capsys, "personalize", lm_bundle, "--user", "ana", "--data", data, "--store", store)
    assert code == 0, err
    assert "user ana: version 1" in out and "loss" in out
    code, out, _ = run(capsys, "predict", lm_bundle, "--user", "ana", "--store", store, "w10 w11 w12")
    assert code == 0 and out.strip().endswith("w10 w11 w12")


# -- numeric bundles: a bare array for one input, a dict for several ---------------------------


def test_one_input_bundle_takes_a_bare_array_like_the_dict(numeric_bundle, tmp_path):
    p = Personalizer(numeric_bundle, store=tmp_path / "store")
    (name,) = [i.name for i in p.bundle.manifest.inputs]
    features, labels = habit_data(60, seed=5)
    bare, named = p.predict(features[:7]), p.predict({name: features[:7]})
    np.testing.assert_array_equal(bare.logits, named.logits)
    assert bare.labels == named.labels

    from_bare = p.personalize((features, labels), user="bare", **QUIET)
    from_dict = p.personalize(({name: features}, labels), user="dict", **QUIET)
    assert from_bare.saved and from_dict.saved
    assert from_bare.metrics_before == from_dict.metrics_before and from_bare.metrics_after == from_dict.metrics_after
    assert (from_bare.steps, from_bare.kept_step) == (from_dict.steps, from_dict.kept_step)
    a, b = p.store.load("bare").tensors, p.store.load("dict").tensors
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    np.testing.assert_array_equal(p.predict(features[:7], user="bare").logits, p.predict({name: features[:7]}, user="dict").logits)
    assert p.evaluate((features, labels), user="bare") == p.evaluate(({name: features}, labels), user="dict")


def test_multi_input_bundle_refuses_a_bare_array_naming_its_inputs(pair_bundle, tmp_path):
    p = Personalizer(pair_bundle, store=tmp_path / "store")
    rows = np.zeros((4, 5), np.float32)
    for call in (lambda: p.predict(rows), lambda: p.personalize((rows, [0, 1, 2, 0]), user="ana", **QUIET),
                 lambda: p.evaluate((rows, [0, 1, 2, 0]))):
        with pytest.raises(InvalidUserDataError, match=r"2 numeric inputs.*\['a', 'b'\]"):
            call()
    assert p.store.current_version("ana") is None
    named = {"a": rows[:, :3], "b": rows[:, 3:]}
    assert p.predict(named).logits.shape == (4, 3)  # the dict form works
