"""Predictor: per-row users in one batch, the grouped fallback, one shared session, the delta
cache, bad deltas, execution providers and graph optimization levels."""

from __future__ import annotations

import numpy as np
import pytest

from bitfit.sdk import DeltaStore, Personalizer, Predictor
from bitfit.sdk.bundle import Bundle
from bitfit.sdk.errors import (
    DeltaCorruptError, DeltaMismatchError, InvalidArgumentError, InvalidUserDataError, ProviderUnavailableError,
)
from bitfit.sdk.predictor import resolve_providers
from bitfit.sdk.runtime import ort

from sdk_fixtures import *  # noqa: F401,F403  (fixtures and helpers)
from sdk_fixtures import PROBE_LABELS, PROBES, QUICK, delta_file, numeric_data, text_data

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
# Different lengths, so a batch pads some rows.
TEXTS = ["good great the movie was", "bad film", "love fun my trip too and the music", "hate it",
         "nice day", "awful boring plot story and the actor was too", "excellent", "sad ugly hotel"]


def trained_store(bundle, root, users=("alice", "bob")) -> DeltaStore:
    """A store where alice learned text_data and bob, who likes everything, labelled it all "pos"."""
    p = Personalizer(bundle, store=root)
    data = text_data(32)
    for user in users:
        rows = data if user == "alice" else [(t, "pos") for t, _ in data]
        p.personalize(rows, user=user, holdout=0.0, **QUICK)  # every example trains: a fixed, known delta
    return p.store


@pytest.fixture(scope="module")
def store(text_bundle, tmp_path_factory) -> DeltaStore:
    return trained_store(text_bundle, tmp_path_factory.mktemp("predictor-store"))


@pytest.fixture(scope="module")
def head_store(text_head_bundle, tmp_path_factory) -> DeltaStore:
    return trained_store(text_head_bundle, tmp_path_factory.mktemp("predictor-head-store"))


def row_by_row(predictor: Predictor, texts: list[str], users: list[str | None]) -> np.ndarray:
    return np.concatenate([predictor.predict([t], user=u).logits for t, u in zip(texts, users)])


# -- one batch, many users --------------------------------------------------------------------


def test_per_row_batch_equals_each_row_alone(text_bundle, store):
    predictor = Predictor(text_bundle, store)
    assert predictor.manifest.per_row is True
    users = ["alice", "bob", None, "carol-has-no-delta", "alice", None, "bob", "alice"]
    batch = predictor.predict(TEXTS, user=users)
    assert batch.users == users and batch.fallbacks == {}
    np.testing.assert_allclose(batch.logits, row_by_row(predictor, TEXTS, users), atol=1e-5, rtol=1e-5)
    # The users really differ: alice follows the words, bob says "pos", the base says "neg".
    assert predictor.predict(PROBES, user="alice").labels == PROBE_LABELS
    assert predictor.predict(PROBES, user="bob").labels == ["pos"] * 4
    mixed = predictor.predict(PROBES, user=["alice", "bob", None, "alice"])
    assert mixed.labels == ["pos", "pos", "neg", "neg"]
    # A user without a delta is served the base model.
    np.testing.assert_allclose(predictor.predict(TEXTS, user="carol-has-no-delta").logits,
                               predictor.predict(TEXTS).logits, atol=1e-6)


def test_grouped_fallback_when_per_row_is_false(text_head_bundle, head_store):
    predictor = Predictor(text_head_bundle, head_store)
    manifest = predictor.manifest
    assert manifest.per_row is False
    assert "head.weight" in [t.name for t in manifest.trainable]
    assert {t.name: t.role for t in manifest.trainable}["head.weight"] == "head-weight"
    users = ["alice", "bob", None, "carol-has-no-delta", "alice", None, "bob", "alice"]
    batch = predictor.predict(TEXTS, user=users)
    np.testing.assert_allclose(batch.logits, row_by_row(predictor, TEXTS, users), atol=1e-5, rtol=1e-5)
    assert predictor.predict(PROBES, user=["alice", "bob", None, "alice"]).labels == ["pos", "pos", "neg", "neg"]
    delta = head_store.load("alice")
    assert delta.tensors["head.weight"].shape == (2, 32) and np.any(delta.tensors["head.weight"] != 0)


def test_batches_larger_than_the_predictor_batch_size(text_bundle, store):
    small = Predictor(text_bundle, store, batch_size=3)
    big = Predictor(text_bundle, store, batch_size=64)
    users = ["alice", None, "bob"] * 5 + ["alice"]
    texts = (TEXTS * 2)[: len(users)]
    np.testing.assert_allclose(small.predict(texts, user=users).logits, big.predict(texts, user=users).logits,
                               atol=1e-5)


