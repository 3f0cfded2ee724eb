"""Bad input from the app, divergence, hostile user ids, a full or read-only disk, and what
every typed error says.

Each invalid call must raise ``InvalidUserDataError`` (or ``BudgetExceededError``) before
training and write nothing: the store's files are byte-for-byte unchanged.
"""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

import reliability_fixtures as rf
from bitfit.sdk.errors import (
    BitfitError,
    BudgetExceededError,
    InvalidArgumentError,
    InvalidUserDataError,
    StoreReadError, StoreWriteError,
    TrainingDivergedError,
)
from bitfit.sdk.personalizer import Personalizer
from bitfit.sdk.store import DeltaStore

text_bundle = rf.session_bundle("text")
numeric_bundle = rf.session_bundle("numeric")
numeric_sgd_bundle = rf.session_bundle("numeric-sgd")
GOOD_TEXT = rf.text_data(10)


@pytest.fixture
def text_p(text_bundle, tmp_path):
    """A text Personalizer whose user "u" already has version 1."""
    p = Personalizer(text_bundle, tmp_path / "store")
    assert p.personalize(GOOD_TEXT, user="u", epochs=1).version == 1
    return p


@pytest.fixture
def numeric_p(numeric_bundle, tmp_path):
    p = Personalizer(numeric_bundle, tmp_path / "store")
    assert p.personalize(rf.numeric_data(12), user="u", epochs=1).version == 1
    return p


def _refused(p: Personalizer, user_data, error=InvalidUserDataError, match: str | None = None, **kwargs):
    """The call raises ``error`` and the store is byte-for-byte unchanged (and "u" still at version 1)."""
    before = rf.snapshot(p.store.root)
    versions = p.store.versions("u")
    with pytest.raises(error, match=match) as info:
        p.personalize(user_data, user="u", epochs=1, **kwargs)
    assert p.store.versions("u") == versions
    assert rf.snapshot(p.store.root) == before
    assert len(str(info.value)) > 20
    return info.value


# ------------------------------------------------------------------------------ text data


def test_empty_data(text_p):
    _refused(text_p, [], match="empty")


def test_single_example_trains_without_a_holdout(text_p):
    result = text_p.personalize([("good great fine day", "pos")], user="solo", epochs=2)
    assert result.examples_used == 1 and result.holdout_examples == 0
    assert result.loss_before is None and result.accuracy_before is None
    assert result.steps == 2 and result.version == 1


def test_unknown_label(text_p):
    _refused(text_p, GOOD_TEXT + [("good day", "neutral")], match="unknown label")


@pytest.mark.parametrize("label", [1.0, 0.5, float("nan"), [1], ["pos"], None, True, {"pos": 1}, b"pos"])
def test_label_of_the_wrong_type(text_p, label):
    _refused(text_p, GOOD_TEXT + [("good day", label)], match="label")


@pytest.mark.parametrize("label", [2, -1, 10**30])
def test_label_index_out_of_range(text_p, label):
    _refused(text_p, [("good day", 0), ("bad day", label)], match="out of range")


def test_mixed_label_formats(text_p):
    _refused(text_p, [("good day", "pos"), ("bad day", 0)], match="mix names and integer")


@pytest.mark.parametrize("text", [None, "", "   \n\t", 3, ["good"], b"", "\ud800 lone surrogate"])
def test_none_or_empty_or_non_text(text_p, text):
    _refused(text_p, GOOD_TEXT + [(text, "pos")], match="text")


def test_non_utf8_bytes_text(text_p):
    _refused(text_p, GOOD_TEXT + [(b"good \xff\xfe day", "pos")], match="UTF-8")


def test_utf8_bytes_text_is_decoded(text_p):
    result = text_p.personalize(GOOD_TEXT + [("good day".encode(), "pos")], user="bytes", epochs=1)
    assert result.version == 1


def test_very_long_text_is_truncated_not_refused(text_p):
    long_text = " ".join(rf.WORDS * 2000)  # ~116k words, far beyond max_length
    result = text_p.personalize([(long_text, "pos"), ("bad awful day", "neg")], user="long", epochs=1)
    assert result.version == 1
    assert text_p.predict([long_text], user="long").logits.shape == (1, 2)
    assert text_p._encoder.encode([long_text])[0][0].__len__() == rf.MAX_LENGTH


