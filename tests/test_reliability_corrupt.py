"""Damaged and foreign files: corrupt deltas, deltas for another base, tampered or wrongly
keyed encrypted deltas, and damaged manifests.

The promise: a typed error, never a crash and never a silently wrong prediction. With
``on_bad_delta="fallback"`` (the default) the predictor serves the base model to that user
and says so in ``Prediction.fallbacks`` (on every call, not only the first); with
``on_bad_delta="raise"`` it raises. ``personalize`` refuses to continue from such a delta
and writes nothing.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

import reliability_fixtures as rf
from bitfit.sdk.bundle import Bundle
from bitfit.sdk.delta import Delta, decode_delta, encode_delta
from bitfit.sdk.errors import (
    BundleInvalidError,
    DecryptionError,
    DeltaCorruptError,
    DeltaMismatchError,
    InvalidArgumentError,
)
from bitfit.sdk.personalizer import Personalizer
from bitfit.sdk.store import DeltaStore

numeric_bundle = rf.session_bundle("numeric")
other_bundle = rf.session_bundle("numeric-other")
text_bundle = rf.session_bundle("text")
KEY = bytes(range(32))
FLIPS = 1000 if rf.stress() else 120
INPUTS = {"x": rf.numeric_data(4, seed=7)["x"]}


def _version_file(store: DeltaStore, user: str, version: int) -> Path:
    return store.path_for(user) / f"v{version:06d}.delta"


@pytest.fixture
def trained(numeric_bundle, tmp_path):
    """A Personalizer with user "u" personalized once (version 1), and u's file bytes."""
    p = Personalizer(numeric_bundle, tmp_path / "store")
    result = p.personalize(rf.numeric_data(24), user="u", epochs=2, learning_rate=0.05, holdout=0)
    assert result.version == 1
    return p, _version_file(p.store, "u", 1).read_bytes()


def _other_safetensors() -> bytes:
    from safetensors.numpy import save

    return save({"x": np.zeros(3, np.float32)}, metadata={"format": "pt"})


def _future_version(good: bytes) -> bytes:
    """The same delta, claiming a format_version this bitfit does not know."""
    from safetensors.numpy import load, save

    n = int.from_bytes(good[:8], "little")
    metadata = json.loads(good[8:8 + n])["__metadata__"]
    metadata["format_version"] = "99"
    return save(load(good), metadata=metadata)


