"""The delta file format: round trips, sizes, the spec's checksum, corrupt files, encryption.

Measured file sizes (format_version 2) for the MiniLM bundle's trainable set (50 tensors,
25,731 values, real names, the info dict of ``test_fp16_file_for_minilm_bundle_fits_52_kib``):
fp32 103,956 bytes, fp16 52,494 bytes, int8 27,019 bytes (payload 102,924 / 51,462 / 25,931;
the rest is the header: 1,032 / 1,032 / 1,088 bytes).
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import struct
import sys
import zlib

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
    StoreReadError,
    StoreWriteError,
    TrainingDivergedError,
)

FP = "sha256:" + "ab" * 32
EXAMPLES = 1000 if os.environ.get("BITFIT_STRESS") == "1" else 200
KEY = bytes(range(32))


def minilm_shapes() -> dict[str, int]:
    """The MiniLM bundle's trainable set: 49 encoder biases and the head (50 tensors, 25,731 values)."""
    shapes = {"encoder.embeddings.LayerNorm.bias": 384}
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
    shapes["head.bias"] = 3
    return shapes


def minilm_biases(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(0, 0.1, size=n).astype(np.float32) for name, n in minilm_shapes().items()}


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


def spec_layout(meta: dict[str, str]) -> list:
    return json.loads(zlib.decompress(base64.b64decode(meta["layout"])))


def pack_layout(layout: list) -> str:
    return base64.b64encode(zlib.compress(json.dumps(layout, separators=(",", ":")).encode(), 9)).decode()


def spec_stored(data: bytes, name: str) -> np.ndarray:
    header, buffer = spec_header(data)
    e = header[name]
    dtype = {"F32": "<f4", "F16": "<f2", "I8": "i1"}[e["dtype"]]
    return np.frombuffer(buffer[e["data_offsets"][0] : e["data_offsets"][1]], dtype).reshape(e["shape"])


def spec_decode(data: bytes) -> dict[str, np.ndarray]:
    """docs/delta-format.md, "Layout" and "Encodings", implemented from the text alone."""
    header, buffer = spec_header(data)
    meta = header["__metadata__"]
    assert spec_checksum(meta, header, buffer) == meta["checksum"]
    values = spec_stored(data, "values").astype(np.float32)
    out, offset = {}, 0
    for i, (name, shape) in enumerate(spec_layout(meta)):
        n = int(np.prod(shape))
        value = values[offset : offset + n]
        if meta["encoding"] == "int8":
            value = value * spec_stored(data, "scales")[i]
        out[name] = value.reshape(shape)
        offset += n
    return out