def test_duplicates_are_removed_and_reported(text_p):
    data = GOOD_TEXT + GOOD_TEXT[:4] + [{"text": GOOD_TEXT[0][0], "label": GOOD_TEXT[0][1]}]
    result = text_p.personalize(data, user="dups", epochs=1, holdout=0)
    assert result.duplicates_removed == 5
    assert result.examples_used == len(GOOD_TEXT)
    # The same text with another label is not a duplicate.
    flipped = [(GOOD_TEXT[0][0], "neg" if GOOD_TEXT[0][1] == "pos" else "pos")]
    assert text_p.personalize(GOOD_TEXT + flipped, user="dups", epochs=1).duplicates_removed == 0


def test_over_the_example_budget(text_p):
    _refused(text_p, rf.text_data(60), error=BudgetExceededError, match="max_examples", max_examples=50)
    assert text_p.personalize(rf.text_data(50), user="budget", epochs=1, max_examples=50).version == 1


@pytest.mark.parametrize("user_data", [None, 42, b"bytes", "no-such-file.jsonl", "x" * 5000, "a\0b", {"text": "hi"},
                                       [("only-one-field",)], [{"text": "good"}], [1, 2, 3], [[("nested", "pos")]]])
def test_data_of_the_wrong_shape(text_p, user_data):
    _refused(text_p, user_data)


def test_bad_files(text_p, tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "good", "label": "pos"}\n{"text": \n')
    _refused(text_p, bad_json, match="not valid JSON")
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "\n")
    _refused(text_p, deep, match="not valid JSON")
    headless = tmp_path / "headless.csv"
    headless.write_text("good day,pos\n")
    _refused(text_p, headless, match="header")
    short_csv = tmp_path / "short.csv"
    short_csv.write_text("text,label\ngood day,pos\nbad day\n")
    _refused(text_p, short_csv, match="label")
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("text,label\ncaf\xe9 good,pos\n".encode("latin-1"))
    _refused(text_p, latin1, match="UTF-8")
    ok = tmp_path / "ok.csv"
    ok.write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in GOOD_TEXT))
    assert text_p.personalize(ok, user="csv", epochs=1).version == 1


def test_token_arrays_out_of_the_vocabulary(text_p):
    ids = np.array([[2, 3, 4], [5, 6, 7]])
    arrays = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids), "labels": [0, 1]}
    assert text_p.personalize(arrays, user="arrays", epochs=1).version == 1
    _refused(text_p, {**arrays, "input_ids": ids + 1000}, match="vocabulary")
    _refused(text_p, {**arrays, "input_ids": -ids}, match="outside")
    # A value only the graph knows is wrong (a token type its embedding lacks): still the caller's data.
    _refused(text_p, {**arrays, "token_type_ids": np.full_like(ids, 7)}, match="onnxruntime refused")


# ------------------------------------------------------------------------------ numeric data


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 1e300])
def test_nan_or_inf_features(numeric_p, value):
    data = rf.numeric_data(12)
    data["x"][3, 2] = value if value != 1e300 else 0  # 1e300 needs float64 to exist at all
    if value == 1e300:
        data["x"] = data["x"].astype(np.float64)
        data["x"][3, 2] = value  # finite as float64, inf as the model's float32
    _refused(numeric_p, data, match="NaN or inf")


@pytest.mark.parametrize("change", ["width", "rank", "strings", "objects", "complex", "ragged", "missing", "extra",
                                    "count-mismatch", "labels-scalar", "labels-2d", "labels-float", "no-labels"])
