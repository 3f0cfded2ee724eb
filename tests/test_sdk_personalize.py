"""Personalizer.personalize on tiny bundles: learning, frozen weights, result fields,
incremental vs reset, determinism, per-user optimizer state, encodings, progress, data forms."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from bitfit.sdk import DeltaStore, Personalizer, Progress
from bitfit.sdk.bundle import Bundle
from bitfit.sdk.errors import (
    BudgetExceededError, DeltaCorruptError, DeltaMismatchError, InvalidArgumentError, InvalidUserDataError, ProviderUnavailableError,
)

from sdk_fixtures import *  # noqa: F401,F403  (fixtures and helpers)
from sdk_fixtures import (
    NUMERIC_LABELS, PROBE_LABELS, PROBES, QUICK, TEXT_LABELS, all_files_sha256, delta_file, numeric_data, text_data,
    write_csv, write_jsonl,
)


def stored(p: Personalizer, user: str, version: int | None = None) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in p.store.load(user, version).tensors.items()}


def same_tensors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture
def p(text_bundle, tmp_path) -> Personalizer:
    return Personalizer(text_bundle, store=tmp_path / "store")


# -- learning -----------------------------------------------------------------------------


def test_personalize_learns_the_users_labels_and_leaves_the_base_alone(p, text_bundle):
    data = text_data(48)
    base_before = p.predict(PROBES)
    assert base_before.labels == ["neg"] * 4  # the base head says "neg" for every 5-word sentence

    result = p.personalize(data, user="alice", holdout=0.25, **QUICK)

    assert result.accuracy_before == pytest.approx(0.5, abs=0.2)
    assert result.accuracy_after > result.accuracy_before + 0.3
    assert result.loss_after < result.loss_before
    assert p.predict(PROBES, user="alice").labels == PROBE_LABELS
    assert p.evaluate(data, user="alice")["accuracy"] > p.evaluate(data)["accuracy"] + 0.3
    base_after = p.predict(PROBES)
    np.testing.assert_array_equal(base_after.logits, base_before.logits)
    assert base_after.labels == ["neg"] * 4
    # A second personalizer over the same store sees alice's delta too.
    assert Personalizer(text_bundle, store=p.store).predict(PROBES, user="alice").labels == PROBE_LABELS


def test_frozen_weights_untouched_and_delta_holds_exactly_the_trainable_tensors(p, text_bundle):
    manifest = Bundle.open(text_bundle).manifest
    weights = text_bundle / manifest.files["weights"].path
    weights_sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    files_before = all_files_sha256(text_bundle)

    p.personalize(text_data(24), user="alice", **QUICK)

    assert hashlib.sha256(weights.read_bytes()).hexdigest() == weights_sha == manifest.files["weights"].sha256
    assert all_files_sha256(text_bundle) == files_before
    Bundle.open(text_bundle, verify="hashes")  # still passes its own hash check
    delta = p.store.load("alice")
    assert delta.base_fingerprint == manifest.base_fingerprint
    assert {n: tuple(a.shape) for n, a in delta.tensors.items()} == {t.name: tuple(t.shape) for t in manifest.trainable}
    changed = [n for n, a in delta.tensors.items() if np.any(a != 0)]
    assert len(changed) >= len(manifest.trainable) // 2  # training moved most biases, not just one


def test_numeric_bundle_personalizes_and_predicts(numeric_bundle, tmp_path):
    p = Personalizer(numeric_bundle, store=tmp_path)
    features, labels = numeric_data(40)
    before = p.predict({"features": features})
    r = p.personalize({"features": features, "labels": labels}, user="u", epochs=6, learning_rate=3e-2,
                      batch_size=8, holdout=0.2, patience=None, progress_bar=False)
    assert r.examples_used + r.holdout_examples == 40 and r.duplicates_removed == 0
    after = p.predict({"features": features}, user="u")
    assert after.logits.shape == (40, 3) and set(after.labels) <= set(NUMERIC_LABELS)
    assert not np.allclose(after.logits, before.logits)
    np.testing.assert_allclose(after.probabilities.sum(axis=1), 1.0, rtol=1e-5)
    # A habit biases can learn: this user always means the class the base model predicts least.
    # Learning it from 40 examples must carry over to 300 unseen ones.
    rare = int(np.bincount(before.logits.argmax(1), minlength=3).argmin())
    habit = np.full(40, rare, np.int64)
    p.personalize({"features": features, "labels": habit}, user="h", epochs=6, learning_rate=3e-2,
                  batch_size=8, holdout=0, patience=None, progress_bar=False)
    unseen = {"features": numeric_data(300, seed=11)[0]}
    base = p.evaluate((unseen, np.full(300, rare)))["accuracy"]
    personal = p.evaluate((unseen, np.full(300, rare)), user="h")["accuracy"]
    print(f"numeric habit, unseen accuracy: base {base:.3f} -> with delta {personal:.3f}")
    assert base < 0.34 and personal >= 0.9, (base, personal)


# -- result fields ---------------------------------------------------------------------------


def test_result_fields(p):
    data = text_data(30)
    data_with_repeats = data + data[:4]  # exact repeats are removed before the split
    seen: list[Progress] = []
    r1 = p.personalize(data_with_repeats, user="alice", holdout=0.2, progress=seen.append, patience=None, **QUICK)
    assert r1.version == 1 and r1.user == "alice" and r1.encoding == "fp16" and r1.started_from == "base"
    assert r1.duplicates_removed == 4
    assert r1.examples_used + r1.holdout_examples == len(data_with_repeats) - r1.duplicates_removed
    assert r1.holdout_examples == math.floor(30 * 0.2)
    assert r1.delta_bytes == delta_file(p.store.root, "alice", 1).stat().st_size > 0
    steps_per_epoch = -(-r1.examples_used // QUICK["batch_size"])
    assert r1.saved and r1.stopped_by == "steps" and r1.epochs_run == QUICK["epochs"]
    assert r1.steps == steps_per_epoch * QUICK["epochs"] == len(seen)
    for value in (r1.loss_before, r1.loss_after, r1.accuracy_before, r1.accuracy_after):
        assert value is not None and math.isfinite(value)
    assert 0 <= r1.accuracy_before <= 1 and 0 <= r1.accuracy_after <= 1
    assert r1.seconds > 0 and r1.as_dict()["version"] == 1
    info = p.store.load("alice").info
    assert info["steps"] == r1.steps and info["stopped_by"] == "steps" and info["seed"] == 0
    assert info["metrics"]["after"]["accuracy"] == r1.accuracy_after == r1.metrics_after["accuracy"]
    assert info["plan"]["steps"] == r1.plan["steps"] == r1.steps and info["plan"]["holdout"] == r1.holdout_examples

    r2 = p.personalize(data, user="alice", max_steps=2, holdout=0.0, **QUICK)
    assert r2.version == 2 and r2.steps == 2 and r2.stopped_by == "steps" and r2.epochs_run == 1
    assert "capped by max_steps=2" in r2.plan["reasons"]["steps"]
    assert r2.holdout_examples == 0 and r2.examples_used == len(data)
    assert r2.loss_before is None and r2.loss_after is None and r2.accuracy_before is None and r2.accuracy_after is None
    assert r2.delta_bytes == delta_file(p.store.root, "alice", 2).stat().st_size

    r3 = p.personalize(data, user="alice", max_seconds=1e-9, holdout=0.0, **QUICK)
    assert r3.version == 3 and r3.stopped_by == "max_seconds" and r3.steps == 1
    assert p.store.current_version("alice") == 3 and p.store.versions("alice") == [1, 2, 3]
    assert p.personalize(data, user="bob", max_steps=1, **QUICK).version == 1  # versions are per user


def test_early_stopping_keeps_the_best_checkpoint(p):
    # A huge learning rate makes the holdout loss worse after the first epoch.
    r = p.personalize(text_data(40), user="alice", epochs=8, learning_rate=0.5, batch_size=8, holdout=0.25,
                      patience=1, progress_bar=False)
    assert r.stopped_by == "early_stopping" and r.epochs_run < 8
    assert r.loss_after <= r.loss_before + 1e-6  # the kept biases are never worse than the start


def test_kept_step_reports_which_biases_were_saved_and_harm_is_never_saved(p):
    good = p.personalize(text_data(40), user="alice", epochs=3, batch_size=8, holdout=0.25, progress_bar=False)
    assert good.saved and 1 <= good.kept_step <= good.steps  # some checkpoint beat the start on the holdout
    # Continuing from alice's trained biases on the same data, a huge step makes every checkpoint
    # worse than the start: nothing is saved, alice keeps version 1, and the result says so.
    before = stored(p, "alice")
    worse = p.personalize(text_data(40), user="alice", epochs=2, learning_rate=3.0, batch_size=8, holdout=0.25,
                          patience=None, progress_bar=False)
    assert not worse.saved and worse.kept_step == 0 and worse.version == 1 and worse.delta_bytes == 0
    assert worse.loss_after == pytest.approx(worse.loss_before, rel=1e-5) and not worse.retried  # the rate was given
    assert p.store.versions("alice") == [1] and same_tensors(stored(p, "alice"), before)
    no_holdout = p.personalize(text_data(12), user="carol", epochs=2, holdout=0.0, progress_bar=False)
    assert no_holdout.saved and no_holdout.kept_step == no_holdout.steps  # without a holdout the last step is kept


def test_column_shaped_text_data(p):
    pairs = text_data(24)
    columns = {"text": [t for t, _ in pairs], "label": [y for _, y in pairs]}
    a = p.personalize(columns, user="cols", epochs=1, holdout=0.0, seed=3, progress_bar=False)
    b = p.personalize(pairs, user="pairs", epochs=1, holdout=0.0, seed=3, progress_bar=False)
    assert same_tensors(stored(p, "cols", a.version), stored(p, "pairs", b.version))
    with pytest.raises(InvalidUserDataError, match="equally long"):
        p.personalize({"text": ["a", "b"], "label": ["neg"]}, user="cols")


def test_progress_callback_and_bar(p, capsys):
    seen: list[Progress] = []
    r = p.personalize(text_data(24), user="alice", progress=seen.append, epochs=2, batch_size=4, holdout=0.0,
                      progress_bar=False)
    assert [s.step for s in seen] == list(range(1, r.steps + 1))
    assert all(s.user == "alice" and s.total_steps == r.steps and math.isfinite(s.loss) for s in seen)
    assert [s.epoch for s in seen] == sorted(s.epoch for s in seen) and seen[-1].epoch == 2
    assert all(a.seconds <= b.seconds for a, b in zip(seen, seen[1:]))
    r2 = p.personalize(text_data(24), user="alice", max_steps=3, progress_bar=True)
    assert r2.steps == 3
    assert "personalize alice" in capsys.readouterr().err


# -- incremental vs reset, determinism, optimizer state ----------------------------------------


def test_incremental_continues_from_the_previous_delta_and_reset_starts_over(p):
    data = text_data(30)
    options = dict(QUICK, epochs=2, encoding="fp32", holdout=0.2, patience=None)
    first = p.personalize(data, user="alice", **options)
    second = p.personalize(data, user="alice", **options)
    third = p.personalize(data, user="alice", reset=True, **options)
    assert (first.started_from, second.started_from, third.started_from) == ("base", "previous-delta", "base")
    assert [first.version, second.version, third.version] == [1, 2, 3]
    v1, v2, v3 = (stored(p, "alice", v) for v in (1, 2, 3))
    assert same_tensors(v1, v3)  # reset = the first run again (same seed, same data)
    assert not same_tensors(v2, v3)
    # Same seed, same holdout: the second run starts exactly where the first one ended.
    assert second.loss_before == pytest.approx(first.loss_after, rel=1e-4)
    assert second.accuracy_before == first.accuracy_after
    assert third.loss_before == pytest.approx(first.loss_before, rel=1e-6)


def test_same_seed_and_data_give_identical_deltas(p):
    data = text_data(30)
    options = dict(QUICK, encoding="fp32")
    p.personalize(data, user="twin-1", seed=7, **options)
    p.personalize(data, user="twin-2", seed=7, **options)
    p.personalize(data, user="other-seed", seed=8, **options)
    assert same_tensors(stored(p, "twin-1"), stored(p, "twin-2"))
    assert not same_tensors(stored(p, "twin-1"), stored(p, "other-seed"))


def test_no_optimizer_state_leaks_between_users(text_bundle, tmp_path):
    data_a = [(t, "pos" if label == "neg" else "neg") for t, label in text_data(30, seed=3)]  # inverted labels
    data_b = text_data(30, seed=4)
    options = dict(QUICK, encoding="fp32", seed=5)
    shared = Personalizer(text_bundle, store=tmp_path / "one")
    shared.personalize(data_a, user="A", **options)
    shared.personalize(data_b, user="B", **options)
    fresh = Personalizer(text_bundle, store=tmp_path / "two")
    fresh.personalize(data_b, user="B", **options)
    b_after_a, b_alone = stored(shared, "B"), stored(fresh, "B")
    assert b_after_a.keys() == b_alone.keys()
    for name in b_alone:
        assert np.array_equal(b_after_a[name], b_alone[name]), name


# -- delta encodings ------------------------------------------------------------------------------


def test_delta_encodings_round_trip_and_int8_predicts_like_fp32(p):
    data = text_data(40)
    results = {enc: p.personalize(data, user=f"u-{enc}", encoding=enc, **QUICK) for enc in ("fp32", "fp16", "int8")}
    deltas = {enc: p.store.load(f"u-{enc}") for enc in results}
    for enc, delta in deltas.items():
        assert delta.encoding == enc == results[enc].encoding
        assert results[enc].delta_bytes == delta_file(p.store.root, f"u-{enc}", 1).stat().st_size
    assert results["int8"].delta_bytes < results["fp16"].delta_bytes < results["fp32"].delta_bytes
    d32 = deltas["fp32"].tensors
    for name, d in d32.items():
        # Same seed and data: the same trained values, rounded through each encoding.
        np.testing.assert_array_equal(deltas["fp16"].tensors[name], d.astype(np.float16).astype(np.float32))
        scale = float(np.abs(d).max()) / 127
        assert np.abs(deltas["int8"].tensors[name] - d).max() <= scale / 2 + 1e-7, name

    texts = [t for t, _ in text_data(40, seed=9)]
    out = {enc: p.predict(texts, user=f"u-{enc}") for enc in results}
    np.testing.assert_allclose(out["fp16"].logits, out["fp32"].logits, atol=1e-2)
    np.testing.assert_allclose(out["int8"].logits, out["fp32"].logits, atol=0.25)
    agree = np.mean(np.array(out["int8"].labels) == np.array(out["fp32"].labels))
    assert agree >= 0.9
    assert p.evaluate(data, user="u-int8")["accuracy"] >= p.evaluate(data, user="u-fp32")["accuracy"] - 0.1


# -- data forms -------------------------------------------------------------------------------------


def test_every_text_data_form_trains_the_same_delta(p, tmp_path):
    pairs = text_data(20)
    index = {name: i for i, name in enumerate(TEXT_LABELS)}
    forms = {
        "pairs": pairs,
        "list-pairs": [[t, label] for t, label in pairs],
        "dicts": [{"text": t, "label": label} for t, label in pairs],
        "jsonl": write_jsonl(tmp_path / "data.jsonl", [{"text": t, "label": label} for t, label in pairs]),
        "jsonl-str": str(write_jsonl(tmp_path / "d2.jsonl", [{"text": t, "label": label} for t, label in pairs])),
        "jsonl-index": write_jsonl(tmp_path / "idx.jsonl", [{"text": t, "label": index[label]} for t, label in pairs]),
        "csv": write_csv(tmp_path / "data.csv", pairs),
        "csv-index": write_csv(tmp_path / "idx.csv", [(t, index[label]) for t, label in pairs]),
        "pairs-index": [(t, index[label]) for t, label in pairs],
    }
    options = dict(QUICK, epochs=1, encoding="fp32")
    for name, data in forms.items():
        r = p.personalize(data, user=name, **options)
        assert r.examples_used + r.holdout_examples == len(pairs), name
    reference = stored(p, "pairs")
    assert any(np.any(a != 0) for a in reference.values())
    for name in forms:
        assert same_tensors(stored(p, name), reference), name


def test_numeric_data_forms(numeric_bundle, tmp_path):
    p = Personalizer(numeric_bundle, store=tmp_path)
    features, labels = numeric_data(24)
    names = [NUMERIC_LABELS[i] for i in labels]
    forms = {
        "dict": {"features": features, "labels": labels},
        "tuple": ({"features": features}, labels),
        "names": {"features": features, "labels": names},
        "list-labels": ({"features": features.tolist()}, labels.tolist()),
        "float64": {"features": features.astype(np.float64), "labels": labels},
    }
    for name, data in forms.items():
        r = p.personalize(data, user=name, epochs=2, batch_size=8, encoding="fp32", progress_bar=False)
        assert r.examples_used + r.holdout_examples == 24, name
    reference = stored(p, "dict")
    for name in forms:
        assert same_tensors(stored(p, name), reference), name


@pytest.mark.parametrize(
    "data, message",
    [
        ([], "empty"),
        ([("good day", "pos"), ("bad day", 1)], "mix names and integer indices"),
        ([("good day", "pos"), ("bad day", "meh")], "unknown label"),
        ([("good day", 0), ("bad day", 7)], "out of range"),
        ([("good day", "pos"), ("   ", "neg")], "text is empty"),
        ([("good day", "pos"), (None, "neg")], "text must be a non-empty string"),
        ([("good day", "pos", "extra")], "expected a (text, label) pair"),
        ([{"text": "good day"}], "needs 'text' and 'label'"),
        ("missing-file.jsonl", "missing-file.jsonl"),
    ],
)
def test_invalid_text_data_is_refused_and_nothing_is_saved(p, tmp_path, data, message):
    if data == "missing-file.jsonl":
        data = tmp_path / data
    with pytest.raises(InvalidUserDataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        p.personalize(data, user="alice", **QUICK)
    assert p.store.current_version("alice") is None


def test_invalid_files_and_budgets(p, tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "good", "label": "pos"}\n{not json\n', encoding="utf-8")
    with pytest.raises(InvalidUserDataError, match=r"bad.jsonl:2"):
        p.personalize(bad_json, user="alice")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncaf\xe9 good,pos\n".encode("latin-1"))
    with pytest.raises(InvalidUserDataError, match="not UTF-8"):
        p.personalize(latin, user="alice")
    no_header = tmp_path / "no-header.csv"
    no_header.write_text("good day,pos\n", encoding="utf-8")
    with pytest.raises(InvalidUserDataError, match="header"):
        p.personalize(no_header, user="alice")
    txt = tmp_path / "data.txt"
    txt.write_text("good day\tpos\n", encoding="utf-8")
    with pytest.raises(InvalidUserDataError, match="unsupported file type"):
        p.personalize(txt, user="alice")
    with pytest.raises(BudgetExceededError, match="max_examples=5"):
        p.personalize(text_data(10), user="alice", max_examples=5)
    assert p.store.current_version("alice") is None


def test_invalid_numeric_data(numeric_bundle, tmp_path):
    p = Personalizer(numeric_bundle, store=tmp_path)
    features, labels = numeric_data(8)
    with pytest.raises(InvalidUserDataError, match="needs a 'labels' array"):
        p.personalize({"features": features}, user="u")
    with pytest.raises(InvalidUserDataError, match="size 5 on axis 1"):
        p.personalize({"features": features[:, :5], "labels": labels}, user="u")
    bad = features.copy()
    bad[0, 0] = np.nan
    with pytest.raises(InvalidUserDataError, match="NaN"):
        p.personalize({"features": bad, "labels": labels}, user="u")
    with pytest.raises(InvalidUserDataError, match="7 labels for 8 examples"):
        p.personalize({"features": features, "labels": labels[:7]}, user="u")
    with pytest.raises(InvalidUserDataError, match="numeric inputs"):
        p.personalize([("good", "a")], user="u")
    assert p.store.current_version("u") is None


@pytest.mark.parametrize(
    "options, message",
    [
        ({"user": ""}, "user must be a non-empty string"),
        ({"epochs": 0}, "epochs must be an int"),
        ({"learning_rate": -1.0}, "learning_rate must be a positive number"),
        ({"learning_rate": float("nan")}, "learning_rate must be a positive number"),
        ({"batch_size": 0}, "batch_size must be an int"),
        ({"max_steps": 0}, "max_steps must be an int"),
        ({"max_seconds": 0}, "max_seconds must be a positive number"),
        ({"patience": 0}, "patience must be an int"),
        ({"encoding": "bf16"}, "encoding must be fp32, fp16 or int8"),
        ({"holdout": 1.0}, "holdout must be in"),
    ],
)
def test_invalid_options(p, options, message):
    kwargs = {"user": "alice", **options}
    with pytest.raises(InvalidArgumentError, match=message):
        p.personalize(text_data(8), **kwargs)


def test_delta_of_another_bundle_needs_reset(text_bundle, text_head_bundle, tmp_path):
    store = DeltaStore(tmp_path)
    Personalizer(text_head_bundle, store=store).personalize(text_data(12), user="alice", max_steps=1, **QUICK)
    p = Personalizer(text_bundle, store=store)
    with pytest.raises(DeltaMismatchError, match="pass reset=True"):
        p.personalize(text_data(12), user="alice", max_steps=1, **QUICK)
    assert p.store.versions("alice") == [1]
    r = p.personalize(text_data(12), user="alice", max_steps=1, reset=True, **QUICK)
    assert r.started_from == "base" and r.version == 2


def test_corrupt_current_delta_needs_reset(p):
    p.personalize(text_data(12), user="alice", max_steps=1, **QUICK)
    path = delta_file(p.store.root, "alice", 1)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DeltaCorruptError, match="pass reset=True"):
        p.personalize(text_data(12), user="alice", max_steps=1, **QUICK)
    r = p.personalize(text_data(12), user="alice", max_steps=1, reset=True, **QUICK)
    assert r.version == 2 and r.started_from == "base"
    assert p.predict(PROBES, user="alice").fallbacks == {}


def test_encrypted_store(text_bundle, tmp_path):
    pytest.importorskip("cryptography")
    key = bytes(range(32))
    p = Personalizer(text_bundle, store=tmp_path, key=key)
    r = p.personalize(text_data(32), user="alice", **QUICK)
    raw = delta_file(tmp_path, "alice", 1).read_bytes()
    assert raw.startswith(b"BFDELTA-AESGCM") and b"bitfit-delta" not in raw  # nothing readable at rest
    assert r.delta_bytes == len(raw)
    assert p.predict(PROBES, user="alice").labels == PROBE_LABELS
    assert Personalizer(text_bundle, store=tmp_path, key=key).predict(PROBES, user="alice").labels == PROBE_LABELS
    wrong = Personalizer(text_bundle, store=tmp_path, key=bytes(32)).predict(PROBES, user="alice")
    assert wrong.labels == ["neg"] * 4 and "alice" in wrong.fallbacks  # served the base, and said so


def test_cuda_device_without_cuda_is_a_typed_error(text_bundle, tmp_path):
    from bitfit.sdk.trainer import cuda_available

    if cuda_available():
        pytest.skip("this onnxruntime build has CUDA")
    p = Personalizer(text_bundle, store=tmp_path, providers="cuda")
    with pytest.raises(ProviderUnavailableError, match="CUDAExecutionProvider is not available.*providers='cpu'"):
        p.personalize(text_data(8), user="alice", max_steps=1, progress_bar=False)
    assert p.store.current_version("alice") is None


def test_threads_option_trains_the_same_delta(text_bundle, tmp_path):
    data = text_data(20)
    options = dict(QUICK, epochs=1, encoding="fp32")
    one = Personalizer(text_bundle, store=tmp_path / "a", threads=1)
    one.personalize(data, user="u", **options)
    two = Personalizer(text_bundle, store=tmp_path / "b", threads=2)
    two.personalize(data, user="u", **options)
    for name, value in stored(one, "u").items():
        np.testing.assert_allclose(value, stored(two, "u")[name], atol=1e-5)


def test_training_session_takes_session_options_for_profiling(text_bundle, tmp_path):
    from bitfit.sdk.data import TextEncoder, batches, load_examples
    from bitfit.sdk.runtime import ort
    from bitfit.sdk.trainer import TrainingSession

    bundle = Bundle.open(text_bundle)
    encoder = TextEncoder(bundle)
    feeds, labels = next(batches(load_examples(text_data(8), bundle, encoder), encoder, 8, None))
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "train-profile")
    session = TrainingSession(bundle, session_options=options, learning_rate=1e-3)
    assert math.isfinite(session.train_step(feeds, labels))
    del session
    assert list(tmp_path.glob("train-profile*.json")), "ORT wrote no profile: the options were not used"