def forge(arrays: dict[str, np.ndarray], layout: list | str | None = None, **meta_overrides: str) -> bytes:
    """A file with a *correct* checksum but whatever content, to reach the checks behind it.

    ``arrays`` are the stored tensors (``values``, ``scales``, ...); ``layout`` defaults to
    one tensor ``x`` covering all of ``values``; a str is used as the metadata value as is.
    """
    if layout is None:
        layout = [["x", [len(arrays["values"])]]] if "values" in arrays else []
    meta = {
        "format": "bitfit-delta",
        "format_version": "2",
        "base_fingerprint": FP,
        "encoding": "fp32",
        "created": "2025-01-01T00:00:00+00:00",
        "info": "{}",
        "layout": layout if isinstance(layout, str) else pack_layout(layout),
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
    header, _ = spec_header(data)
    assert header["scales"]["dtype"] == "F32" and header["scales"]["shape"] == [50]
    scales = dict(zip(sorted(base), spec_stored(data, "scales").tolist()))
    for name in base:
        true = trained[name].astype(np.float64) - base[name]
        scale = np.abs(true).max() / 127
        assert scales[name] == pytest.approx(scale, rel=1e-6)
        assert np.abs(back.tensors[name] - true).max() <= scale / 2 * (1 + 1e-5) + 1e-9, name
        np.testing.assert_allclose(back.tensors[name], delta.tensors[name], rtol=1e-6, atol=0)
        np.testing.assert_allclose(spec_decode(data)[name], back.tensors[name], rtol=0, atol=0)


def test_int8_zero_tensor_uses_scale_one_and_empty_tensors_work():
    delta = Delta({"z": np.zeros(5), "e": np.zeros((0, 3))}, FP, "int8")
    data = encode_delta(delta)
    assert spec_stored(data, "scales").tolist() == [1.0, 1.0]  # "e" and "z", in name order
    assert spec_layout(spec_header(data)[0]["__metadata__"]) == [["e", [0, 3]], ["z", [5]]]
    back = decode_delta(data)
    assert back.tensors["z"].tolist() == [0.0] * 5 and back.tensors["e"].shape == (0, 3)


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8"])
def test_a_delta_without_tensors_round_trips(encoding):
    back = decode_delta(encode_delta(Delta({}, FP, encoding)))
    assert back.tensors == {} and back.encoding == encoding


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


MINILM_INFO = {
    "steps": 300,
    "examples": 1000,
    "holdout_examples": 200,
    "seconds": 41.873,
    "learning_rate": 0.001,
    "batch_size": 16,
    "seed": 1234,
    "stopped_by": "max_steps",
    "started_from": "base",
    "metrics": {"train_loss": 0.2412, "holdout_loss": 0.3107, "holdout_accuracy": 0.8725, "base_accuracy": 0.7925},
}


def test_fp16_file_for_minilm_bundle_fits_52_kib():
    # The product requirement: an fp16 delta FILE for the MiniLM bundle is at most 52 KiB.
    base = minilm_biases()
    assert len(base) == 50 and sum(a.size for a in base.values()) == 25_731
    sizes = {}
    for encoding in ("fp32", "fp16", "int8"):
        delta = Delta.from_params(trained_from(base), base, FP, encoding=encoding, info=MINILM_INFO)
        data = encode_delta(delta)
        sizes[encoding] = (delta.nbytes, len(data))
        assert b"encoder.layer" not in data  # the names are stored once, compressed
    print("delta sizes (payload, file):", sizes)
    assert sizes["fp16"][1] <= 52 * 1024  # 53,248 bytes; measured 52,494 (see the module docstring)
    # Payloads: 4 / 2 / 1 bytes per value; int8 adds one fp32 scale per tensor.
    assert {k: payload for k, (payload, _) in sizes.items()} == {
        "fp32": 4 * 25_731, "fp16": 2 * 25_731, "int8": 25_731 + 4 * 50}
    # The files: the measured sizes of the module docstring, within a few bytes (the header's
    # JSON holds a timestamp), and the header alone stays near 1 KB for every encoding.
    documented = {"fp32": 103_956, "fp16": 52_494, "int8": 27_019}
    assert all(abs(file - documented[k]) <= 8 for k, (_, file) in sizes.items()), (sizes, documented)
    assert all(900 <= file - payload <= 1_200 for payload, file in sizes.values()), sizes
    # fp32 and fp16 differ only in the payload: the same names and layout in the header.
    assert sizes["fp32"][1] - sizes["fp16"][1] == sizes["fp32"][0] - sizes["fp16"][0]


def test_metadata_follows_the_spec():
    data = encode_delta(small_delta("int8"))
    header, buffer = spec_header(data)
    meta = header["__metadata__"]
    assert set(meta) == {"format", "format_version", "base_fingerprint", "encoding", "created", "info", "layout", "checksum"}
    assert (meta["format"], meta["format_version"], meta["encoding"]) == ("bitfit-delta", "2", "int8")
    assert spec_layout(meta) == [["a.bias", [3]], ["b.bias", [2, 2]]]
    assert meta["layout"] == pack_layout([["a.bias", [3]], ["b.bias", [2, 2]]])  # the spec's exact recipe
    assert meta["info"] == '{"metrics":{"acc":0.5},"steps":3}'
    assert meta["checksum"] == spec_checksum(meta, header, buffer)
    stored = st_load(data)  # plain safetensors
    assert set(stored) == {"values", "scales"}
    assert stored["values"].dtype == np.int8 and stored["values"].shape == (7,)
    assert stored["scales"].dtype == np.float32 and stored["scales"].shape == (2,)
    for encoding, dtype in [("fp32", np.float32), ("fp16", np.float16)]:
        stored = st_load(encode_delta(small_delta(encoding)))
        assert set(stored) == {"values"} and stored["values"].dtype == dtype
        assert stored["values"].tolist() == [0.5, -0.25, 1.0, 1.0, 2.0, 3.0, -4.0]  # sorted names, row-major


def test_info_accepts_numpy_values_and_refuses_nan():
    d = Delta({"t": np.zeros(1)}, FP, info={"loss": np.float32(0.5), "hist": np.arange(3)})
    assert decode_delta(encode_delta(d)).info == {"loss": 0.5, "hist": [0, 1, 2]}
    with pytest.raises(InvalidArgumentError, match="info must be JSON-able without NaN or inf"):
        Delta({"t": np.zeros(1)}, FP, info={"loss": float("nan")})
    with pytest.raises(InvalidArgumentError, match="object is not JSON-able"):
        Delta({"t": np.zeros(1)}, FP, info={"x": object()})


def test_unicode_and_onnx_style_names_round_trip():
    names = ["onnx::Add_123", "ℓayer.0.bias", "/encoder/Add_output_0"]
    delta = Delta({n: np.ones(2) for n in names}, FP, "int8")
    assert sorted(decode_delta(encode_delta(delta)).tensors) == sorted(names)


@pytest.mark.parametrize("name", ["", "x::scale", "__metadata__", "a\x00b", "\ud800"])
def test_reserved_or_invalid_names_are_refused(name):
    with pytest.raises(InvalidArgumentError):
        Delta({name: np.zeros(1)}, FP)


def test_bad_arguments_are_typed_and_say_which():
    with pytest.raises(InvalidArgumentError, match="encoding must be one of .*got 'bf16'"):
        Delta({"t": np.zeros(1)}, FP, encoding="bf16")
    with pytest.raises(InvalidArgumentError, match="base_fingerprint must be a non-empty str"):
        Delta({"t": np.zeros(1)}, "")
    with pytest.raises(InvalidArgumentError, match="created must be an ISO-8601 time, got 'yesterday'"):
        Delta({"t": np.zeros(1)}, FP, created="yesterday")
    with pytest.raises(InvalidArgumentError, match="tensor 't' is not numeric"):
        Delta({"t": ["a", "b"]}, FP)
    with pytest.raises(InvalidArgumentError, match="encode_delta needs a Delta, got dict"):
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


def _packed(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


_X2 = {"values": np.zeros(2, np.float32)}
_I8 = {"values": np.zeros(2, np.int8), "scales": np.ones(1, np.float32)}


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
        # versions: the message says which versions this reader knows
        (forge(_X2, format_version="1"), r"format_version '1'; this bitfit reads format_version 2 only.*older"),
        (forge(_X2, format_version="3"), r"format_version '3'; this bitfit reads format_version 2 only.*upgrade"),
        (forge(_X2, format_version="x"), r"format_version 'x'; this bitfit reads format_version 2"),
        (forge(_X2).replace(b'"layout"', b'"layouX"'), "lacks layout"),
        # values: NaN/inf, dtype vs encoding, wrong lengths
        (forge({"values": np.array([0.0, np.nan], np.float32)}), "'x' holds NaN or infinite"),
        (forge({"values": np.array([np.inf], np.float16)}, encoding="fp16"), "NaN or infinite"),
        (forge({"values": np.zeros(2, np.float16)}), "stored as F16, but encoding 'fp32' stores F32"),
        (forge({"values": np.zeros(2, np.float32)}, encoding="fp16"), "stored as F32, but encoding 'fp16' stores F16"),
        (forge({**_I8, "values": np.zeros(2, np.float32)}, encoding="int8"), "'values' is stored as F32"),
        (forge({"values": np.zeros(2, np.int8)}, encoding="fp16"), "stored as I8"),
        (forge({"values": np.zeros(2, np.float64)}), "dtype 'F64'"),
        (forge(_X2, layout=[["x", [3]]]), r"'values' has shape \[2\], but the layout .* needs \[3\]"),
        (forge(_X2, layout=[["x", [1]], ["y", [2]]]), "needs"),
        (forge({"values": np.zeros((1, 2), np.float32)}, layout=[["x", [2]]]), "needs"),
        (forge({}, layout=[["x", [2]]]), "missing values"),
        (forge({**_X2, "y": np.zeros(1, np.float32)}), "unexpected y"),
        (forge({**_X2, "scales": np.ones(1, np.float32)}), "unexpected scales"),
        # int8 scales
        (forge({"values": np.zeros(2, np.int8)}, encoding="int8"), "missing scales"),
        (forge({**_I8, "scales": np.zeros(1, np.float32)}, encoding="int8"), "scale of 'x' is 0.0"),
        (forge({**_I8, "scales": np.full(1, np.nan, np.float32)}, encoding="int8"), "scale of 'x' is nan"),
        (forge({**_I8, "scales": np.full(1, -1, np.float32)}, encoding="int8"), "must be finite and > 0"),
        (forge({**_I8, "scales": np.ones(2, np.float32)}, encoding="int8"), r"'scales' has shape \[2\]"),
        (forge({**_I8, "scales": np.ones((), np.float32)}, encoding="int8"), r"'scales' has shape \[\]"),
        (forge({**_I8, "scales": np.ones(1, np.float16)}, encoding="int8"), "'scales' is stored as F16"),
        (forge({"values": np.array([1, -128], np.int8), "scales": np.ones(2, np.float32)},
               layout=[["a", [1]], ["b", [1]]], encoding="int8"), "'b' holds -128"),
        (forge({**_I8, "values": np.array([127, 1], np.int8), "scales": np.full(1, 3e38, np.float32)}, encoding="int8"),
         "'x' holds NaN or infinite"),  # float32(127) * 3e38 overflows
        # layout: base64, zlib, size cap, JSON, entries, order
        (forge(_X2, layout="not base64!"), "'layout' is not base64"),
        (forge(_X2, layout="eA"), "'layout' is not base64"),  # bad padding
        (forge(_X2, layout="ℓ"), "'layout' is not base64"),
        (forge(_X2, layout=_packed(b'[["x",[2]]]')), "'layout' is not zlib data"),
        (forge(_X2, layout=_packed(zlib.compress(b'[["x",[2]]]')[:-3])), "truncated zlib stream"),
        (forge(_X2, layout=_packed(zlib.compress(b'[["x",[2]]]') + b"junk")), "bytes after it"),
        (forge(_X2, layout=_packed(zlib.compress(b" " * (1024 * 1024 + 1), 9))), "inflates to more than 1048576"),
        (forge(_X2, layout=_packed(zlib.compress(b"\xff[]"))), "not UTF-8 JSON"),
        (forge(_X2, layout=_packed(zlib.compress(b"[" * 100_000))), "not UTF-8 JSON"),
        (forge(_X2, layout=_packed(zlib.compress(b'{"x":[2]}'))), "not a list"),
        (forge(_X2, layout=[["x", [2], 0]]), "malformed entry"),
        (forge(_X2, layout=[["x", [-2]]]), "malformed entry"),
        (forge(_X2, layout=[["x", [2.0]]]), "malformed entry"),
        (forge(_X2, layout=[["x", [True, 2]]]), "malformed entry"),
        (forge(_X2, layout=[["", [2]]]), "malformed entry"),
        (forge(_X2, layout=[["\ud800", [2]]]), "malformed entry"),
        (forge(_X2, layout=[[1, [2]]]), "malformed entry"),
        (forge(_X2, layout=[["y", [1]], ["x", [1]]]), "not sorted"),
        (forge(_X2, layout=[["x", [1]], ["x", [1]]]), "duplicates"),
        (forge(_X2, layout=[["x::scale", [2]]]), "reserved"),
        # other metadata
        (forge(_X2, info="[1]"), "info"),
        (forge(_X2, encoding="bf16"), "encoding"),
        (forge(_X2, created="never"), "created"),
        (forge(_X2, base_fingerprint=""), "base_fingerprint"),
    ],
)
def test_each_corrupt_kind_raises_delta_corrupt_error(data, message):
    with pytest.raises(DeltaCorruptError, match=message):
        decode_delta(data)