def test_predict_runs_rows_by_length_and_answers_in_input_order(text_bundle, store):
    """Rows beyond one run are sorted by length (less padding per run); every output, label
    and per-row user still lines up with its input."""
    predictor = Predictor(text_bundle, store, batch_size=2)
    texts = (TEXTS + PROBES)[::-1]
    users = ["alice", None, "bob", "bob", None, "alice"] * 2
    widths = []
    logits = predictor.logits

    def spy(feeds, chunk_users, fallbacks=None):
        widths.append(feeds["attention_mask"].shape[1])
        return logits(feeds, chunk_users, fallbacks)

    predictor.logits = spy
    batch = predictor.predict(texts, user=users)
    predictor.logits = logits
    assert widths == sorted(widths) and widths[0] < widths[-1], "runs go from the shortest rows up"
    np.testing.assert_allclose(batch.logits, row_by_row(predictor, texts, users), atol=1e-5, rtol=1e-5)
    assert batch.labels == [predictor.predict([t], user=u).labels[0] for t, u in zip(texts, users)]
    assert batch.users == users


def test_numeric_predict_and_per_row_users(numeric_bundle, tmp_path):
    p = Personalizer(numeric_bundle, store=tmp_path)
    features, labels = numeric_data(30)
    p.personalize({"features": features, "labels": labels}, user="u", epochs=3, learning_rate=3e-2,
                  progress_bar=False)
    users = ["u", None] * 15
    batch = p.predict({"features": features}, user=users)
    alone = np.concatenate([p.predict({"features": features[i:i + 1]}, user=u).logits for i, u in enumerate(users)])
    np.testing.assert_allclose(batch.logits, alone, atol=1e-5)
    with pytest.raises(InvalidUserDataError, match="numeric inputs"):
        p.predict(["a text"])
    with pytest.raises(InvalidUserDataError, match="at least one input row"):
        p.predict({"features": np.zeros((0, 8), np.float32)})


def test_predict_validates_users_and_inputs(text_bundle, store):
    predictor = Predictor(text_bundle, store)
    with pytest.raises(InvalidArgumentError, match="2 entries for 3 inputs"):
        predictor.predict(TEXTS[:3], user=["alice", "bob"])
    with pytest.raises(InvalidArgumentError, match="user ids must be non-empty strings"):
        predictor.predict(TEXTS[:2], user=["alice", ""])
    with pytest.raises(InvalidUserDataError, match="at least one input"):
        predictor.predict([])
    with pytest.raises(InvalidUserDataError, match="text is empty"):
        predictor.predict(["good", "  "])
    single = predictor.predict("good great the movie was", user="alice")  # a bare string is one row
    assert single.logits.shape == (1, 2) and single.labels == ["pos"]
    assert predictor.predict([b"good great the movie was"], user="alice").labels == ["pos"]
    with pytest.raises(InvalidArgumentError, match="no delta store"):
        Predictor(text_bundle, store=False).predict(["good"], user="alice")
    assert Predictor(text_bundle, store=False).predict(["good"]).labels in (["neg"], ["pos"])


# -- one session, cached deltas -----------------------------------------------------------------


def test_switching_users_keeps_the_session_and_the_cache_serves_repeats(text_bundle, store, monkeypatch):
    predictor = Predictor(text_bundle, store)
    session = predictor.session
    loads: list[str] = []
    real_load = store.load

    def counting_load(user, version=None):
        loads.append(user)
        return real_load(user, version)

    monkeypatch.setattr(store, "load", counting_load)
    first = {u: predictor.predict(PROBES, user=u).logits for u in ("alice", "bob", None, "alice", "bob")}
    assert predictor.session is session
    assert sorted(loads) == ["alice", "bob"]  # each delta decoded once, then served from the cache
    predictor.predict(PROBES, user=["bob", "alice", None, "alice"])
    assert sorted(loads) == ["alice", "bob"] and predictor.session is session
    np.testing.assert_array_equal(predictor.predict(PROBES, user="alice").logits, first["alice"])

    predictor.invalidate("alice")
    predictor.predict(PROBES, user="alice")
    assert sorted(loads) == ["alice", "alice", "bob"]
    predictor.invalidate()
    predictor.predict(PROBES, user=["alice", "bob"] * 2)
    assert sorted(loads) == ["alice", "alice", "alice", "bob", "bob"]
    assert predictor.session is session


