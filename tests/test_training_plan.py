"""What ``personalize`` decides from the data (``bitfit.sdk.training_plan``, ``split_holdout``)
and how it behaves on it: holdout size and stratification, the step budget, the schedule,
do-no-harm (nothing saved when the holdout says training hurt), the retry at a lower rate,
and the warnings about data that cannot teach."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bitfit.sdk.personalizer as personalizer_module
from bitfit.sdk import Personalizer
from bitfit.sdk.bundle import Bundle
from bitfit.sdk.cli import main
from bitfit.sdk.data import Examples, split_holdout
from bitfit.sdk.errors import InvalidArgumentError
from bitfit.sdk.data_checks import data_warnings
from bitfit.sdk.training_plan import (
    BATCH_SIZE, EPOCHS, SMALL_MODEL_BATCH_SIZE, SMALL_MODEL_EPOCHS, MAX_HOLDOUT, MAX_STEPS, MIN_HOLDOUT, MIN_HOLDOUT_DATA, MIN_STEPS, plan_training,
)

from sdk_fixtures import *  # noqa: F401,F403  (fixtures and helpers)
from sdk_fixtures import all_files_sha256, numeric_data, write_jsonl
from task_fixtures import *  # noqa: F401,F403
from task_fixtures import bag_texts, habit_data

QUIET = {"progress_bar": False}
HARMFUL_RATE = 1e3
"""A learning rate at which every AdamW step moves each bias by hundreds: training only hurts."""


# -- holdout size ------------------------------------------------------------------------------


@pytest.mark.parametrize("examples", [1, 2, 5, 12, MIN_HOLDOUT_DATA - 1])
def test_no_holdout_below_twenty_examples(examples):
    plan = plan_training(examples, learning_rate=1e-2)
    assert plan.holdout == 0 and plan.train_examples == examples
    assert "fewer than 20" in plan.reasons["holdout"]
    assert plan.evaluate_every == plan.steps  # nothing to score in between


@pytest.mark.parametrize("examples, held", [
    (20, MIN_HOLDOUT), (79, MIN_HOLDOUT), (100, 10), (150, 15), (250, 25), (400, MAX_HOLDOUT), (10_000, MAX_HOLDOUT),
])
def test_holdout_is_a_tenth_within_its_bounds(examples, held):
    plan = plan_training(examples, learning_rate=1e-2)
    assert plan.holdout == held and plan.train_examples == examples - held
    assert "within [8, 40]" in plan.reasons["holdout"]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 20_000))
def test_holdout_bounds_hold_for_any_size(examples):
    plan = plan_training(examples, learning_rate=1e-2)
    if examples < MIN_HOLDOUT_DATA:
        assert plan.holdout == 0
    else:
        assert MIN_HOLDOUT <= plan.holdout <= MAX_HOLDOUT and plan.holdout < examples / 2
    assert 1 <= plan.batch_size <= max(1, plan.train_examples)
    assert 1 <= plan.evaluate_every <= plan.steps


@pytest.mark.parametrize("examples, fraction, held", [(100, 0.25, 25), (10, 0.2, 2), (5, 0.01, 1), (3, 0.5, 1), (1, 0.5, 0),
                                                      (30, 0.0, 0)])
def test_a_given_holdout_fraction_is_used_as_given(examples, fraction, held):
    plan = plan_training(examples, learning_rate=1e-2, holdout=fraction)
    assert plan.holdout == held and plan.reasons["holdout"] == f"holdout={fraction:g} given"


# -- stratified split --------------------------------------------------------------------------


def test_split_holdout_keeps_class_proportions():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    train, held = split_holdout(len(labels), 20, np.random.default_rng(0), labels=labels)
    assert np.bincount(labels[held], minlength=3).tolist() == [12, 6, 2]
    assert np.bincount(labels[train], minlength=3).tolist() == [48, 24, 8]


def test_a_rare_class_with_enough_examples_is_always_held_out():
    labels = np.array([0] * 190 + [1] * 10)  # 10 of 200: a holdout of 20 has room for one
    for seed in range(20):
        train, held = split_holdout(len(labels), 20, np.random.default_rng(seed), labels=labels)
        assert labels[held].tolist().count(1) == 1 and labels[train].tolist().count(1) == 9


@st.composite
def labelled_splits(draw):
    counts = draw(st.lists(st.integers(1, 40), min_size=1, max_size=6))
    labels = np.repeat(np.arange(len(counts)), counts)
    labels = labels[np.random.default_rng(draw(st.integers(0, 2**16))).permutation(len(labels))]
    size = draw(st.integers(0, len(labels) - 1)) if len(labels) > 1 else 0
    return labels, size, draw(st.integers(0, 2**16))


@settings(max_examples=300, deadline=None)
@given(labelled_splits(), st.booleans())
def test_split_holdout_is_a_partition(case, stratified):
    labels, size, seed = case
    train, held = split_holdout(len(labels), size, np.random.default_rng(seed), labels=labels if stratified else None)
    assert len(held) == size and len(train) == len(labels) - size
    assert not set(train.tolist()) & set(held.tolist())
    assert sorted([*train.tolist(), *held.tolist()]) == list(range(len(labels)))


@settings(max_examples=300, deadline=None)
@given(labelled_splits())
def test_stratified_holdout_gives_each_class_its_share(case):
    labels, size, seed = case
    train, held = split_holdout(len(labels), size, np.random.default_rng(seed), labels=labels)
    for c, count in enumerate(np.bincount(labels)):
        share = size * count / len(labels)
        got = int((labels[held] == c).sum())
        assert abs(got - share) < 1 + 1e-9, (c, count, got, share)
        if share >= 1:
            assert got >= 1  # a class with a whole share is never left out of the holdout
        if size <= len(labels) // 2 and count >= 2:
            assert got < count  # ... nor out of training


def test_personalize_stratifies_a_classifiers_holdout(numeric_bundle, tmp_path, monkeypatch):
    seen = []

    def spy(count, size, rng, *, labels=None):
        seen.append(labels)
        return split_holdout(count, size, rng, labels=labels)

    monkeypatch.setattr(personalizer_module, "split_holdout", spy)
    features, labels = numeric_data(60, seed=1)
    Personalizer(numeric_bundle, store=tmp_path / "s").personalize((features, labels), user="ana", **QUIET)
    np.testing.assert_array_equal(seen[0], labels)


# -- length and schedule -----------------------------------------------------------------------


@pytest.mark.parametrize("examples", [1, 8, 19, 40, 60])
def test_tiny_data_gets_the_minimum_steps(examples):
    plan = plan_training(examples, learning_rate=1e-2)
    assert plan.steps == MIN_STEPS
    assert "within [30, 400]" in plan.reasons["steps"]


@pytest.mark.parametrize("examples", [2500, 5000, 100_000])
def test_large_data_gets_the_maximum_steps(examples):
    assert plan_training(examples, learning_rate=1e-2).steps == MAX_STEPS


def test_between_the_bounds_the_budget_is_two_epochs_of_eight_or_five_of_sixteen_for_a_small_model():
    plan = plan_training(300, learning_rate=1e-2)  # 270 to train: 34 batches of 8
    assert plan.batch_size == BATCH_SIZE == 8 and plan.steps_per_epoch == 34
    assert plan.steps == EPOCHS * 34 == 68
    assert plan_training(300, learning_rate=1e-2, model_values=22_566_531).steps == 68
    small = plan_training(300, learning_rate=1e-2, model_values=3_203)  # 17 batches of 16
    assert small.batch_size == SMALL_MODEL_BATCH_SIZE == 16 and small.steps_per_epoch == 17
    assert small.steps == SMALL_MODEL_EPOCHS * 17 == 85 and "(a small model)" in small.reasons["steps"]
    assert "(a small model)" in small.reasons["batch_size"] and "small" not in plan.reasons["batch_size"]


def test_epochs_override_the_budget_and_max_steps_caps_it():
    plan = plan_training(100, learning_rate=1e-2, epochs=2)  # 90 to train: 12 batches of 8
    assert plan.steps == 24 < MIN_STEPS and plan.reasons["steps"] == "epochs=2 given: 2 x 12 steps"
    assert plan_training(100, learning_rate=1e-2, epochs=100).steps == 1200 > MAX_STEPS
    capped = plan_training(2000, learning_rate=1e-2, max_steps=50)
    assert capped.steps == 50 and capped.reasons["steps"].endswith("capped by max_steps=50")
    assert plan_training(100, learning_rate=1e-2, epochs=2, max_steps=5).steps == 5
    assert plan_training(100, learning_rate=1e-2, max_steps=1000).steps == MIN_STEPS  # a cap, not a target


def test_batch_size_is_the_default_or_the_whole_training_set():
    assert plan_training(6, learning_rate=1e-2).batch_size == 6
    assert plan_training(12, learning_rate=1e-2, model_values=3_000).batch_size == 12
    assert plan_training(100, learning_rate=1e-2, batch_size=4).batch_size == 4
    assert plan_training(100, learning_rate=1e-2, batch_size=4).reasons["batch_size"] == "given"


def test_warmup_rises_to_the_peak_then_decays_to_zero():
    plan = plan_training(150, learning_rate=2e-3)
    rates = [plan.learning_rate_at(step) for step in range(plan.steps + 1)]
    warmup = plan.warmup_steps
    assert warmup == int(0.1 * plan.steps) > 0
    assert all(a < b for a, b in zip(rates[:warmup + 1], rates[1:warmup + 1]))  # rises
    assert rates[warmup] == pytest.approx(2e-3) == max(rates)  # the peak is the learning rate
    assert all(a > b for a, b in zip(rates[warmup:], rates[warmup + 1:]))  # decays
    assert rates[plan.steps] == 0.0 and rates[plan.steps - 1] > 0  # the last step still learns
    assert min(rates) >= 0


def test_constant_schedule_is_constant():
    plan = plan_training(150, learning_rate=2e-3, schedule="constant")
    assert plan.warmup_steps == 0
    assert {plan.learning_rate_at(step) for step in range(plan.steps + 1)} == {2e-3}
    assert plan.reasons["learning_rate"].endswith("constant")


def test_reasons_say_where_every_choice_came_from():
    plan = plan_training(150, learning_rate=2e-3, learning_rate_from="bundle")
    assert set(plan.reasons) == {"holdout", "batch_size", "steps", "learning_rate"}
    assert plan.reasons["learning_rate"] == "0.002 from the bundle, peak of a warmup-linear schedule"
    assert plan.reasons["steps"] == "2 epochs of 17 steps, within [30, 400]"
    assert plan.reasons["batch_size"] == "8, or every training example when fewer"
    assert plan.as_dict()["reasons"] == plan.reasons


def test_holdout_is_scored_about_three_times():
    plan = plan_training(400, learning_rate=1e-2)  # 360 to train: 45 steps an epoch, 90 steps
    assert plan.evaluate_every == 30 and -(-plan.steps // plan.evaluate_every) == 3
    assert plan_training(60, learning_rate=1e-2).evaluate_every == 7  # at most once an epoch's 7 steps


def test_personalize_records_its_plan(numeric_bundle, tmp_path):
    p = Personalizer(numeric_bundle, store=tmp_path / "s")
    result = p.personalize(habit_data(60, seed=1), user="ana", **QUIET)
    assert result.saved and not result.retried
    expected = plan_training(60, learning_rate=p.bundle.manifest.training_defaults["learning_rate"],
                             learning_rate_from="bundle", model_values=p.bundle.manifest.policy["total_values"]).as_dict()
    assert result.plan == expected
    assert (result.holdout_examples, result.examples_used, result.steps) == (8, 52, MIN_STEPS)
    assert p.store.load("ana").info["plan"] == expected
    assert json.loads(json.dumps(result.as_dict()))["plan"] == expected  # the result is JSON-able


# -- do no harm, and the retry -----------------------------------------------------------------


@pytest.fixture
def trained(numeric_bundle, tmp_path):
    """A Personalizer whose user 'ana' has version 1, and balanced data (three classes alike) on
    which a harmful rate only hurts: no single class guessed with certainty wins its holdout."""
    p = Personalizer(numeric_bundle, store=tmp_path / "store")
    first = p.personalize(habit_data(80, seed=0), user="ana", **QUIET)
    assert first.saved and first.version == 1 and not first.retried
    return p, numeric_data(80, seed=0)


def test_training_that_only_hurts_saves_nothing_and_retries_once(trained, tmp_path, monkeypatch, caplog):
    p, data = trained
    store_files = all_files_sha256(tmp_path / "store")
    served = p.predict(data[0][:5], user="ana").logits
    monkeypatch.setitem(p.bundle.manifest.training_defaults, "learning_rate", HARMFUL_RATE)
    with caplog.at_level(logging.WARNING, logger="bitfit.sdk"):
        result = p.personalize(data, user="ana", **QUIET)
    assert not result.saved and result.version == 1 and result.delta_bytes == 0
    assert result.kept_step == 0  # no checkpoint beat the start
    assert result.retried and result.learning_rate == HARMFUL_RATE * 0.25
    assert "x0.25 after a first run" in result.plan["reasons"]["learning_rate"]
    assert result.metrics_after == result.metrics_before  # what the user keeps is where they started
    assert all_files_sha256(tmp_path / "store") == store_files
    assert p.store.current_version("ana") == 1
    np.testing.assert_array_equal(p.predict(data[0][:5], user="ana").logits, served)
    assert any("nothing was saved" in r.getMessage() for r in caplog.records)


@pytest.fixture
def sessions_built(monkeypatch) -> list[int]:
    """One entry per training session personalize builds (a kept one restarted adds none)."""
    built: list[int] = []
    real_open = personalizer_module.open_training_session
    monkeypatch.setattr(personalizer_module, "open_training_session", lambda *a, **k: built.append(1) or real_open(*a, **k))
    return built


def assert_deltas_as_trained_alone(bundle, tmp_path, p, seeds) -> list:
    """Each user u<s> of ``p`` has the delta a Personalizer of its own trains on habit_data(60,
    seed=s); returns those Personalizers' results."""
    results = []
    for s in seeds:
        alone = Personalizer(bundle, store=tmp_path / f"alone{s}")
        results.append(alone.personalize(habit_data(60, seed=s), user=f"u{s}", seed=s, **QUIET))
        for name, value in alone.store.load(f"u{s}").tensors.items():
            np.testing.assert_array_equal(p.store.load(f"u{s}").tensors[name], value, err_msg=f"u{s} {name}")
    return results