def test_wrong_feature_shape_or_dtype(numeric_p, change):
    data = rf.numeric_data(12)
    x = data["x"]
    if change == "width":
        data["x"] = x[:, :5]
    elif change == "rank":
        data["x"] = x[:, :, None]
    elif change == "strings":
        data["x"] = x.astype(str)
    elif change == "objects":
        data["x"] = [[None] * 8] * 12
    elif change == "complex":
        data["x"] = x.astype(np.complex64)
    elif change == "ragged":
        data["x"] = [[1.0] * 8, [1.0] * 7] * 6
    elif change == "missing":
        data = {"labels": data["labels"]}
    elif change == "extra":
        data["y"] = x
    elif change == "count-mismatch":
        data["labels"] = data["labels"][:5]
    elif change == "labels-scalar":
        data["labels"] = 1
    elif change == "labels-2d":
        data["labels"] = np.zeros((12, 2), np.int64)
    elif change == "labels-float":
        data["labels"] = data["labels"].astype(np.float32) + 0.5
    else:
        del data["labels"]
    _refused(numeric_p, data)


def test_numeric_duplicates_are_removed(numeric_p):
    data = rf.numeric_data(10)
    doubled = {"x": np.concatenate([data["x"], data["x"][:3]]), "labels": np.concatenate([data["labels"], data["labels"][:3]])}
    result = numeric_p.personalize(doubled, user="dups", epochs=1, holdout=0)
    assert result.duplicates_removed == 3 and result.examples_used == 10


def test_numeric_over_the_budget(numeric_p):
    _refused(numeric_p, rf.numeric_data(40), error=BudgetExceededError, match="max_examples", max_examples=39)


# ------------------------------------------------------------------------------ divergence


# A loss that overflows, or one that stays finite but grows over DIVERGENCE_FACTOR (1e3) times the
# first step's (AdamW at 1e30 runs it to ~1e30 without an overflow): both are divergence.
@pytest.mark.parametrize("kind, learning_rate, encoding, why", [
    ("numeric", 3e38, "fp32", "the loss (became inf|grew from)"),
    ("numeric-sgd", 1e38, "fp32", "the loss (became inf|grew from)"),
    ("text", 1e30, "fp32", "the loss (became nan|grew from)"),
    ("numeric", 1e30, "fp16", "the loss grew from"),
    ("numeric-sgd", 1e30, "fp16", "the loss grew from"),
    ("numeric", 1e6, "fp32", "the loss grew from"),           # finite throughout: caught by the growth alone
])
def test_divergence_keeps_the_previous_delta(kind, learning_rate, encoding, why, request, tmp_path):
    bundle = request.getfixturevalue(kind.replace("-", "_") + "_bundle")
    data = rf.text_data(12) if kind.startswith("text") else rf.numeric_data(24)
    p = Personalizer(bundle, tmp_path / "store")
    p.personalize(data, user="u", epochs=1, holdout=0)
    path = p.store.path_for("u") / "v000001.delta"
    before, files = path.read_bytes(), rf.snapshot(p.store.root)
    seen: list[float] = []
    with pytest.raises(TrainingDivergedError, match=why) as info:
        # holdout=0: with a holdout, early stopping would quietly keep the starting biases instead.
        p.personalize(data, user="u", epochs=20, learning_rate=learning_rate, batch_size=4, encoding=encoding, holdout=0,
                      progress=lambda progress: seen.append(progress.loss))
    message = str(info.value)
    assert "learning rate" in message.lower() or "diverged" in message
    assert p.store.current_version("u") == 1 and p.store.versions("u") == [1]
    assert path.read_bytes() == before and rf.snapshot(p.store.root) == files
    assert p.predict({"x": data["x"][:2]} if isinstance(data, dict) else [data[0][0]], user="u").fallbacks == {}


# ------------------------------------------------------------------------------ user ids


HOSTILE_IDS = ["../../etc/passwd", "/etc/passwd", "a/b", "..", ".", "a\\..\\..\\b", "nul\0byte", "x" * 10_000,
               "ünïcødé 用户 🚀", "\ud800lone", "CON", "-rf", ".hidden", "Alice", "alice", " "]