def test_a_version_1_file_is_refused_with_what_to_do():
    # Version 1 stored one safetensors entry per tensor and listed them in metadata 'tensors'.
    meta = {
        "format": "bitfit-delta",
        "format_version": "1",
        "base_fingerprint": FP,
        "encoding": "int8",
        "created": "2025-01-01T12:00:00.000+00:00",
        "info": '{"steps":3}',
        "tensors": '[["classifier.bias",[3]]]',
        "checksum": "sha256:77174fea2fd12179391de2bff9ec51e594be16d6242cbe01450c99e1c10b138c",
    }
    arrays = {"classifier.bias": np.array([64, -127, 32], np.int8), "classifier.bias::scale": np.float32(1 / 127)}
    expected = "format_version '1'; this bitfit reads format_version 2 only.*personalize again"
    with pytest.raises(DeltaCorruptError, match=expected):
        decode_delta(st_save({n: np.asarray(a) for n, a in arrays.items()}, metadata=meta))


def test_forged_reference_file_is_accepted():
    # The forge helper builds valid files: the cases above fail for their stated reason only.
    d = decode_delta(forge({"values": np.array([1.0, 2.0], np.float32)}))
    assert d.tensors["x"].tolist() == [1.0, 2.0]
    d = decode_delta(forge({"values": np.array([1, -2], np.int8), "scales": np.full(1, 0.5, np.float32)}, encoding="int8"))
    assert d.tensors["x"].tolist() == [0.5, -1.0]
    d = decode_delta(
        forge(
            {"values": np.array([1, -2, 3, 4, 127], np.int8), "scales": np.array([0.5, 2.0, 1.0], np.float32)},
            layout=[["a", [2, 1]], ["b", [0]], ["c", [3]]],
            encoding="int8",
        )
    )
    assert {n: t.tolist() for n, t in d.tensors.items()} == {"a": [[0.5], [-1.0]], "b": [], "c": [3.0, 4.0, 127.0]}
    # a layout inflating to exactly the cap is read (and then judged on its content)
    at_cap = b'[["x",[2]]' + b" " * (1024 * 1024 - 12) + b"]"
    assert decode_delta(forge(_X2, layout=_packed(zlib.compress(at_cap, 9)))).tensors["x"].tolist() == [0.0, 0.0]