def test_the_retry_restarts_the_same_training_session(trained, sessions_built, monkeypatch):
    """The retry does not rebuild the onnxruntime sessions: at most one built per personalize
    (none when the Personalizer kept one), the retry restarts that same session, and it starts
    from the user's delta again (not from where the harmful run ended)."""
    from bitfit.sdk.portable_trainer import PortableTrainingSession

    p, data = trained
    opened, restarts = sessions_built, []
    real_restart = PortableTrainingSession.restart
    monkeypatch.setattr(PortableTrainingSession, "restart",
                        lambda self, **kw: (restarts.append((id(self), kw)), real_restart(self, **kw))[1])
    monkeypatch.setitem(p.bundle.manifest.training_defaults, "learning_rate", HARMFUL_RATE)
    result = p.personalize(data, user="ana", **QUIET)
    assert result.retried and len(opened) + len(restarts) == 2  # one session: built or kept, then restarted
    assert len({session for session, _ in restarts}) == 1
    start, kwargs = restarts[-1][1]["start"], restarts[-1][1]
    assert kwargs["learning_rate"] == HARMFUL_RATE * 0.25
    ana = p.store.load("ana")
    for name, value in start.items():
        np.testing.assert_allclose(value, ana.apply_to(p.bundle.trainable_base())[name], atol=1e-6, err_msg=name)