def test_hostile_user_ids_stay_inside_and_never_collide(text_bundle, tmp_path):
    root = tmp_path / "store"
    outside_before = set(os.listdir(tmp_path)) | {"store"}
    p = Personalizer(text_bundle, root)
    deltas = {}
    for i, user in enumerate(HOSTILE_IDS):
        data = rf.text_data(6, seed=i)
        p.personalize(data, user=user, epochs=1, seed=i, holdout=0, learning_rate=0.01 * (i + 1))
        deltas[user] = p.store.load(user)
    assert set(os.listdir(tmp_path)) == outside_before  # nothing was written next to the store
    directories = [p.store.path_for(u) for u in HOSTILE_IDS]
    assert len(set(directories)) == len(HOSTILE_IDS)
    for d in directories:
        assert d.parent == root and d.is_dir() and not d.name.startswith(".") and len(d.name) < 100
    assert sorted(os.listdir(root)) == sorted(d.name for d in directories)
    assert sorted(p.store.users()) == sorted(HOSTILE_IDS)
    texts = [t for t, _ in rf.text_data(3, seed=99)]
    fresh = Personalizer(text_bundle, root)
    for user in HOSTILE_IDS:
        expected = {n: v.reshape(fresh.predictor.base[n].shape) for n, v in deltas[user].tensors.items()}
        assert fresh.store.load(user).info == deltas[user].info  # each id reads back its own delta
        prediction = fresh.predict(texts, user=user)
        assert prediction.fallbacks == {}
        feeds = fresh.predictor.encoder.feeds_for_texts(texts)
        own = fresh.predictor.session.run(None, {**feeds, **{n: fresh.predictor.base[n] + d for n, d in expected.items()}})[0]
        np.testing.assert_allclose(prediction.logits, own, rtol=1e-5, atol=1e-5)
    many = fresh.predict(texts * len(HOSTILE_IDS), user=[u for u in HOSTILE_IDS for _ in texts])
    assert many.fallbacks == {}


@pytest.mark.parametrize("user", ["", None, 3, b"bytes"])
def test_invalid_user_ids_are_refused(text_p, user):
    with pytest.raises(InvalidArgumentError):
        text_p.personalize(GOOD_TEXT, user=user)
    if user is not None:
        with pytest.raises(InvalidArgumentError):
            text_p.predict(["good day"], user=user)


