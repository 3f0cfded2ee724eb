"""The delta file format: round trips, sizes, the spec's checksum, corrupt files, encryption."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from bitfit.sdk.delta import (
    ENCRYPTED_MAGIC,
    Delta,
    check_delta_fits,
    decode_delta,
    encode_delta,
    load_delta,
    save_delta,
    validate_key,
)
from bitfit.sdk.errors import (
    BitfitError,
    DecryptionError,
    DeltaCorruptError,
    DeltaMismatchError,
    DeltaNotFoundError,
    InvalidArgumentError,
    MissingDependencyError,
    StoreWriteError,
    TrainingDivergedError,
)

FP = "sha256:" + "ab" * 32
EXAMPLES = 1000 if os.environ.get("BITFIT_STRESS") == "1" else 200
KEY = bytes(range(32))


def minilm_biases(seed: int = 0) -> dict[str, np.ndarray]:
    """The 50 bias tensors of all-MiniLM-L6 (26,112 values), with their real names."""
    shapes = {"embeddings.LayerNorm.bias": 384, "pooler.dense.bias": 384}
    for i in range(6):
        for part, n in [
            ("attention.self.query.bias", 384),
            ("attention.self.key.bias", 384),
            ("attention.self.value.bias", 384),
            ("attention.output.dense.bias", 384),
            ("attention.output.LayerNorm.bias", 384),
            ("intermediate.dense.bias", 1536),
            ("output.dense.bias", 384),
            ("output.LayerNorm.bias", 384),
        ]:
            shapes[f"encoder.layer.{i}.{part}"] = n
    rng = np.random.default_rng(seed)
    return {name: rng.normal(0, 0.1, size=n).astype(np.float32) for name, n in shapes.items()}


def trained_from(base: dict[str, np.ndarray], seed: int = 1, scale: float = 0.01) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (b + rng.normal(0, scale, size=b.shape)).astype(np.float32) for n, b in base.items()}


def small_delta(encoding: str = "fp16") -> Delta:
    return Delta(
        {"a.bias": np.array([0.5, -0.25, 1.0], np.float32), "b.bias": np.array([[1.0, 2.0], [3.0, -4.0]], np.float32)},
        FP,
        encoding,
        info={"steps": 3, "metrics": {"acc": 0.5}},
    )


# ------------------------------------------------------------- an independent reader, from the spec


def spec_header(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def spec_checksum(metadata: dict[str, str], header: dict, buffer: bytes) -> str:
    """docs/delta-format.md, "Checksum", implemented from the text alone."""
    h = hashlib.sha256()
    for key in sorted((k for k in metadata if k != "checksum"), key=lambda k: k.encode()):
        h.update(key.encode() + b"\x00" + metadata[key].encode() + b"\x00")
    for name in sorted((k for k in header if k != "__metadata__"), key=lambda k: k.encode()):
        e = header[name]
        start, end = e["data_offsets"]
        h.update(name.encode() + b"\x00" + e["dtype"].encode() + b"\x00")
        h.update(json.dumps(e["shape"], separators=(",", ":")).encode() + b"\x00")
        h.update(buffer[start:end])
    return "sha256:" + h.hexdigest()


def spec_decode(data: bytes) -> dict[str, np.ndarray]:
    header, buffer = spec_header(data)
    meta = header["__metadata__"]
    assert spec_checksum(meta, header, buffer) == meta["checksum"]
    out = {}
    for name, shape in json.loads(meta["tensors"]):
        e = header[name]
        raw = buffer[e["data_offsets"][0] : e["data_offsets"][1]]
        if meta["encoding"] == "int8":
            s = header[name + "::scale"]
            (scale,) = struct.unpack("<f", buffer[s["data_offsets"][0] : s["data_offsets"][1]])
            out[name] = np.frombuffer(raw, "i1").astype(np.float32).reshape(shape) * np.float32(scale)
        else:
            out[name] = np.frombuffer(raw, "<f2" if meta["encoding"] == "fp16" else "<f4").astype(np.float32).reshape(shape)
    return out


def forge(arrays: dict[str, np.ndarray], **meta_overrides: str) -> bytes:
    """A file with a *correct* checksum but whatever content, to reach the checks behind it."""
    meta = {
        "format": "bitfit-delta",
        "format_version": "1",
        "base_fingerprint": FP,
        "encoding": "fp32",
        "created": "2025-01-01T00:00:00+00:00",
        "info": "{}",
        "tensors": json.dumps([[n, list(a.shape)] for n, a in sorted(arrays.items()) if "::" not in n]),
    }
    meta.update(meta_overrides)
    draft = st_save(arrays, metadata={**meta, "checksum": "sha256:" + "0" * 64})
    header, buffer = spec_header(draft)
    meta["checksum"] = spec_checksum(meta, header, buffer)
    return st_save(arrays, metadata=meta)


# ------------------------------------------------------------------------------- round trips


def test_fp32_round_trip_is_exact_and_matches_the_spec_reader():
    base = minilm_biases()
    trained = trained_from(base)
    delta = Delta.from_params(trained, base, FP, encoding="fp32", info={"steps": 10})
    data = encode_delta(delta)
    back = decode_delta(data)
    for name, d in delta.tensors.items():
        np.testing.assert_array_equal(back.tensors[name], d)
        np.testing.assert_array_equal(spec_decode(data)[name], d)
        np.testing.assert_allclose(back.apply_to(base)[name], trained[name], rtol=0, atol=1e-6)
    assert (back.base_fingerprint, back.encoding, back.created, back.info) == (FP, "fp32", delta.created, {"steps": 10})


def test_fp16_round_trip_error_is_within_half_precision():
    base = minilm_biases()
    trained = trained_from(base)
    delta = Delta.from_params(trained, base, FP, encoding="fp16")
    back = decode_delta(encode_delta(delta))
    for name in base:
        true = trained[name].astype(np.float64) - base[name]
        err = np.abs(back.tensors[name] - true)
        assert np.all(err <= 1e-3 * np.abs(true) + 1e-7), name
        # from_params already rounded: memory and file agree bit for bit
        np.testing.assert_array_equal(back.tensors[name], delta.tensors[name])
        np.testing.assert_array_equal(spec_decode(encode_delta(delta))[name], delta.tensors[name])


def test_int8_round_trip_error_is_at_most_half_a_scale_step():
    base = minilm_biases()
    trained = trained_from(base)
    delta = Delta.from_params(trained, base, FP, encoding="int8")
    data = encode_delta(delta)
    back = decode_delta(data)
    header, buffer = spec_header(data)
    for name in base:
        true = trained[name].astype(np.float64) - base[name]
        scale = np.abs(true).max() / 127
        s = header[name + "::scale"]
        assert s["dtype"] == "F32" and s["shape"] == []
        (stored_scale,) = struct.unpack("<f", buffer[s["data_offsets"][0] : s["data_offsets"][1]])
        assert stored_scale == pytest.approx(scale, rel=1e-6)
        assert np.abs(back.tensors[name] - true).max() <= scale / 2 * (1 + 1e-5) + 1e-9, name
        np.testing.assert_allclose(back.tensors[name], delta.tensors[name], rtol=1e-6, atol=0)
        np.testing.assert_allclose(spec_decode(data)[name], back.tensors[name], rtol=0, atol=0)


def test_int8_zero_tensor_uses_scale_one_and_empty_tensors_work():
    delta = Delta({"z": np.zeros(5), "e": np.zeros((0, 3))}, FP, "int8")
    data = encode_delta(delta)
    header, buffer = spec_header(data)
    s = header["z::scale"]
    assert struct.unpack("<f", buffer[s["data_offsets"][0] : s["data_offsets"][1]]) == (1.0,)
    back = decode_delta(data)
    assert back.tensors["z"].tolist() == [0.0] * 5 and back.tensors["e"].shape == (0, 3)


def test_int8_tiny_and_large_magnitudes_stay_bounded():
    values = np.array([1e-44, -3e-45, 0.0], np.float32)  # subnormal: peak/127 underflows
    back = decode_delta(encode_delta(Delta({"t": values}, FP, "int8")))
    assert np.all(np.isfinite(back.tensors["t"]))
    big = np.array([3e38, -3e38, 1.0], np.float32)
    back = decode_delta(encode_delta(Delta({"t": big}, FP, "int8")))
    np.testing.assert_allclose(back.tensors["t"][:2], big[:2], rtol=1e-2)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=64),
    encoding=st.sampled_from(["fp32", "fp16", "int8"]),
)
def test_round_trip_bounds_hold_for_any_values(values, encoding):
    d = np.array(values, np.float32)
    back = decode_delta(encode_delta(Delta({"t": d}, FP, encoding))).tensors["t"]
    if encoding == "fp32":
        np.testing.assert_array_equal(back, d)
    elif encoding == "fp16":
        assert np.all(np.abs(back - d) <= 1e-3 * np.abs(d) + 6e-8)
    else:
        scale = float(np.abs(d).max()) / 127 or 1.0
        assert np.all(np.abs(back.astype(np.float64) - d) <= scale / 2 * (1 + 1e-5) + 1e-30)


def test_fp16_file_for_minilm_biases_is_small():
    base = minilm_biases()
    assert len(base) == 50 and sum(a.size for a in base.values()) == 26_112
    sizes = {}
    for encoding in ("fp32", "fp16", "int8"):
        delta = Delta.from_params(trained_from(base), base, FP, encoding=encoding, info={"steps": 100})
        sizes[encoding] = (delta.nbytes, len(encode_delta(delta)))
    assert sizes["fp16"][0] == 52_224 <= 52 * 1024  # the payload: 2 bytes per value
    assert sizes["int8"][0] == 26_112 + 4 * 50
    # The JSON header (50 names twice: safetensors' index and our 'tensors' list) adds ~8 KB.
    assert sizes["fp16"][1] <= sizes["fp16"][0] + 10 * 1024
    assert sizes["int8"][1] <= sizes["int8"][0] + 14 * 1024
    print("delta sizes (payload, file):", sizes)


def test_metadata_follows_the_spec():
    data = encode_delta(small_delta("int8"))
    header, buffer = spec_header(data)
    meta = header["__metadata__"]
    assert set(meta) == {"format", "format_version", "base_fingerprint", "encoding", "created", "info", "tensors", "checksum"}
    assert (meta["format"], meta["format_version"], meta["encoding"]) == ("bitfit-delta", "1", "int8")
    assert json.loads(meta["tensors"]) == [["a.bias", [3]], ["b.bias", [2, 2]]]
    assert json.loads(meta["info"]) == {"metrics": {"acc": 0.5}, "steps": 3}
    assert meta["checksum"] == spec_checksum(meta, header, buffer)
    assert set(st_load(data)) == {"a.bias", "a.bias::scale", "b.bias", "b.bias::scale"}  # plain safetensors


def test_info_accepts_numpy_values_and_refuses_nan():
    d = Delta({"t": np.zeros(1)}, FP, info={"loss": np.float32(0.5), "hist": np.arange(3)})
    assert decode_delta(encode_delta(d)).info == {"loss": 0.5, "hist": [0, 1, 2]}
    with pytest.raises(InvalidArgumentError):
        Delta({"t": np.zeros(1)}, FP, info={"loss": float("nan")})
    with pytest.raises(InvalidArgumentError):
        Delta({"t": np.zeros(1)}, FP, info={"x": object()})


def test_unicode_and_onnx_style_names_round_trip():
    names = ["onnx::Add_123", "ℓayer.0.bias", "/encoder/Add_output_0"]
    delta = Delta({n: np.ones(2) for n in names}, FP, "int8")
    assert sorted(decode_delta(encode_delta(delta)).tensors) == sorted(names)


@pytest.mark.parametrize("name", ["", "x::scale", "__metadata__", "a\x00b", "\ud800"])
def test_reserved_or_invalid_names_are_refused(name):
    with pytest.raises(InvalidArgumentError):
        Delta({name: np.zeros(1)}, FP)


def test_bad_arguments_are_typed():
    with pytest.raises(InvalidArgumentError):
        Delta({"t": np.zeros(1)}, FP, encoding="bf16")
    with pytest.raises(InvalidArgumentError):
        Delta({"t": np.zeros(1)}, "")
    with pytest.raises(InvalidArgumentError):
        Delta({"t": np.zeros(1)}, FP, created="yesterday")
    with pytest.raises(InvalidArgumentError):
        Delta({"t": ["a", "b"]}, FP)
    with pytest.raises(InvalidArgumentError):
        encode_delta({"t": np.zeros(1)})


def test_delta_is_read_only_and_float32():
    d = Delta({"t": np.arange(3)}, FP, "fp32")
    assert d.tensors["t"].dtype == np.float32
    with pytest.raises(ValueError):
        d.tensors["t"][0] = 5


def test_zeros_like_applies_as_identity():
    base = {"a": np.array([1.0, 2.0], np.float32)}
    out = Delta.zeros_like(base, FP).apply_to(base)
    np.testing.assert_array_equal(out["a"], base["a"])


# ------------------------------------------------------------------------- from_params / fits


def test_from_params_refuses_missing_or_mis_shaped_tensors():
    base = {"a": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)}
    with pytest.raises(DeltaMismatchError, match="missing.*b"):
        Delta.from_params({"a": np.zeros(3)}, base, FP)
    with pytest.raises(DeltaMismatchError, match=r"b trained \(3,\) vs base \(2,\)"):
        Delta.from_params({"a": np.zeros(3), "b": np.zeros(3)}, base, FP)
    # extra trained tensors (e.g. frozen ones) are ignored
    d = Delta.from_params({"a": np.ones(3), "b": np.ones(2), "w": np.ones(9)}, base, FP)
    assert sorted(d.tensors) == ["a", "b"]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_from_params_refuses_non_finite(bad):
    base = {"a": np.zeros(3, np.float32)}
    with pytest.raises(TrainingDivergedError, match="a"):
        Delta.from_params({"a": np.array([0.0, bad, 1.0])}, base, FP)


def test_fp16_overflow_is_refused_with_a_hint():
    with pytest.raises(TrainingDivergedError, match="fp32"):
        Delta.from_params({"a": np.array([1e5])}, {"a": np.zeros(1, np.float32)}, FP, encoding="fp16")
    Delta.from_params({"a": np.array([1e5])}, {"a": np.zeros(1, np.float32)}, FP, encoding="fp32")


def test_check_delta_fits():
    d = small_delta()
    shapes = {"a.bias": (3,), "b.bias": (2, 2)}
    check_delta_fits(d, base_fingerprint=FP, shapes=shapes)
    with pytest.raises(DeltaMismatchError, match="trained on base .*re-personalize"):
        check_delta_fits(d, base_fingerprint="sha256:other", shapes=shapes)
    with pytest.raises(DeltaMismatchError, match=r"missing c\.bias"):
        check_delta_fits(d, base_fingerprint=FP, shapes={**shapes, "c.bias": (1,)})
    with pytest.raises(DeltaMismatchError, match=r"extra b\.bias"):
        check_delta_fits(d, base_fingerprint=FP, shapes={"a.bias": (3,)})
    with pytest.raises(DeltaMismatchError, match=r"mis-shaped a\.bias \(delta \(3,\), model \(4,\)\)"):
        check_delta_fits(d, base_fingerprint=FP, shapes={"a.bias": (4,), "b.bias": (2, 2)})
    with pytest.raises(DeltaMismatchError):
        d.apply_to({"a.bias": np.zeros(3, np.float32)})


# ------------------------------------------------------------------------------ corrupt files


def _flip(data: bytes, index: int, bit: int = 0) -> bytes:
    return data[:index] + bytes([data[index] ^ (1 << bit)]) + data[index + 1 :]


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8"])
def test_every_single_bit_flip_is_detected(encoding):
    data = encode_delta(small_delta(encoding))
    for index in range(len(data)):
        for bit in range(8):
            with pytest.raises(DeltaCorruptError):
                decode_delta(_flip(data, index, bit))


def test_every_truncation_is_detected():
    data = encode_delta(small_delta("int8"))
    for n in range(len(data)):
        with pytest.raises(DeltaCorruptError):
            decode_delta(data[:n])
    with pytest.raises(DeltaCorruptError):
        decode_delta(data + b"\x00")


def test_checksum_mismatch_names_the_cause():
    data = encode_delta(small_delta("fp32"))
    with pytest.raises(DeltaCorruptError, match="checksum mismatch"):
        decode_delta(_flip(data, len(data) - 1))


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "too short"),
        (b"\x00" * 7, "too short"),
        ((10**12).to_bytes(8, "little") + b"{}", "header claims"),
        ((2).to_bytes(8, "little") + b"[]", "not a JSON object"),
        ((4).to_bytes(8, "little") + b"\xff\xfe{}", "not valid JSON"),
        ((8).to_bytes(8, "little") + b"[" * 8, "not valid JSON"),
        (st_save({"x": np.zeros(2, np.float32)}), "no bitfit-delta metadata"),
        (st_save({"x": np.zeros(2, np.float32)}, metadata={"format": "other"}), "no bitfit-delta metadata"),
        (forge({"x": np.zeros(2, np.float32)}, format_version="2"), "format_version '2'"),
        (forge({"x": np.array([0.0, np.nan], np.float32)}), "NaN or infinite"),
        (forge({"x": np.array([np.inf], np.float16)}, encoding="fp16"), "NaN or infinite"),
        (forge({"x": np.zeros(2, np.float16)}, encoding="fp32"), "stored as F16"),
        (forge({"x": np.zeros(2, np.int8)}, encoding="int8"), r"missing x::scale"),
        (forge({"x": np.zeros(2, np.int8), "x::scale": np.zeros((), np.float32)}, encoding="int8"), "scale"),
        (forge({"x": np.zeros(2, np.int8), "x::scale": np.full((), np.nan, np.float32)}, encoding="int8"), "scale"),
        (forge({"x": np.zeros(2, np.int8), "x::scale": np.ones((2,), np.float32)}, encoding="int8"), "shape"),
        (forge({"x": np.array([-128], np.int8), "x::scale": np.ones((), np.float32)}, encoding="int8"), "-128"),
        (forge({"x": np.zeros(2, np.float32), "y": np.zeros(1, np.float32)}, tensors='[["x",[2]]]'), "unexpected y"),
        (forge({"x": np.zeros(2, np.float32)}, tensors='[["x",[3]]]'), "shape"),
        (forge({"x": np.zeros(2, np.float32)}, tensors="nope"), "not JSON"),
        (forge({"x": np.zeros(2, np.float32), "y": np.zeros(1, np.float32)}, tensors='[["y",[1]],["x",[2]]]'), "sorted"),
        (forge({"x": np.zeros(2, np.float32)}, info="[1]"), "info"),
        (forge({"x": np.zeros(2, np.float32)}, encoding="bf16"), "encoding"),
        (forge({"x": np.zeros(2, np.float32)}, created="never"), "created"),
        (forge({"x": np.zeros(2, np.float32)}, base_fingerprint=""), "base_fingerprint"),
        (forge({"x": np.zeros(2, np.float64)}), "dtype 'F64'"),
    ],
)
def test_each_corrupt_kind_raises_delta_corrupt_error(data, message):
    with pytest.raises(DeltaCorruptError, match=message):
        decode_delta(data)


def test_forged_reference_file_is_accepted():
    # The forge helper builds valid files: the cases above fail for their stated reason only.
    d = decode_delta(forge({"x": np.array([1.0, 2.0], np.float32)}))
    assert d.tensors["x"].tolist() == [1.0, 2.0]
    d = decode_delta(forge({"x": np.array([1, -2], np.int8), "x::scale": np.full((1,), 0.5, np.float32)}, encoding="int8"))
    assert d.tensors["x"].tolist() == [0.5, -1.0]  # a [1]-shaped scale is accepted too


def test_header_with_duplicate_keys_or_gaps_is_refused():
    good = encode_delta(Delta({"a": np.zeros(1), "b": np.zeros(1)}, FP, "fp32"))
    header, buffer = spec_header(good)
    text = json.dumps(header, separators=(",", ":"))
    dup = text.replace('"b":', '"a":', 1).encode()
    with pytest.raises(DeltaCorruptError):
        decode_delta(len(dup).to_bytes(8, "little") + dup + buffer)
    header["b"]["data_offsets"] = [5, 9]
    gap = json.dumps(header).encode()
    with pytest.raises(DeltaCorruptError):
        decode_delta(len(gap).to_bytes(8, "little") + gap + buffer + b"\x00")


def test_non_bytes_input_is_corrupt():
    with pytest.raises(DeltaCorruptError):
        decode_delta("not bytes")  # type: ignore[arg-type]


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_only_raise_delta_corrupt_error(data):
    with pytest.raises(DeltaCorruptError):
        decode_delta(data)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(min_size=1, max_size=512).map(lambda b: (len(b).to_bytes(8, "little") + b)))
def test_arbitrary_headers_only_raise_delta_corrupt_error(data):
    with pytest.raises(DeltaCorruptError):
        decode_delta(data)


_VALID = {e: encode_delta(small_delta(e)) for e in ("fp32", "fp16", "int8")}


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    encoding=st.sampled_from(sorted(_VALID)),
    edits=st.lists(
        st.tuples(st.sampled_from(["set", "insert", "delete", "truncate"]), st.integers(0, 10**6), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ),
)
def test_mutated_valid_files_only_raise_delta_corrupt_error(encoding, edits):
    original = _VALID[encoding]
    data = bytearray(original)
    for kind, pos, byte in edits:
        pos %= max(len(data), 1)
        if kind == "set" and data:
            data[pos] = byte
        elif kind == "insert":
            data.insert(pos, byte)
        elif kind == "delete" and data:
            del data[pos]
        elif kind == "truncate":
            del data[pos:]
    try:
        decoded = decode_delta(bytes(data))
    except DeltaCorruptError:
        return
    assert bytes(data) == original  # only an unchanged file decodes
    assert decoded.encoding == encoding


# --------------------------------------------------------------------------------- encryption


def test_encrypted_round_trip():
    delta = small_delta("fp16")
    data = encode_delta(delta, key=KEY)
    assert data.startswith(ENCRYPTED_MAGIC)
    assert b"bitfit-delta" not in data  # metadata is encrypted too
    assert encode_delta(delta, key=KEY) != data  # fresh nonce each time
    back = decode_delta(data, key=KEY)
    np.testing.assert_array_equal(back.tensors["b.bias"], delta.tensors["b.bias"])
    for size in (16, 24):
        assert decode_delta(encode_delta(delta, key=bytes(size)), key=bytes(size)).info == delta.info


def test_wrong_key_or_tampering_raises_decryption_error():
    data = encode_delta(small_delta(), key=KEY)
    with pytest.raises(DecryptionError, match="wrong key"):
        decode_delta(data, key=bytes(32))
    for index in (len(ENCRYPTED_MAGIC), len(ENCRYPTED_MAGIC) + 12, len(data) // 2, len(data) - 1):
        with pytest.raises(DecryptionError):
            decode_delta(_flip(data, index), key=KEY)
    with pytest.raises(DecryptionError, match="truncated"):
        decode_delta(data[: len(ENCRYPTED_MAGIC) + 20], key=KEY)
    with pytest.raises(DeltaCorruptError):  # the magic is the AAD: changing it is not even recognised
        decode_delta(_flip(data, 0), key=KEY)


def test_plain_file_with_key_is_refused_and_encrypted_without_key_too():
    plain = encode_delta(small_delta())
    with pytest.raises(DecryptionError, match="not encrypted"):
        decode_delta(plain, key=KEY)
    with pytest.raises(DeltaCorruptError, match="pass the key"):
        decode_delta(encode_delta(small_delta(), key=KEY))


@pytest.mark.parametrize("key", [b"short", bytes(33), "a" * 32, 123])
def test_bad_keys_are_refused(key):
    with pytest.raises(InvalidArgumentError):
        encode_delta(small_delta(), key=key)
    with pytest.raises(InvalidArgumentError):
        validate_key(key)


def test_missing_cryptography_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.ciphers.aead", None)
    with pytest.raises(MissingDependencyError, match="pip install cryptography"):
        encode_delta(small_delta(), key=KEY)
    assert isinstance(MissingDependencyError("x"), BitfitError)
    decode_delta(encode_delta(small_delta()))  # plain files need no cryptography


@settings(max_examples=EXAMPLES // 2, deadline=None)
@given(st.binary(max_size=256))
def test_arbitrary_bytes_with_a_key_only_raise_delta_corrupt_error(tail):
    with pytest.raises(DeltaCorruptError):
        decode_delta(ENCRYPTED_MAGIC + tail, key=KEY)
    with pytest.raises(DeltaCorruptError):
        decode_delta(tail, key=KEY)


# ------------------------------------------------------------------------------- files on disk


def test_save_and_load_files(tmp_path):
    path = tmp_path / "sub" / "u.delta"
    save_delta(path, small_delta("int8"), key=KEY)
    assert load_delta(path, key=KEY).encoding == "int8"
    assert [p.name for p in path.parent.iterdir()] == ["u.delta"]
    with pytest.raises(DeltaNotFoundError):
        load_delta(tmp_path / "missing.delta")
    with pytest.raises(DeltaCorruptError, match="cannot read"):
        load_delta(tmp_path)
    path.write_bytes(b"garbage")
    with pytest.raises(DeltaCorruptError, match="u.delta"):
        load_delta(path)


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "u.delta"
    save_delta(path, small_delta("fp32"))

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(StoreWriteError, match="disk is full") as info:
        save_delta(path, small_delta("int8"))
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert load_delta(path).encoding == "fp32"
    assert [p.name for p in tmp_path.iterdir()] == ["u.delta"]