def test_a_small_models_session_is_kept_for_the_next_user_and_trains_like_a_new_one(numeric_bundle, tmp_path,
                                                                                    sessions_built):
    reused = Personalizer(numeric_bundle, store=tmp_path / "reused")
    first = [reused.personalize(habit_data(60, seed=s), user=f"u{s}", seed=s, **QUIET) for s in range(3)]
    assert len(sessions_built) == 1  # built once, restarted for the next two users
    alone = assert_deltas_as_trained_alone(numeric_bundle, tmp_path, reused, range(3))
    assert [(r.steps, r.retried) for r in first] == [(r.steps, r.retried) for r in alone]


@pytest.mark.parametrize("total_values, keep, builds", [
    (22_600_000, None, 2),   # as if it were MiniLM: hundreds of MB would be held idle, so not kept
    (22_600_000, True, 1),   # asked for
    (20_000, False, 2),      # refused even for a small model
    (20_000, None, 1),
])
def test_which_sessions_are_kept(numeric_bundle, tmp_path, sessions_built, total_values, keep, builds):
    bundle = Bundle.open(numeric_bundle)
    bundle.manifest.policy["total_values"] = total_values
    p = Personalizer(bundle, store=tmp_path / "s", keep_training_session=keep)
    for s in range(2):
        p.personalize(habit_data(60, seed=s), user=f"u{s}", seed=s, **QUIET)
    assert len(sessions_built) == builds