# ------------------------------------------------------------------------------ disk full / read-only


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES])
@pytest.mark.parametrize("where", ["write", "fsync", "replace-version", "replace-head", "mkstemp"])
def test_disk_full_or_read_only_is_a_store_write_error(numeric_p, monkeypatch, code, where):
    import tempfile

    p = numeric_p
    directory = p.store.path_for("u")
    committed = (directory / "v000001.delta").read_bytes()
    calls = {"replace": 0}

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    real_replace, real_write = os.replace, os.write

    def replace(src, dst, *args, **kwargs):
        calls["replace"] += 1
        is_head = str(dst).endswith("HEAD")
        if (where == "replace-version" and not is_head) or (where == "replace-head" and is_head):
            fail()
        return real_replace(src, dst, *args, **kwargs)

    if where == "write":
        import builtins

        real_open, root = builtins.open, str(p.store.root)

        class Full:  # a file whose every write fails, as on a full disk
            def __init__(self, fh):
                self.fh = fh

            def write(self, data):
                fail()

            def __getattr__(self, name):
                return getattr(self.fh, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.fh.close()

        def open_(file, mode="r", *args, **kwargs):
            fh = real_open(file, mode, *args, **kwargs)
            writing = any(c in mode for c in "wax+")
            return Full(fh) if writing and (isinstance(file, int) or str(file).startswith(root)) else fh

        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(os, "write", lambda fd, data: fail())
    elif where == "fsync":
        monkeypatch.setattr(os, "fsync", fail)
    elif where == "mkstemp":
        monkeypatch.setattr(tempfile, "mkstemp", fail)
    else:
        monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(StoreWriteError) as info:
        p.personalize(rf.numeric_data(12, seed=1), user="u", epochs=1)
    monkeypatch.undo()
    message = str(info.value)
    assert ("disk is full" in message) if code in (errno.ENOSPC, errno.EDQUOT) else ("read-only" in message)
    assert "intact" in message
    assert info.value.errno == code
    # The previous delta is current and untouched, nothing half-written is visible or left.
    store = DeltaStore(p.store.root)
    assert store.current_version("u") == 1 and store.versions("u") == [1]
    assert (directory / "v000001.delta").read_bytes() == committed
    assert not [n for n in os.listdir(directory) if n.startswith(".tmp-")]
    assert Personalizer(p.bundle, store).predict({"x": rf.numeric_data(2)["x"]}, user="u").fallbacks == {}
    # Once the disk has room again, the next save works and gets a new number.
    assert p.personalize(rf.numeric_data(12, seed=1), user="u", epochs=1).version == 2


def test_store_root_is_a_file(numeric_bundle, tmp_path):
    root = tmp_path / "store"
    root.write_text("not a directory")
    p = Personalizer(numeric_bundle, root)
    with pytest.raises(BitfitError) as info:
        p.personalize(rf.numeric_data(12), user="u", epochs=1)
    # The first store access is a read (the user's current delta): refused as such, naming the root.
    assert isinstance(info.value, StoreReadError) and str(root) in str(info.value)


# ------------------------------------------------------------------------------ what the errors say


ADVICE = ("pass", "use", "re-export", "personalize", "lower", "try", "delete", "check", "free", "copy", "raise",
          "install", "drop", "give", "fix", "decode", "clean", "reset", "upgrade", "export", "create", "sample", "pick")


def test_error_messages_say_what_was_wrong_and_what_to_do(text_p, numeric_bundle, tmp_path, monkeypatch):
    """One real trigger per error type; each message names the problem and an action."""
    from bitfit.sdk.bundle import Bundle
    from bitfit.sdk.delta import Delta
    from bitfit.sdk.trainer import TrainingSession

    raised: dict[str, str] = {}

    def capture(fn):
        try:
            fn()
        except BitfitError as err:
            raised[type(err).__name__] = str(err)
        else:
            raise AssertionError(f"{fn} raised nothing")

    capture(lambda: text_p.personalize([("good", "neutral")], user="u"))
    capture(lambda: Bundle.open(tmp_path))
    (text_p.store.path_for("u") / "v000001.delta").write_bytes(b"garbage")
    capture(lambda: text_p.store.load("u"))
    other = Personalizer(numeric_bundle, tmp_path / "s2")
    other.store.save("m", Delta({"0.bias": np.zeros(3)}, "sha256:" + "0" * 64))
    capture(lambda: other.personalize(rf.numeric_data(4), user="m"))
    capture(lambda: other.personalize(rf.numeric_data(8), user="x", max_examples=4))
    capture(lambda: other.personalize(rf.numeric_data(12), user="x", learning_rate=1e38, epochs=20, batch_size=2,
                                      holdout=0))
    capture(lambda: TrainingSession(other.bundle, device="cuda"))
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    capture(lambda: other.personalize(rf.numeric_data(12), user="y", epochs=1))
    monkeypatch.undo()
    busy = DeltaStore(other.store.root, lock_timeout=0.05)
    from filelock import FileLock

    directory = busy.path_for("z")
    directory.mkdir(parents=True)
    with FileLock(str(directory / ".lock")):
        capture(lambda: busy.save("z", Delta({"b": np.zeros(1)}, "sha256:00")))
    capture(lambda: busy.load("nobody"))
    locked = DeltaStore(tmp_path / "s3", key=bytes(32))
    locked.save("k", Delta({"b": np.zeros(1)}, "sha256:00"))
    capture(lambda: DeltaStore(tmp_path / "s3", key=bytes(range(32))).load("k"))
    expected = {"InvalidUserDataError", "BundleInvalidError", "DeltaCorruptError", "DeltaMismatchError",
                "BudgetExceededError", "TrainingDivergedError", "ProviderUnavailableError", "StoreWriteError",
                "StoreBusyError", "DeltaNotFoundError", "DecryptionError"}
    assert expected <= set(raised), set(raised)
    for name, message in raised.items():
        assert len(message) > 30, (name, message)
        assert any(word in message.lower() for word in ADVICE), f"{name} gives no next step: {message}"