def test_cache_is_bounded_and_sees_new_versions(text_bundle, tmp_path):
    p = Personalizer(text_bundle, store=tmp_path)
    predictor = Predictor(text_bundle, p.store, cache_size=2)
    for user in ("a", "b", "c"):
        p.personalize(text_data(16), user=user, max_steps=1, **QUICK)
        predictor.predict(PROBES, user=user)
    assert list(predictor._cache) == ["b", "c"]
    before = predictor.predict(PROBES, user="c").logits
    # Another writer (here a second Personalizer) saves a new version: the predictor notices.
    Personalizer(text_bundle, store=tmp_path).personalize(text_data(32), user="c", **QUICK)
    after = predictor.predict(PROBES, user="c")
    assert not np.allclose(after.logits, before)
    assert after.labels == PROBE_LABELS
    # A rollback is seen too.
    p.store.rollback("c")
    np.testing.assert_allclose(predictor.predict(PROBES, user="c").logits, before, atol=1e-6)


def test_personalize_invalidates_the_personalizers_own_predictor(text_bundle, tmp_path):
    p = Personalizer(text_bundle, store=tmp_path)
    p.personalize(text_data(16), user="alice", max_steps=1, **QUICK)
    session = p.predictor.session
    before = p.predict(PROBES, user="alice").logits
    p.personalize(text_data(32), user="alice", **QUICK)
    assert p.predictor.session is session
    assert not np.allclose(p.predict(PROBES, user="alice").logits, before)


# -- bad deltas ---------------------------------------------------------------------------------------


def corrupt_current(store: DeltaStore, user: str) -> None:
    path = delta_file(store.root, user, store.current_version(user))
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_delta_falls_back_to_the_base_and_is_reported_every_time(text_bundle, tmp_path):
    p = Personalizer(text_bundle, store=tmp_path)
    for user in ("alice", "mallory"):
        p.personalize(text_data(32), user=user, **QUICK)
    corrupt_current(p.store, "mallory")
    predictor = Predictor(text_bundle, p.store)
    base = predictor.predict(PROBES).logits
    for _ in range(2):  # the second call is served from the cache and must still report it
        out = predictor.predict(PROBES, user=["alice", "mallory", "alice", "mallory"])
        assert list(out.fallbacks) == ["mallory"] and "DeltaCorruptError" in out.fallbacks["mallory"]
        np.testing.assert_allclose(out.logits[[1, 3]], base[[1, 3]], atol=1e-5)
        assert out.labels[0] == "pos"
    assert predictor.predict(PROBES, user="alice").fallbacks == {}
    strict = Predictor(text_bundle, p.store, on_bad_delta="raise")
    with pytest.raises(DeltaCorruptError):
        strict.predict(PROBES, user="mallory")
    assert strict.predict(PROBES, user="alice").labels == PROBE_LABELS


def test_delta_for_another_bundle_falls_back(text_bundle, text_head_bundle, tmp_path):
    store = DeltaStore(tmp_path)
    Personalizer(text_head_bundle, store=store).personalize(text_data(16), user="alice", max_steps=2, **QUICK)
    out = Predictor(text_bundle, store).predict(PROBES, user="alice")
    assert "DeltaMismatchError" in out.fallbacks["alice"]
    with pytest.raises(DeltaMismatchError):
        Predictor(text_bundle, store, on_bad_delta="raise").predict(PROBES, user="alice")
    with pytest.raises(InvalidArgumentError, match="on_bad_delta"):
        Predictor(text_bundle, store, on_bad_delta="ignore")


# -- providers and graph optimization ---------------------------------------------------------------------


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime build has CUDA")
def test_auto_providers_without_cuda_is_cpu_only(text_bundle):
    assert resolve_providers("auto") == ["CPUExecutionProvider"]
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    assert Predictor(text_bundle).session.get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(ProviderUnavailableError, match="providers='cpu'"):
        resolve_providers("cuda")