@pytest.mark.parametrize("keep", ["yes", 1, 0])
def test_keep_training_session_takes_none_true_or_false(numeric_bundle, tmp_path, keep):
    with pytest.raises(InvalidArgumentError, match="keep_training_session must be None, True or False"):
        Personalizer(numeric_bundle, store=tmp_path / "s", keep_training_session=keep)


def test_concurrent_calls_never_share_a_session(numeric_bundle, tmp_path):
    """Two users training at the same moment on one Personalizer that has a session kept:
    one takes it, the other builds its own; both deltas are what a Personalizer of their own trains."""
    import threading

    p = Personalizer(numeric_bundle, store=tmp_path / "shared")
    p.personalize(habit_data(60, seed=9), user="warm-up", seed=9, **QUIET)  # now a session is kept
    both_training = threading.Barrier(2, timeout=30)
    met = []

    def meet(progress) -> None:
        if progress.step == 2 and len(met) < 2:  # each thread once, in the middle of its run
            met.append(progress.user)
            both_training.wait()

    def run(s: int) -> None:
        p.personalize(habit_data(60, seed=s), user=f"u{s}", seed=s, progress=meet, **QUIET)

    workers = [threading.Thread(target=run, args=(s,)) for s in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert sorted(met) == ["u0", "u1"]  # the two runs did overlap
    assert_deltas_as_trained_alone(numeric_bundle, tmp_path, p, range(2))


def test_no_retry_when_the_caller_gave_the_learning_rate(trained, tmp_path):
    p, data = trained
    store_files = all_files_sha256(tmp_path / "store")
    result = p.personalize(data, user="ana", learning_rate=HARMFUL_RATE, **QUIET)
    assert not result.saved and not result.retried and result.version == 1
    assert result.learning_rate == HARMFUL_RATE and "x0.25" not in result.plan["reasons"]["learning_rate"]
    assert all_files_sha256(tmp_path / "store") == store_files


def test_a_first_user_whose_training_hurts_stays_on_the_base(numeric_bundle, tmp_path, monkeypatch):
    p = Personalizer(numeric_bundle, store=tmp_path / "store")
    monkeypatch.setitem(p.bundle.manifest.training_defaults, "learning_rate", HARMFUL_RATE)
    result = p.personalize(numeric_data(40, seed=2), user="bo", **QUIET)
    assert not result.saved and result.version == 0 and result.started_from == "base"
    assert p.store.current_version("bo") is None


def test_without_a_holdout_there_is_no_guard(numeric_bundle, tmp_path, monkeypatch):
    """Under 20 examples nothing checks harm: the run is saved as trained, without a retry."""
    p = Personalizer(numeric_bundle, store=tmp_path / "store")
    monkeypatch.setitem(p.bundle.manifest.training_defaults, "learning_rate", HARMFUL_RATE)
    features, labels = numeric_data(12, seed=2)
    result = p.personalize((features, labels), user="bo", **QUIET)
    assert result.saved and result.version == 1 and not result.retried
    assert result.holdout_examples == 0 and result.metrics_before == result.metrics_after == {}
    assert result.kept_step == result.steps == MIN_STEPS


def test_the_command_says_when_nothing_was_saved(bag_bundle, tmp_path, capsys):
    bundle, store = bag_bundle("classification"), tmp_path / "store"
    data = write_jsonl(tmp_path / "ana.jsonl",
                       [{"text": t, "label": ["neg", "pos"][i % 2]} for i, t in enumerate(bag_texts(60, seed=1))])
    code = main(["personalize", str(bundle), "--user", "ana", "--data", str(data), "--store", str(store),
                 "--learning-rate", str(HARMFUL_RATE)])
    assert code == 0
    out = capsys.readouterr().out
    assert "nothing saved (no checkpoint beat the start on the holdout); current version none (base)" in out


# -- warnings about the data -------------------------------------------------------------------


def test_single_class_data_warns_naming_the_label(bag_bundle, tmp_path, caplog, capsys):
    bundle = bag_bundle("classification")
    texts = bag_texts(30, seed=2)
    p = Personalizer(bundle, store=tmp_path / "store")
    with caplog.at_level(logging.WARNING, logger="bitfit.sdk"):
        result = p.personalize([(t, "pos") for t in texts], user="ana", **QUIET)
    expected = "every example is labelled 'pos'"
    assert any(w.startswith(expected) for w in result.warnings)
    assert any(expected in r.getMessage() and "'ana'" in r.getMessage() for r in caplog.records)
    assert result.saved and any(w.startswith(expected) for w in p.store.load("ana").info["warnings"])

    data = write_jsonl(tmp_path / "bo.jsonl", [{"text": t, "label": "pos"} for t in texts])
    code = main(["personalize", str(bundle), "--user", "bo", "--data", str(data), "--store", str(tmp_path / "store")])
    err = capsys.readouterr().err
    assert code == 0 and f"bitfit: warning: {expected}" in err


def test_a_small_holdout_warns_that_its_scores_are_rough(numeric_bundle, tmp_path):
    p = Personalizer(numeric_bundle, store=tmp_path / "store")
    result = p.personalize(numeric_data(100, seed=3), user="ana", **QUIET)
    assert result.holdout_examples == 10
    assert any(w.startswith("the holdout has 10 examples") and "rough" in w for w in result.warnings)
    large = p.personalize(numeric_data(200, seed=3), user="bo", **QUIET)
    assert large.holdout_examples == 20 and not any("holdout" in w for w in large.warnings)


def test_under_twenty_examples_warns_there_is_no_holdout(numeric_bundle, tmp_path):
    result = Personalizer(numeric_bundle, store=tmp_path / "store").personalize(numeric_data(15, seed=3), user="ana", **QUIET)
    (warning,) = [w for w in result.warnings if w.startswith("no holdout")]
    assert "15 examples" in warning and "20 or more" in warning and "nothing checks" in warning
    # holdout=0 given is the caller's choice: no warning about it (a fleet client asks for it every round).
    asked = Personalizer(numeric_bundle, store=tmp_path / "s2").personalize(numeric_data(60, seed=3), user="bo",
                                                                         holdout=0.0, **QUIET)
    assert asked.holdout_examples == 0 and not [w for w in asked.warnings if "holdout" in w]


def test_a_rare_class_warns_naming_it(numeric_bundle, tmp_path):
    features, labels = numeric_data(200, seed=4)
    rare = np.flatnonzero(labels == 2)
    keep = np.setdiff1d(np.arange(len(labels)), rare[2:])  # two examples of class 'c' left
    result = Personalizer(numeric_bundle, store=tmp_path / "store").personalize((features[keep], labels[keep]),
                                                                               user="ana", **QUIET)
    assert any(w.startswith("class 'c' has only 2 example(s)") for w in result.warnings)
    assert not any("'a'" in w or "'b'" in w for w in result.warnings)


def test_balanced_data_with_a_large_holdout_has_no_warnings(numeric_bundle, tmp_path):
    result = Personalizer(numeric_bundle, store=tmp_path / "store").personalize(numeric_data(300, seed=5), user="ana", **QUIET)
    assert result.warnings == []


def test_constant_regression_targets_warn():
    examples = Examples(labels=np.full(30, 2.5, np.float32))
    (warning,) = data_warnings("regression", examples, examples.subset(range(25)))
    assert warning.startswith("every regression target is the same value")


def test_a_multilabel_label_never_set_warns_naming_it():
    labels = np.zeros((30, 3), np.float32)
    labels[:, 0] = 1.0
    labels[::2, 2] = 1.0
    examples = Examples(labels=labels)
    (warning,) = data_warnings("multilabel", examples, examples.subset(range(25)), label_names=["x", "y", "z"])
    assert warning.startswith("label(s) 'y' are never set")


def test_a_causal_lm_holdout_is_not_called_small_for_its_number_of_texts():
    """A text holds many tokens, each scored: eight held-out texts are not eight coin flips."""
    examples = Examples(labels=np.zeros(30, np.int64), token_ids=[[1, 2, 3]] * 30, causal_lm=True)
    assert data_warnings("causal-lm", examples, examples.subset(range(8))) == []
    classes = Examples(labels=np.arange(30) % 2)
    assert data_warnings("classification", classes, classes.subset(range(8)))[0].startswith("the holdout has 8 examples")