def _set(entry: str, key: str, value):
    def edit(header: dict, buffer: bytes) -> bytes:
        header[entry][key] = value
        return buffer
    return edit


_FRAMING = "the header's shapes and data_offsets do not describe the file's tensor data"


@pytest.mark.parametrize(
    "edit, message",
    [
        # checked by safetensors' reader (the error names what it found)
        (lambda header, buffer: _set("values", "data_offsets", [9, 11])(header, buffer) + b"\x00",  # a gap at 8
         _FRAMING + r" \(invalid offset for tensor `values`\)"),
        (_set("values", "data_offsets", [7, 9]), _FRAMING + r" \(invalid offset"),  # overlaps scales [0, 8]
        (_set("values", "data_offsets", [10, 8]), _FRAMING + r" \(invalid offset"),  # end before start
        (_set("values", "shape", [3]), _FRAMING + r" \(invalid shape, data type, or offset"),  # 2 bytes for 3 values
        (_set("values", "data_offsets", [8, 10, 10]), _FRAMING + r" \(invalid JSON in header: invalid length 3"),
        (_set("values", "shape", [-2]), _FRAMING + r" \(invalid JSON in header: invalid value: integer `-2`"),
        (lambda header, buffer: buffer + b"\x00", _FRAMING + r" \(incomplete metadata, file not fully covered\)"),
        (lambda header, buffer: buffer[:-1], _FRAMING + r" \(incomplete metadata, file not fully covered\)"),
        # accepted by safetensors, refused by docs/delta-format.md section 1
        (_set("values", "extra", 1), "tensor 'values' has a malformed header entry"),
        (_set("values", "dtype", "F64"), "tensor 'values' has dtype 'F64'; a delta stores only F32, F16 or I8"),
        (lambda header, buffer: header.update({"": header.pop("values")}) or buffer, "a tensor name is empty"),
    ],
)
def test_a_header_that_does_not_frame_its_data_is_refused(edit, message):
    good = encode_delta(Delta({"a": np.ones(1), "b": np.ones(1)}, FP, "int8"))  # scales [0, 8], values [8, 10]
    header, buffer = spec_header(good)
    assert header["values"]["data_offsets"] == [8, 10] and header["scales"]["data_offsets"] == [0, 8]
    buffer = edit(header, buffer)
    text = json.dumps(header).encode()
    with pytest.raises(DeltaCorruptError, match=message):
        decode_delta(len(text).to_bytes(8, "little") + text + buffer)


