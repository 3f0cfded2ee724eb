"""Personalize and predict on plain onnxruntime: the default backend is the portable one,
training learns a clearly learnable task, the base stays the base, and per-row users in
one call equal per-user calls."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from bitfit.sdk import Personalizer, Predictor
from bitfit.sdk.bundle import Bundle
from bitfit.sdk.trainer import open_training_session

from example_data import message_stream, user_examples
from sdk_fixtures import PROBE_LABELS, PROBES, QUICK, numeric_data, text_data


@pytest.fixture(scope="module")
def trained(text_bundle, tmp_path_factory):
    """A store where alice learned ``text_data`` and bob learned less of it (another delta)."""
    p = Personalizer(text_bundle, store=tmp_path_factory.mktemp("store"))
    base = p.predict(PROBES)
    alice = p.personalize(text_data(48), user="alice", holdout=0.25, **QUICK)
    bob = p.personalize(text_data(24, seed=3), user="bob", max_steps=2, holdout=0.0, **{**QUICK, "learning_rate": 3e-3})
    return p, base, alice, bob


def test_the_default_backend_is_portable(text_bundle, trained):
    _, _, alice, bob = trained
    assert alice.backend == bob.backend == "portable"
    assert open_training_session(Bundle.open(text_bundle)).backend == "portable"


def test_personalize_learns_the_users_labels(trained):
    p, base, alice, _ = trained
    assert base.labels == ["neg"] * 4  # the base head says "neg" for every 5-word sentence
    assert alice.version == 1 and alice.steps > 0 and alice.started_from == "base"
    assert alice.accuracy_after > alice.accuracy_before + 0.3
    assert alice.loss_after < alice.loss_before
    assert p.predict(PROBES, user="alice").labels == PROBE_LABELS
    data = text_data(48)
    assert p.evaluate(data, user="alice")["accuracy"] > p.evaluate(data)["accuracy"] + 0.3
    unseen = text_data(80, seed=7)[48:]  # other sentences of the same kind
    assert p.evaluate(unseen, user="alice")["accuracy"] >= 0.8


def test_the_base_is_unchanged_by_training(text_bundle, trained):
    p, base, _, _ = trained
    np.testing.assert_array_equal(p.predict(PROBES).logits, base.logits)
    fresh = Predictor(text_bundle).predict(PROBES)  # a new session over the same bundle files
    np.testing.assert_array_equal(fresh.logits, base.logits)


def test_per_row_users_equal_per_user_calls(text_bundle, trained):
    p, _, _, _ = trained
    texts = PROBES + PROBES[:2]
    users = ["alice", None, "bob", "alice", "bob", None]
    mixed = p.predict(texts, user=users).logits
    single = {u: p.predict(texts, user=u).logits for u in ("alice", "bob", None)}
    for row, user in enumerate(users):
        np.testing.assert_allclose(mixed[row], single[user][row], atol=1e-5, rtol=0)
    # Not vacuous: the three models give different logits for the same text.
    assert np.abs(single["alice"] - single[None]).max() > 1e-2
    assert np.abs(single["bob"] - single[None]).max() > 1e-4
    assert np.abs(single["alice"] - single["bob"]).max() > 1e-2
    # A second predictor over the same store (another app process, say) agrees.
    other = Predictor(text_bundle, p.store).predict(texts, user=users).logits
    np.testing.assert_allclose(other, mixed, atol=1e-5, rtol=0)


def test_explicit_portable_backend_is_deterministic(text_bundle, tmp_path):
    results = []
    for run in range(2):
        p = Personalizer(text_bundle, store=tmp_path / f"s{run}", backend="portable", threads=1)
        results.append((p.personalize(text_data(32), user="carol", seed=5, **QUICK), p.store.load("carol").tensors))
    (r1, d1), (r2, d2) = results
    assert r1.backend == r2.backend == "portable" and r1.steps == r2.steps
    assert d1.keys() == d2.keys()
    for name in d1:
        np.testing.assert_allclose(np.asarray(d1[name], np.float32), np.asarray(d2[name], np.float32), atol=1e-6)


def test_numeric_bundle_learns_a_users_habit(tiny_mlp_bundle, tmp_path):
    # The base learned the general rule; a critic's labels favour class 0 (example_data.py).
    p = Personalizer(tiny_mlp_bundle, store=tmp_path)
    manifest = p.bundle.manifest
    train, test = user_examples(manifest, "critic", 200, seed=0), user_examples(manifest, "critic", 300, seed=1)
    test_labels = test.pop("labels")
    base_accuracy = p.evaluate((test, test_labels))["accuracy"]
    r = p.personalize(train, user="critic", epochs=6, learning_rate=3e-2, progress_bar=False)
    assert r.backend == "portable" and r.loss_after < r.loss_before
    assert p.evaluate((test, test_labels), user="critic")["accuracy"] >= max(0.85, base_accuracy + 0.15)
    probabilities = p.predict({k: v[:5] for k, v in test.items()}, user="critic").probabilities
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_numeric_per_row_users_equal_per_user_calls(numeric_bundle, tmp_path):
    p = Personalizer(numeric_bundle, store=tmp_path)
    features, labels = numeric_data(40)
    p.personalize({"features": features, "labels": labels}, user="u", max_steps=4, learning_rate=3e-2, holdout=0.0,
                  progress_bar=False)
    users = ["u", None] * 3
    mixed = p.predict({"features": features[:6]}, user=users).logits
    single = {u: p.predict({"features": features[:6]}, user=u).logits for u in ("u", None)}
    assert np.abs(single["u"] - single[None]).max() > 1e-4
    for row, user in enumerate(users):
        np.testing.assert_allclose(mixed[row], single[user][row], atol=1e-5, rtol=0)


@pytest.mark.parametrize("user, kind", [("critic", "numeric"), ("optimist", "text")])
def test_the_defaults_learn_a_habit_on_small_models(tiny_mlp_bundle, tiny_text_bundle, tmp_path, user, kind):
    """No option given: the SDK's own plan must work for small models (numeric and text), not
    only for MiniLM. Held-out accuracy must rise well above the base's."""
    if kind == "numeric":
        p = Personalizer(tiny_mlp_bundle, store=tmp_path)
        manifest = p.bundle.manifest
        train, test = user_examples(manifest, user, 200, seed=0), user_examples(manifest, user, 300, seed=1)
        test = (test, test.pop("labels"))
    else:
        p = Personalizer(tiny_text_bundle, store=tmp_path)
        train, test = message_stream(user, 150, seed=0), message_stream(user, 100, seed=1)
    base_accuracy = p.evaluate(test)["accuracy"]
    r = p.personalize(train, user=user, progress_bar=False)
    after = p.evaluate(test, user=user)["accuracy"]
    print(f"{kind} {user} with the defaults: {base_accuracy:.3f} -> {after:.3f} ({r.steps} steps, lr {r.learning_rate:g})")
    assert r.saved and r.metrics_after["loss"] < r.metrics_before["loss"]
    assert after >= max(0.85, base_accuracy + 0.15), (base_accuracy, after)


def test_tiny_text_bundle_learns_an_optimists_habit(tiny_text_bundle, tmp_path):
    # An optimist calls neutral messages positive; the base learned the general sentiment.
    p = Personalizer(tiny_text_bundle, store=tmp_path)
    train, test = message_stream("optimist", 150, seed=0), message_stream("optimist", 100, seed=1)
    base_accuracy = p.evaluate(test)["accuracy"]
    r = p.personalize(train, user="opt", epochs=6, learning_rate=3e-2, progress_bar=False)
    assert r.backend == "portable"
    assert p.evaluate(test, user="opt")["accuracy"] >= max(0.85, base_accuracy + 0.15)
    assert p.predict(["the meeting starts tomorrow"], user="opt").labels == ["positive"]
    assert p.predict(["the meeting starts tomorrow"]).labels == ["neutral"]


def test_no_workstation_module_was_imported_by_training():
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx", "transformers", "optimum"))
    assert leaked == []