def test_unavailable_provider_warns_and_falls_back(text_bundle, store):
    missing = "NoSuchExecutionProvider"
    with pytest.warns(RuntimeWarning, match=missing):
        assert resolve_providers([missing, "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.warns(RuntimeWarning, match=missing):
        assert resolve_providers([(missing, {"device_id": 0})]) == ["CPUExecutionProvider"]
    with pytest.warns(RuntimeWarning, match=missing):
        predictor = Predictor(text_bundle, store, providers=[missing])
    assert predictor.session.get_providers() == ["CPUExecutionProvider"]
    assert predictor.predict(PROBES, user="alice").labels == PROBE_LABELS
    with pytest.warns(RuntimeWarning, match=missing):
        p = Personalizer(text_bundle, store=store, providers=[missing])
        assert p.predict(PROBES, user="alice").labels == PROBE_LABELS


def test_strict_providers_refuse_a_missing_provider(text_bundle):
    with pytest.raises(ProviderUnavailableError, match="NoSuchExecutionProvider"):
        resolve_providers(["NoSuchExecutionProvider"], strict=True)
    with pytest.raises(ProviderUnavailableError, match="NoSuchExecutionProvider"):
        Predictor(text_bundle, providers=["NoSuchExecutionProvider"], strict_providers=True)
    assert resolve_providers(["CPUExecutionProvider"], strict=True) == ["CPUExecutionProvider"]


def test_graph_optimization_levels_give_the_same_logits(text_bundle, store):
    users = ["alice", "bob", None, "alice", "bob", None, "alice", "bob"]
    results = {}
    for level in ("disabled", "basic", "extended", "all"):
        results[level] = Predictor(text_bundle, store, graph_optimization=level).predict(TEXTS, user=users).logits
    for level, logits in results.items():
        np.testing.assert_allclose(logits, results["disabled"], atol=1e-5, rtol=1e-5, err_msg=level)
    p = Personalizer(text_bundle, store=store, graph_optimization="basic", threads=1)
    np.testing.assert_allclose(p.predict(TEXTS, user=users).logits, results["all"], atol=1e-5, rtol=1e-5)
    with pytest.raises(InvalidArgumentError, match="graph_optimization"):
        Predictor(text_bundle, store, graph_optimization="max")


def test_prediction_fields(text_bundle, store):
    out = Predictor(text_bundle, store).predict(TEXTS, user="alice")
    assert out.logits.shape == (len(TEXTS), 2) and out.logits.dtype == np.float32
    np.testing.assert_allclose(out.probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert out.labels == [("neg", "pos")[i] for i in out.logits.argmax(axis=1)]
    assert out.users == ["alice"] * len(TEXTS)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDAExecutionProvider in this onnxruntime build")
def test_cuda_training_and_inference(text_bundle, tmp_path):  # pragma: no cover - no CUDA here
    data = text_data(32)
    gpu = Personalizer(text_bundle, store=tmp_path / "gpu", providers="cuda")
    gpu.personalize(data, user="alice", encoding="fp32", **QUICK)
    assert "CUDAExecutionProvider" in gpu.predictor.session.get_providers()
    assert gpu.predict(PROBES, user="alice").labels == PROBE_LABELS
    cpu = Personalizer(text_bundle, store=tmp_path / "cpu")
    cpu.personalize(data, user="alice", encoding="fp32", **QUICK)
    for name, value in cpu.store.load("alice").tensors.items():
        np.testing.assert_allclose(gpu.store.load("alice").tensors[name], value, atol=1e-3)


def test_bundle_manifest_describes_the_tiny_bundles(text_bundle, numeric_bundle):
    text = Bundle.open(text_bundle).manifest
    assert text.labels == ["neg", "pos"] and text.text is not None and text.text.token_type_ids == "token_type_ids"
    assert [i.name for i in text.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(t.role == "bias" and t.inference_shape == [1, *t.shape] for t in text.trainable)
    numeric = Bundle.open(numeric_bundle).manifest
    assert numeric.text is None and [i.name for i in numeric.inputs] == ["features"] and numeric.per_row


def test_predict_while_another_thread_personalizes_and_invalidates(text_bundle, tmp_path):
    """One Personalizer serving predictions on threads while personalize() saves new versions."""
    import threading

    p = Personalizer(text_bundle, store=tmp_path / "store")
    p.personalize(text_data(24), user="u", holdout=0.0, **QUICK)  # holdout 0: every call saves a version
    errors: list[BaseException] = []
    stop = threading.Event()

    def serve() -> None:
        try:
            while not stop.is_set():
                got = p.predict(PROBES, user=["u", None] * (len(PROBES) // 2) + ["u"] * (len(PROBES) % 2))
                assert got.fallbacks == {}
                p.predictor.invalidate("u")
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=serve) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for seed in range(3):
            p.personalize(text_data(24, seed=seed), user="u", holdout=0.0, **QUICK)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors
    assert p.store.current_version("u") == 4