def test_a_header_with_a_repeated_key_is_refused():
    """JSON readers keep the last of two equal keys (safetensors' does): the spec refuses the file."""
    good = encode_delta(Delta({"a": np.zeros(1), "b": np.zeros(1)}, FP, "int8"))
    header, buffer = spec_header(good)
    dup = json.dumps(header, separators=(",", ":")).replace('"scales":', '"values":', 1).encode()
    with pytest.raises(DeltaCorruptError, match="not valid JSON .*duplicate key"):
        decode_delta(len(dup).to_bytes(8, "little") + dup + buffer)


def test_non_bytes_input_is_corrupt():
    with pytest.raises(DeltaCorruptError, match="content must be bytes, got str"):
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


@settings(max_examples=EXAMPLES, deadline=None)
@given(layout=st.one_of(st.text(max_size=64), st.binary(max_size=64).map(lambda b: _packed(zlib.compress(b)))))
def test_arbitrary_layouts_only_raise_delta_corrupt_error(layout):
    with pytest.raises(DeltaCorruptError):
        decode_delta(forge(_X2, layout=layout))


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    layout=st.lists(st.tuples(st.text(max_size=6), st.lists(st.integers(-2, 3), max_size=3)), max_size=4),
    n_values=st.integers(0, 8),
    encoding=st.sampled_from(["fp32", "fp16", "int8"]),
    n_scales=st.integers(0, 4),
)
def test_forged_layouts_decode_or_raise_delta_corrupt_error(layout, n_values, encoding, n_scales):
    dtype = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}[encoding]
    arrays = {"values": np.ones(n_values, dtype)}
    if encoding == "int8":
        arrays["scales"] = np.ones(n_scales, np.float32)
    try:
        d = decode_delta(forge(arrays, layout=[[n, s] for n, s in layout], encoding=encoding))
    except DeltaCorruptError:
        return
    assert [[n, list(t.shape)] for n, t in d.tensors.items()] == [[n, s] for n, s in layout]
    assert sum(t.size for t in d.tensors.values()) == n_values


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


@pytest.mark.parametrize("key, match", [
    (b"short", "must be 16, 24 or 32 bytes .*got 5"), (bytes(33), "got 33"),
    ("a" * 32, "key must be bytes .*got str"), (123, "key must be bytes .*got int"),
])
def test_bad_keys_are_refused(key, match):
    with pytest.raises(InvalidArgumentError, match=match):
        encode_delta(small_delta(), key=key)
    with pytest.raises(InvalidArgumentError, match=match):
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
    with pytest.raises(StoreReadError, match=f"could not read {tmp_path}: Is a directory"):  # unreadable, not damaged
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
