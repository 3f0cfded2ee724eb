"""A population delta under each user's delta (base + population + user): Personalizer and
Predictor with ``population=``, re-basing on a new population, and a delta whose population
version is gone."""

from __future__ import annotations

import numpy as np
import pytest

from bitfit.sdk import DeltaStore, Personalizer, Predictor
from bitfit.sdk.bundle import Bundle
from bitfit.sdk.delta import Delta
from bitfit.sdk.errors import DeltaMismatchError, InvalidArgumentError
from bitfit.sdk.population import PopulationRef, population_ref

from sdk_fixtures import *  # noqa: F401,F403  (fixtures and helpers)
from sdk_fixtures import numeric_data

TRAIN = {"epochs": 4, "learning_rate": 3e-2, "batch_size": 8, "holdout": 0.0, "progress_bar": False}


def save_population(store: DeltaStore, bundle: Bundle, shift: float, seed: int) -> int:
    """A population delta: random offsets of size ``shift`` on every trainable tensor."""
    base = bundle.trainable_base()
    rng = np.random.default_rng(seed)
    trained = {n: v + shift * rng.standard_normal(v.shape).astype(np.float32) for n, v in base.items()}
    return store.save("population", Delta.from_params(trained, base, bundle.manifest.base_fingerprint, encoding="fp32"))


def manual_logits(bundle: Bundle, features: np.ndarray, *offsets: dict[str, np.ndarray]) -> np.ndarray:
    """The inference model run with base + the sum of ``offsets``, fed by hand."""
    import onnxruntime as ort

    base = bundle.trainable_base()
    feeds = {"features": features}
    for t in bundle.manifest.trainable:
        value = base[t.name] + sum(np.asarray(o[t.name], np.float32).reshape(base[t.name].shape) for o in offsets)
        feeds[t.name] = value.reshape(t.inference_shape).astype(np.float32)
    session = ort.InferenceSession(str(bundle.file("inference_model")), providers=["CPUExecutionProvider"])
    return session.run([bundle.manifest.logits_output], feeds)[0]


def test_users_are_served_on_the_population_they_trained_on(numeric_bundle, tmp_path):
    bundle = Bundle.open(numeric_bundle)
    store = DeltaStore(tmp_path / "store")
    features, labels = numeric_data(40)
    probe = features[:6]
    assert save_population(store, bundle, 0.3, seed=1) == 1
    pop1 = store.load("population", 1).tensors

    p = Personalizer(bundle, store=store, population="population")
    # Not personalized yet: base + the current population.
    np.testing.assert_allclose(p.predict({"features": probe}, user="ana").logits, manual_logits(bundle, probe, pop1),
                               atol=1e-5)
    assert not np.allclose(p.predict({"features": probe}, user="ana").logits, manual_logits(bundle, probe), atol=1e-3)
    assert np.array_equal(p.predict({"features": probe}).logits, manual_logits(bundle, probe))  # None = the base

    r = p.personalize({"features": features, "labels": labels}, user="ana", **TRAIN)
    assert r.saved and r.started_from == "population"
    delta = store.load("ana")
    assert population_ref(delta) == PopulationRef("population", 1)
    with_pop1 = manual_logits(bundle, probe, pop1, delta.tensors)
    np.testing.assert_allclose(p.predict({"features": probe}, user="ana").logits, with_pop1, atol=1e-5)

    # The fleet publishes v2: ana keeps exactly her model (her delta means something only on v1),
    # a user without a delta gets v2.
    assert save_population(store, bundle, 0.3, seed=2) == 2
    pop2 = store.load("population", 2).tensors
    fresh = Predictor(bundle, store, population="population")
    np.testing.assert_allclose(fresh.predict({"features": probe}, user="ana").logits, with_pop1, atol=1e-5)
    np.testing.assert_allclose(fresh.predict({"features": probe}, user="bo").logits, manual_logits(bundle, probe, pop2),
                               atol=1e-5)
    # The same predictor notices the new population without being told.
    np.testing.assert_allclose(p.predict({"features": probe}, user="bo").logits, manual_logits(bundle, probe, pop2),
                               atol=1e-5)

    # Personalizing again re-bases her delta onto v2, starting from the model she had.
    again = p.personalize({"features": features, "labels": labels}, user="ana", max_steps=1, **{**TRAIN, "epochs": 1})
    assert again.started_from == "previous-delta" and again.saved
    rebased = store.load("ana")
    assert population_ref(rebased) == PopulationRef("population", 2)
    np.testing.assert_allclose(p.predict({"features": probe}, user="ana").logits,
                               manual_logits(bundle, probe, pop2, rebased.tensors), atol=1e-5)


def test_a_delta_whose_population_version_is_gone_is_reported(numeric_bundle, tmp_path):
    bundle = Bundle.open(numeric_bundle)
    store = DeltaStore(tmp_path / "store")
    features, labels = numeric_data(40)
    save_population(store, bundle, 0.3, seed=1)
    Personalizer(bundle, store=store, population="population").personalize(
        {"features": features, "labels": labels}, user="ana", **TRAIN)
    save_population(store, bundle, 0.3, seed=2)
    store.delete("population", 1)
    probe = {"features": features[:4]}
    out = Predictor(bundle, store, population="population").predict(probe, user="ana")
    assert "population 'population' v1, which is not in the store" in out.fallbacks["ana"]
    np.testing.assert_allclose(out.logits, manual_logits(bundle, probe["features"], store.load("population").tensors),
                               atol=1e-5)  # served the current population
    with pytest.raises(DeltaMismatchError, match="personalize again"):
        Predictor(bundle, store, population="population", on_bad_delta="raise").predict(probe, user="ana")
    # Personalize cannot continue that delta; reset starts from base + the current population.
    p = Personalizer(bundle, store=store, population="population")
    with pytest.raises(DeltaMismatchError, match="reset=True"):
        p.personalize({"features": features, "labels": labels}, user="ana", **TRAIN)
    r = p.personalize({"features": features, "labels": labels}, user="ana", reset=True, **TRAIN)
    assert r.started_from == "population" and population_ref(store.load("ana")) == PopulationRef("population", 2)


def test_without_a_stored_population_the_base_is_used_and_bad_names_are_refused(numeric_bundle, tmp_path):
    features, labels = numeric_data(40)
    p = Personalizer(numeric_bundle, store=tmp_path / "s", population="population")
    r = p.personalize({"features": features, "labels": labels}, user="ana", **TRAIN)
    assert r.started_from == "base" and population_ref(p.store.load("ana")) is None
    for bad in ("", 3):
        with pytest.raises(InvalidArgumentError, match="population must be None or"):
            Personalizer(numeric_bundle, store=tmp_path / "s", population=bad)
    with pytest.raises(InvalidArgumentError, match="needs a store"):
        Predictor(numeric_bundle, False, population="population")