CORRUPTIONS = {
    "empty": lambda good: b"",
    "truncated-to-7-bytes": lambda good: good[:7],
    "truncated-half": lambda good: good[: len(good) // 2],
    "truncated-last-byte": lambda good: good[:-1],
    "appended-byte": lambda good: good + b"\0",
    "random-bytes": lambda good: bytes(random.Random(3).randrange(256) for _ in good),
    "bit-flip-header": lambda good: good[:40] + bytes([good[40] ^ 0x04]) + good[41:],
    "bit-flip-payload": lambda good: good[:-3] + bytes([good[-3] ^ 0x80]) + good[-2:],
    "json": lambda good: b'{"format": "bitfit-delta"}',
    "other-safetensors": lambda good: _other_safetensors(),
    "future-format-version": _future_version,
    "encrypted-without-key": lambda good: encode_delta(decode_delta(good), key=KEY),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_delta_is_a_typed_error_and_a_reported_fallback(trained, numeric_bundle, corruption):
    p, good = trained
    path = _version_file(p.store, "u", 1)
    path.write_bytes(CORRUPTIONS[corruption](good))
    store_before = rf.snapshot(p.store.root)

    with pytest.raises(DeltaCorruptError):
        p.store.load("u")

    fresh = Personalizer(numeric_bundle, p.store)  # nothing cached from before the damage
    base = fresh.predict(INPUTS, user=None)
    for _ in range(2):  # the second call hits the cache and must still report it
        prediction = fresh.predict(INPUTS, user="u")
        assert set(prediction.fallbacks) == {"u"}
        assert prediction.fallbacks["u"].split(":")[0] in ("DeltaCorruptError", "DecryptionError")
        np.testing.assert_array_equal(prediction.logits, base.logits)
        assert prediction.labels == base.labels
    # A batch mixing users: only the damaged user's rows fall back.
    p.personalize(rf.numeric_data(24, seed=2), user="ok", epochs=2, learning_rate=0.05, holdout=0)
    mixed = fresh.predict({"x": np.concatenate([INPUTS["x"], INPUTS["x"]])}, user=["u"] * 4 + ["ok"] * 4)
    assert set(mixed.fallbacks) == {"u"}
    np.testing.assert_array_equal(mixed.logits[:4], base.logits)
    assert not np.allclose(mixed.logits[4:], base.logits)

    strict = Personalizer(numeric_bundle, p.store, on_bad_delta="raise")
    with pytest.raises(DeltaCorruptError):
        strict.predict(INPUTS, user="u")

    # Continuing from it is refused and writes nothing; reset=True starts over.
    before = rf.snapshot(p.store.path_for("u"))
    with pytest.raises(DeltaCorruptError):
        p.personalize(rf.numeric_data(24), user="u")
    assert rf.snapshot(p.store.path_for("u")) == before
    assert store_before["/".join(path.relative_to(p.store.root).parts)] == path.read_bytes()
    result = p.personalize(rf.numeric_data(24), user="u", reset=True, epochs=2, learning_rate=0.05, holdout=0)
    assert result.version == 2 and result.started_from == "base"
    assert fresh.predict(INPUTS, user="u").fallbacks == {}


def test_every_single_bit_flip_of_a_delta_file_is_detected(trained):
    _, good = trained
    decode_delta(good)
    missed = []
    for i in range(len(good)):
        for bit in range(8):
            damaged = bytearray(good)
            damaged[i] ^= 1 << bit
            try:
                decode_delta(bytes(damaged))
            except DeltaCorruptError:
                continue
            missed.append((i, bit))
    assert not missed, f"{len(missed)} of {8 * len(good)} single-bit flips decoded without error: {missed[:10]}"


def test_bit_flips_of_an_encrypted_delta_fail_authentication(trained):
    _, good = trained
    sealed = encode_delta(decode_delta(good), key=KEY)
    rng = random.Random(11)
    for _ in range(FLIPS * 4):
        damaged = bytearray(sealed)
        damaged[rng.randrange(len(sealed))] ^= 1 << rng.randrange(8)
        with pytest.raises(DecryptionError):
            decode_delta(bytes(damaged), key=KEY)


@pytest.mark.parametrize("head", [b"", b"{", b'{"current": 7, "latest": 9}', b'{"current": "1", "latest": 1}',
                                  b"\xff\xfe", b'{"current": 1, "latest": -1}', b"[1, 2]"])
def test_damaged_head_recovers_the_newest_good_version(trained, head):
    p, _ = trained
    p.personalize(rf.numeric_data(24, seed=3), user="u", epochs=1)
    expected = p.store.load("u").tensors
    (p.store.path_for("u") / "HEAD").write_bytes(head)
    store = DeltaStore(p.store.root)
    assert store.current_version("u") == 2
    for name, value in store.load("u").tensors.items():
        np.testing.assert_array_equal(value, expected[name])
    assert Personalizer(p.bundle, store).predict(INPUTS, user="u").fallbacks == {}
    version = store.save("u", store.load("u"))  # the next save repairs HEAD, never reusing a number
    assert version > 2 and store.current_version("u") == version


# ------------------------------------------------------------------------------ deltas of another base


def _assert_refused_everywhere(p: Personalizer, user: str, error=DeltaMismatchError) -> None:
    before = rf.snapshot(p.store.path_for(user))
    with pytest.raises(error):
        p.personalize(rf.numeric_data(24), user=user)
    assert rf.snapshot(p.store.path_for(user)) == before, "a refused personalize must write nothing"
    base = p.predict(INPUTS, user=None)
    prediction = Personalizer(p.bundle, p.store).predict(INPUTS, user=user)
    assert prediction.fallbacks[user].startswith(error.__name__)
    np.testing.assert_array_equal(prediction.logits, base.logits)
    with pytest.raises(error):
        Personalizer(p.bundle, p.store, on_bad_delta="raise").predict(INPUTS, user=user)


def test_delta_from_another_bundle_is_refused(numeric_bundle, other_bundle, tmp_path):
    other = Personalizer(other_bundle, tmp_path / "store")
    other.personalize(rf.numeric_data(24), user="u", epochs=1)
    p = Personalizer(numeric_bundle, tmp_path / "store")
    assert p.bundle.manifest.trainable_shapes == other.bundle.manifest.trainable_shapes  # only the base differs
    assert p.bundle.manifest.base_fingerprint != other.bundle.manifest.base_fingerprint
    _assert_refused_everywhere(p, "u")
    assert other.predict(INPUTS, user="u").fallbacks == {}  # still fine for its own bundle


def test_delta_from_a_different_model_is_refused(numeric_bundle, text_bundle, tmp_path):
    Personalizer(text_bundle, tmp_path / "store").personalize(rf.text_data(8), user="u", epochs=1)
    _assert_refused_everywhere(Personalizer(numeric_bundle, tmp_path / "store"), "u")


@pytest.mark.parametrize("change", ["shape", "missing", "extra", "renamed"])
def test_delta_with_another_tensor_set_is_refused(numeric_bundle, tmp_path, change):
    p = Personalizer(numeric_bundle, tmp_path / "store")
    tensors = {name: np.full(shape, 0.1) for name, shape in p.bundle.manifest.trainable_shapes.items()}
    first = sorted(tensors)[0]
    if change == "shape":
        tensors[first] = np.zeros(tensors[first].size + 1)
    elif change == "missing":
        del tensors[first]
    elif change == "extra":
        tensors["head.extra.bias"] = np.zeros(3)
    else:
        tensors["renamed." + first] = tensors.pop(first)
    p.store.save("u", Delta(tensors, p.bundle.manifest.base_fingerprint))  # right fingerprint, wrong tensors
    _assert_refused_everywhere(p, "u")


# ------------------------------------------------------------------------------ encrypted at rest


def test_encrypted_store_through_the_personalizer(numeric_bundle, tmp_path):
    root = tmp_path / "store"
    p = Personalizer(numeric_bundle, root, key=KEY)
    p.personalize(rf.numeric_data(24), user="u", epochs=2, learning_rate=0.05, holdout=0)
    raw = _version_file(p.store, "u", 1).read_bytes()
    assert b"bitfit-delta" not in raw and b"base_fingerprint" not in raw  # nothing readable at rest
    personal = p.predict(INPUTS, user="u")
    assert personal.fallbacks == {}
    assert not np.allclose(personal.logits, p.predict(INPUTS, user=None).logits)
    second = p.personalize(rf.numeric_data(24, seed=1), user="u", epochs=1)
    assert second.started_from == "previous-delta"

    # Wrong key: refused, never decoded into garbage.
    wrong = Personalizer(numeric_bundle, root, key=bytes(32))
    assert wrong.predict(INPUTS, user="u").fallbacks["u"].startswith("DecryptionError")
    _assert_refused_everywhere(wrong, "u", DecryptionError)
    # No key at all.
    assert Personalizer(numeric_bundle, root).predict(INPUTS, user="u").fallbacks["u"].startswith("DecryptionError")


@pytest.mark.parametrize("attack", ["flip", "truncate", "plain-swap", "replay-other-user", "replay-other-version"])
def test_tampered_encrypted_delta_is_refused(numeric_bundle, tmp_path, attack):
    root = tmp_path / "store"
    p = Personalizer(numeric_bundle, root, key=KEY)
    p.personalize(rf.numeric_data(24), user="u", epochs=1, holdout=0)  # holdout=0: a delta is always saved
    p.personalize(rf.numeric_data(24, seed=5), user="mallory", epochs=1, holdout=0)
    path = _version_file(p.store, "u", 1)
    data = path.read_bytes()
    if attack == "flip":
        path.write_bytes(data[:50] + bytes([data[50] ^ 1]) + data[51:])
    elif attack == "truncate":
        path.write_bytes(data[:-1])
    elif attack == "plain-swap":  # an unencrypted delta that would otherwise fit perfectly
        path.write_bytes(encode_delta(p.store.load("mallory")))
    elif attack == "replay-other-user":  # a valid file of another user, same key and base
        path.write_bytes(_version_file(p.store, "mallory", 1).read_bytes())
    else:  # an older version of the same user replayed over the current one
        p.personalize(rf.numeric_data(24, seed=7), user="u", epochs=1, holdout=0)  # holdout=0: always saved
        assert p.store.versions("u") == [1, 2]
        old = data
        path = _version_file(p.store, "u", 2)
        path.write_bytes(old)
    fresh = Personalizer(numeric_bundle, root, key=KEY)
    # The envelope binds each file to its user directory and version (docs/security.md).
    assert fresh.predict(INPUTS, user="u").fallbacks["u"].startswith("DecryptionError")
    with pytest.raises(DecryptionError):
        Personalizer(numeric_bundle, root, key=KEY, on_bad_delta="raise").predict(INPUTS, user="u")


def test_a_key_with_a_store_that_ignores_it_is_refused(numeric_bundle, tmp_path):
    plain = DeltaStore(tmp_path / "store")
    with pytest.raises(InvalidArgumentError, match="key="):
        Personalizer(numeric_bundle, plain, key=KEY)
    from bitfit.sdk.predictor import Predictor

    with pytest.raises(InvalidArgumentError, match="key="):
        Predictor(numeric_bundle, plain, key=KEY)
    sealed = DeltaStore(tmp_path / "store", key=KEY)
    assert Personalizer(numeric_bundle, sealed, key=KEY).store is sealed


# ------------------------------------------------------------------------------ damaged manifests


MANIFEST_DAMAGE = {
    "empty": lambda text: b"",
    "truncated": lambda text: text[: len(text) // 2],
    "truncated-last-byte": lambda text: text[:-2],
    "random-bytes": lambda text: bytes(random.Random(4).randrange(256) for _ in range(len(text))),
    "not-utf8": lambda text: b"\xff\xfe" + text,
    "json-list": lambda text: b"[1, 2, 3]",
    "other-format": lambda text: text.replace(b'"bitfit-bundle"', b'"other-bundle"'),
    "future-version": lambda text: text.replace(b'"format_version": 2', b'"format_version": 3'),
    "deeply-nested": lambda text: b"[" * 100_000 + b"]" * 100_000,
    "yaml": lambda text: b"format: bitfit-bundle\nformat_version: 1\n",
    "nul": lambda text: b"\0" * 64,
}


@pytest.mark.parametrize("damage", sorted(MANIFEST_DAMAGE))
def test_damaged_manifest_is_bundle_invalid(numeric_bundle, tmp_path, damage):
    bundle_dir = rf.copy_bundle(numeric_bundle, tmp_path / "b")
    path = bundle_dir / "manifest.json"
    path.write_bytes(MANIFEST_DAMAGE[damage](path.read_bytes()))
    for verify in ("hashes", "none"):
        with pytest.raises(BundleInvalidError):
            Bundle.open(bundle_dir, verify=verify)
    with pytest.raises(BundleInvalidError):
        Personalizer(bundle_dir, tmp_path / "store")


@pytest.mark.parametrize("kind", ["numeric", "text"])
def test_every_bit_flip_of_the_manifest_is_refused(kind, request):
    """The manifest has a checksum: a flip anywhere (a label, a number, the checksum itself, the
    JSON around them) is a BundleInvalidError, never a bundle that opens.

    The numeric manifest is flipped at every bit; the larger text manifest at every byte, one bit
    each in turn (every bit with ``BITFIT_STRESS=1``).
    """
    from bitfit.sdk.bundle import Manifest

    original = (Path(request.getfixturevalue(f"{kind}_bundle")) / "manifest.json").read_bytes()
    Manifest.from_json(original.decode("utf-8"))  # the undamaged file opens
    every_bit = kind == "numeric" or rf.stress()
    accepted = []
    flips = 0
    for at in range(len(original)):
        for bit in range(8) if every_bit else [at % 8]:
            damaged = bytearray(original)
            damaged[at] ^= 1 << bit
            flips += 1
            try:
                Manifest.from_json(bytes(damaged).decode("utf-8"))
            except UnicodeDecodeError:  # Bundle.open reads the file as UTF-8: refused there, see below
                continue
            except BundleInvalidError:
                continue
            accepted.append((at, bit, original[max(0, at - 20):at + 20]))
    print(f"\n{kind} manifest: {flips} flips, accepted {len(accepted)}")
    assert not accepted, accepted[:10]


@pytest.mark.parametrize("kind", ["numeric", "text"])
def test_bit_flipped_manifest_is_refused_by_bundle_and_personalizer(kind, request, tmp_path):
    source = Path(request.getfixturevalue(f"{kind}_bundle"))
    original = (source / "manifest.json").read_bytes()
    bundle_dir = rf.copy_bundle(source, tmp_path / "b")
    rng = random.Random(kind)
    for _ in range(FLIPS // 4):
        damaged = bytearray(original)
        damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        (bundle_dir / "manifest.json").write_bytes(bytes(damaged))
        for verify in ("hashes", "none"):
            with pytest.raises(BundleInvalidError):
                Bundle.open(bundle_dir, verify=verify)
        with pytest.raises(BundleInvalidError):
            Personalizer(bundle_dir, tmp_path / "store", verify="none")


def test_bit_flip_in_a_label_name_is_detected(text_bundle, tmp_path):
    bundle_dir = rf.copy_bundle(text_bundle, tmp_path / "b")
    path = bundle_dir / "manifest.json"
    text = path.read_bytes()
    at = text.index(b'"neg"') + 1
    path.write_bytes(text[:at] + bytes([text[at] ^ 0x01]) + text[at + 1:])  # "neg" -> "oeg"
    with pytest.raises(BundleInvalidError):
        Bundle.open(bundle_dir)
