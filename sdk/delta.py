"""The delta file: one user's trained tensors, stored as differences from the base.

A delta is what personalization produces and what the predictor applies: for each
trainable tensor, ``trained - base``, encoded as fp32, fp16 or int8. The file is a
safetensors file with one flat ``values`` tensor (all differences, in name order), a
``scales`` tensor for int8, and metadata that lists the tensors' names and shapes once
(compressed), ties the delta to one base model (its fingerprint) and carries a
checksum. ``docs/delta-format.md`` is the spec (format_version 2); this module is the
format's only reader and writer.

Example:
    >>> import numpy as np
    >>> from bitfit.sdk.delta import Delta, decode_delta, encode_delta
    >>> base = {"classifier.bias": np.zeros(3, np.float32)}
    >>> trained = {"classifier.bias": np.array([0.5, -0.25, 0.0], np.float32)}
    >>> delta = Delta.from_params(trained, base, base_fingerprint="sha256:00")
    >>> decode_delta(encode_delta(delta)).apply_to(base)["classifier.bias"].tolist()
    [0.5, -0.25, 0.0]
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
import itertools
import json
import math
import os
import re
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Mapping, get_args

import numpy as np

from .atomic_files import read_error, write_file_atomic
from .errors import (
    DecryptionError,
    DeltaCorruptError,
    DeltaMismatchError,
    DeltaNotFoundError,
    InvalidArgumentError,
    MissingDependencyError,
    TrainingDivergedError,
)

Encoding = Literal["fp32", "fp16", "int8"]

FORMAT = "bitfit-delta"
FORMAT_VERSION = "2"
READABLE_VERSIONS = (FORMAT_VERSION,)
# Not a storage key since version 2; still reserved so a delta can always be written out
# as a per-tensor safetensors file (name, name::scale) by tools that want one.
SCALE_SUFFIX = "::scale"
VALUES = "values"
SCALES = "scales"
# The layout of a bias set is a few KB of JSON (a 7B model: ~100 KB); the cap stops a
# small compressed string from inflating into gigabytes (a zip bomb).
MAX_LAYOUT_BYTES = 1024 * 1024
ENCRYPTED_MAGIC = b"BFDELTA-AESGCM1\n"
# Far above any bias-only delta (a 7B model has a few MB of biases); it only stops a
# stray huge file from being read into memory whole.
MAX_DELTA_BYTES = 256 * 1024 * 1024

_NONCE_BYTES = 12
_TAG_BYTES = 16
_KEY_SIZES = (16, 24, 32)
_FP16_MAX = float(np.finfo(np.float16).max)
_STORED_DTYPE: dict[str, str] = {"fp32": "F32", "fp16": "F16", "int8": "I8"}
_NUMPY_DTYPE: dict[str, np.dtype] = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "I8": np.dtype("i1")}
_STORED_DTYPE_OF_ARRAY = {"<f4": "F32", "<f2": "F16", "|i1": "I8"}
_METADATA_KEYS = ("format", "format_version", "base_fingerprint", "encoding", "created", "info", "layout", "checksum")
_CHECKSUM_RE = re.compile(r"sha256:[0-9a-f]{64}")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True, eq=False)
class Delta:
    """One user's trained tensors as float32 differences from the base model.

    Fields:
        tensors: name -> ``trained - base`` (float32, read-only copies, sorted by name).
        base_fingerprint: the fingerprint of the base weights the delta was trained on.
        encoding: how the file stores the values: "fp32", "fp16" (default) or "int8".
        created: ISO-8601 UTC time of creation.
        info: free JSON-able facts (steps, examples, metrics, seconds, ...). numpy
            scalars and arrays are converted; NaN and inf are refused (not JSON).

    Construction validates everything (names, finiteness, fp16 range, JSON-ability) so a
    ``Delta`` in hand can always be encoded.

    Example:
        >>> import numpy as np
        >>> d = Delta({"b": np.array([1.0, 2.0])}, base_fingerprint="sha256:00", encoding="fp32")
        >>> d.tensors["b"].dtype, d.nbytes
        (dtype('float32'), 8)
    """

    tensors: dict[str, np.ndarray]
    base_fingerprint: str
    encoding: Encoding = "fp16"
    created: str = field(default_factory=_now)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.encoding not in get_args(Encoding):
            raise InvalidArgumentError(f"encoding must be one of {get_args(Encoding)}, got {self.encoding!r}")
        if not isinstance(self.base_fingerprint, str) or not self.base_fingerprint or "\0" in self.base_fingerprint:
            raise InvalidArgumentError(
                "base_fingerprint must be a non-empty str (the bundle's manifest has it), "
                f"got {self.base_fingerprint!r}"
            )
        _check_created(self.created)
        object.__setattr__(self, "info", _normalize_info(self.info))
        object.__setattr__(self, "tensors", _normalize_tensors(self.tensors, self.encoding))

    @classmethod
    def from_params(
        cls,
        trained: Mapping[str, np.ndarray],
        base: Mapping[str, np.ndarray],
        base_fingerprint: str,
        encoding: Encoding = "fp16",
        info: Mapping[str, Any] | None = None,
    ) -> "Delta":
        """Build the delta ``trained - base`` for every tensor name in ``base``.

        The differences are rounded through ``encoding`` right away, so the delta in
        memory holds exactly the values a reader of the saved file gets back (the
        predictor then behaves the same before and after a save).

        Args:
            trained: the tensors after training; names not in ``base`` are ignored.
            base: the trainable tensors of the base model (name -> array).
            base_fingerprint: the bundle's base fingerprint.
            encoding: "fp32", "fp16" or "int8".
            info: free JSON-able facts about the run.

        Returns:
            The ``Delta``.

        Raises:
            DeltaMismatchError: a base tensor is missing from ``trained`` or has another shape.
            TrainingDivergedError: a trained value (or a difference) is NaN or infinite.

        Example:
            >>> import numpy as np
            >>> base = {"b": np.array([1.0, 1.0], np.float32)}
            >>> d = Delta.from_params({"b": np.array([1.5, 0.0])}, base, "sha256:00", encoding="fp32")
            >>> d.tensors["b"].tolist()
            [0.5, -1.0]
        """
        missing = sorted(set(base) - set(trained))
        shapes = {
            name: (tuple(np.shape(trained[name])), tuple(np.shape(base[name])))
            for name in base
            if name in trained and np.shape(trained[name]) != np.shape(base[name])
        }
        if missing or shapes:
            parts = []
            if missing:
                parts.append(f"missing from the trained tensors: {_names(missing)}")
            if shapes:
                parts.append(
                    "shapes differ: "
                    + ", ".join(f"{n} trained {t} vs base {b}" for n, (t, b) in sorted(shapes.items()))
                )
            raise DeltaMismatchError(
                "cannot build a delta: " + "; ".join(parts) + ". Pass the trainable tensors of the same bundle."
            )
        diffs: dict[str, np.ndarray] = {}
        diverged: list[str] = []
        for name in sorted(base):
            with np.errstate(all="ignore"):
                t = np.asarray(trained[name], dtype=np.float64)
                d = (t - np.asarray(base[name], dtype=np.float64)).astype(np.float32)
            if not (np.isfinite(t).all() and np.isfinite(d).all()):
                diverged.append(name)
            diffs[name] = d
        if diverged:
            raise TrainingDivergedError(
                f"training produced NaN or infinite values in {_names(diverged)}; no delta was made and the "
                "previous one is kept. Lower the learning rate or the number of steps and personalize again."
            )
        encoding_ok = encoding if encoding in get_args(Encoding) else "fp32"  # __post_init__ reports a bad one
        for name, d in diffs.items():
            _check_fp16_range(name, d, encoding_ok)  # before rounding turns it into inf
        rounded = {name: _round_trip(d, encoding_ok) for name, d in diffs.items()}
        return cls(rounded, base_fingerprint, encoding, info=dict(info or {}))

    @classmethod
    def zeros_like(
        cls, base: Mapping[str, np.ndarray], base_fingerprint: str, encoding: Encoding = "fp16"
    ) -> "Delta":
        """A delta that changes nothing: zeros shaped like ``base``.

        Example:
            >>> import numpy as np
            >>> Delta.zeros_like({"b": np.ones(2, np.float32)}, "sha256:00").tensors["b"].tolist()
            [0.0, 0.0]
        """
        return cls({n: np.zeros(np.shape(a), np.float32) for n, a in base.items()}, base_fingerprint, encoding)

    def apply_to(self, base: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Return ``base + delta`` as float32; base tensors the delta does not touch pass through.

        Raises:
            DeltaMismatchError: a delta tensor is not in ``base`` or has another shape.

        Example:
            >>> import numpy as np
            >>> d = Delta({"b": np.array([0.5, 0.5])}, "sha256:00", encoding="fp32")
            >>> d.apply_to({"b": np.array([1.0, 2.0], np.float32)})["b"].tolist()
            [1.5, 2.5]
        """
        check_delta_fits(
            self,
            base_fingerprint=self.base_fingerprint,
            shapes={n: tuple(np.shape(base[n])) for n in base},
            allow_subset=True,
        )
        out = {name: np.asarray(value, dtype=np.float32) for name, value in base.items()}
        for name, d in self.tensors.items():
            out[name] = out[name] + d
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in the file (the payload, without the header).

        Example:
            >>> import numpy as np
            >>> Delta({"b": np.zeros(10)}, "sha256:00", encoding="int8").nbytes  # 10 int8 + 1 float32 scale
            14
        """
        per_value = {"fp32": 4, "fp16": 2, "int8": 1}[self.encoding]
        scales = 4 * len(self.tensors) if self.encoding == "int8" else 0
        return sum(int(a.size) for a in self.tensors.values()) * per_value + scales


def encode_delta(delta: Delta, *, key: bytes | None = None, context: bytes = b"") -> bytes:
    """Encode a delta as the bytes of a delta file (encrypted with AES-256-GCM if ``key``).

    Args:
        delta: the delta.
        key: 16, 24 or 32 bytes to encrypt at rest (needs the ``cryptography`` package).
        context: with a key, bytes the file is bound to (authenticated, not stored): the
            store passes the user's directory and version, so a valid file copied to another
            user or version fails to decrypt. Decode with the same context.

    Returns:
        The file's bytes.

    Raises:
        InvalidArgumentError: ``delta`` is not a ``Delta`` or the key has a wrong size.
        MissingDependencyError: a key was given and ``cryptography`` is not installed.

    Example:
        >>> import numpy as np
        >>> data = encode_delta(Delta({"b": np.zeros(4)}, "sha256:00"))
        >>> decode_delta(data).tensors["b"].shape
        (4,)
    """
    if not isinstance(delta, Delta):
        raise InvalidArgumentError(f"encode_delta needs a Delta, got {type(delta).__name__}")
    if key is not None:
        key = validate_key(key)
    from safetensors.numpy import save

    stored = _payload(delta)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_fingerprint": delta.base_fingerprint,
        "encoding": delta.encoding,
        "created": delta.created,
        "info": _dump_json(delta.info),
        "layout": _encode_layout([(name, a.shape) for name, a in delta.tensors.items()]),
    }
    metadata["checksum"] = _checksum(
        metadata, [(name, _STORED_DTYPE_OF_ARRAY[a.dtype.str], a.shape, a.tobytes()) for name, a in stored.items()]
    )
    plain = save(stored, metadata=metadata)
    return plain if key is None else _encrypt(plain, key, context)


def decode_delta(data: bytes, *, key: bytes | None = None, context: bytes = b"") -> Delta:
    """Decode and verify the bytes of a delta file.

    Every defect of the bytes (truncated, altered, not a delta, unsupported version,
    checksum mismatch, bad layout, NaN, missing scales, ...) raises
    ``DeltaCorruptError``; nothing else escapes for bad input.

    Args:
        data: the file's bytes.
        key: the key the file was encrypted with, or None for a plain file.

    Returns:
        The ``Delta``.

    Raises:
        DeltaCorruptError: the bytes are not a valid delta file.
        DecryptionError: (a DeltaCorruptError) wrong key, altered ciphertext, an encrypted
            file without a key, or a plain file when a key was given.
        InvalidArgumentError: the key has a wrong size.
        MissingDependencyError: a key was given and ``cryptography`` is not installed.

    Example:
        >>> import numpy as np
        >>> d = Delta({"b": np.array([0.25])}, "sha256:00", encoding="int8", info={"steps": 3})
        >>> back = decode_delta(encode_delta(d))
        >>> back.tensors["b"].tolist(), back.encoding, back.info
        ([0.25], 'int8', {'steps': 3})
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DeltaCorruptError(f"a delta file's content must be bytes, got {type(data).__name__}")
    data = bytes(data)
    encrypted = data.startswith(ENCRYPTED_MAGIC)
    if key is not None:
        key = validate_key(key)
        if not encrypted:
            # Accepting it would let anyone who can write the store swap in a plain file.
            raise DecryptionError(
                "the delta file is not encrypted but a key was given; refusing it, since an unencrypted file "
                "may have been swapped in. Delete it and personalize again."
            )
        data = _decrypt(data, key, context)
    elif encrypted:
        raise DecryptionError("the delta file is encrypted: pass the key it was saved with (key=...)")
    return _decode_plain(data)


def save_delta(path: str | os.PathLike, delta: Delta, *, key: bytes | None = None, context: bytes = b"") -> None:
    """Write a delta file atomically: the file at ``path`` is either the old one or the new one.

    Raises:
        StoreWriteError: the file could not be written (disk full, read-only, ...); any
            previous file at ``path`` is intact and no temporary file is left.

    Example:
        >>> import numpy as np, tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "u.delta"
        >>> save_delta(p, Delta({"b": np.zeros(2)}, "sha256:00"))
        >>> load_delta(p).base_fingerprint
        'sha256:00'
    """
    write_file_atomic(path, encode_delta(delta, key=key, context=context))


def load_delta(path: str | os.PathLike, *, key: bytes | None = None, context: bytes = b"") -> Delta:
    """Read, verify and decode a delta file.

    Raises:
        DeltaNotFoundError: there is no file at ``path``.
        StoreReadError: the file exists but cannot be read (permissions, a directory, I/O).
        DeltaCorruptError: the file is not a valid delta (the message starts with the path).

    Example:
        >>> import numpy as np, tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "u.delta"
        >>> save_delta(p, Delta({"b": np.ones(2)}, "sha256:00", encoding="fp32"))
        >>> load_delta(p).tensors["b"].tolist()
        [1.0, 1.0]
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_DELTA_BYTES + 1)
    except FileNotFoundError as err:
        raise DeltaNotFoundError(f"no delta file at {path}") from err
    except OSError as err:  # exists but unreadable: not damaged, and not missing
        raise read_error(path, err) from err
    if len(data) > MAX_DELTA_BYTES:
        raise DeltaCorruptError(f"{path}: larger than {MAX_DELTA_BYTES} bytes, not a bias delta")
    try:
        return decode_delta(data, key=key, context=context)
    except DeltaCorruptError as err:
        raise type(err)(f"{path}: {err}") from err


def check_delta_fits(
    delta: Delta,
    *,
    base_fingerprint: str,
    shapes: Mapping[str, tuple[int, ...]],
    allow_subset: bool = False,
) -> None:
    """Check that a delta belongs to this base model and has its trainable tensors.

    Args:
        delta: the delta.
        base_fingerprint: the fingerprint of the base the delta will be applied to.
        shapes: name -> shape of that base's trainable tensors.
        allow_subset: accept a delta that covers only some of ``shapes``.

    Raises:
        DeltaMismatchError: the fingerprint differs, or tensors are missing, extra or
            mis-shaped; the message names them.

    Example:
        >>> import numpy as np
        >>> d = Delta({"b": np.zeros(2)}, "sha256:00")
        >>> check_delta_fits(d, base_fingerprint="sha256:00", shapes={"b": (2,)})
        >>> try:
        ...     check_delta_fits(d, base_fingerprint="sha256:00", shapes={"b": (3,)})
        ... except DeltaMismatchError as err:
        ...     print(str(err).split(";")[0])
        the delta does not fit this model: mis-shaped b (delta (2,), model (3,))
    """
    problems: list[str] = []
    if delta.base_fingerprint != base_fingerprint:
        problems.append(f"it was trained on base {delta.base_fingerprint}, this model is {base_fingerprint}")
    names, wanted = set(delta.tensors), set(shapes)
    missing = [] if allow_subset else sorted(wanted - names)
    extra = sorted(names - wanted)
    wrong = [
        f"{n} (delta {tuple(delta.tensors[n].shape)}, model {tuple(shapes[n])})"
        for n in sorted(names & wanted)
        if tuple(delta.tensors[n].shape) != tuple(shapes[n])
    ]
    if wrong:
        problems.append("mis-shaped " + ", ".join(wrong))
    if missing:
        problems.append(f"missing {_names(missing)}")
    if extra:
        problems.append(f"extra {_names(extra)}")
    if problems:
        raise DeltaMismatchError(
            "the delta does not fit this model: " + "; ".join(problems)
            + "; a delta only works with the bundle it was trained on: re-personalize with this bundle"
        )


def validate_key(key: Any) -> bytes:
    """Return ``key`` as bytes if it is a valid AES key (16, 24 or 32 bytes).

    Raises:
        InvalidArgumentError: it is not bytes or has another length.

    Example:
        >>> len(validate_key(bytes(32)))
        32
    """
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise InvalidArgumentError(
            f"key must be bytes (16, 24 or 32 of them, e.g. os.urandom(32)), got {type(key).__name__}"
        )
    key = bytes(key)
    if len(key) not in _KEY_SIZES:
        raise InvalidArgumentError(
            f"key must be 16, 24 or 32 bytes (AES-128/192/256), got {len(key)}; use os.urandom(32)"
        )
    return key


# ---------------------------------------------------------------- private helpers


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _utf8(text: str) -> bytes:
    return text.encode("utf-8")


def _dump_json(value: Any) -> str:
    # ASCII-only, so metadata never carries a lone surrogate that UTF-8 cannot encode.
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _check_created(created: Any) -> None:
    if not isinstance(created, str):
        raise InvalidArgumentError(f"created must be an ISO-8601 str, got {type(created).__name__}")
    try:
        # Python < 3.11 does not read the "Z" suffix other writers may use.
        datetime.fromisoformat(created[:-1] + "+00:00" if created.endswith("Z") else created)
    except ValueError as err:
        raise InvalidArgumentError(f"created must be an ISO-8601 time, got {created!r}") from err


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-able")


def _normalize_info(info: Any) -> dict[str, Any]:
    if not isinstance(info, Mapping):
        raise InvalidArgumentError(f"info must be a dict, got {type(info).__name__}")
    try:
        # Through JSON and back, so the in-memory info equals what a reader gets.
        return json.loads(json.dumps(dict(info), default=_json_default, allow_nan=False))
    except (TypeError, ValueError, RecursionError) as err:
        raise InvalidArgumentError(f"info must be JSON-able without NaN or inf: {err}") from err


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"tensor names must be non-empty str, got {name!r}")
    if "\0" in name or name == "__metadata__" or name.endswith(SCALE_SUFFIX):
        raise InvalidArgumentError(
            f"tensor name {name!r} is reserved by the delta format (NUL, '__metadata__' or a '{SCALE_SUFFIX}' suffix)"
        )
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidArgumentError(f"tensor name {name!r} is not valid unicode (lone surrogate)") from err


def _normalize_tensors(tensors: Any, encoding: str) -> dict[str, np.ndarray]:
    if not isinstance(tensors, Mapping):
        raise InvalidArgumentError(f"tensors must be a dict of name -> array, got {type(tensors).__name__}")
    out: dict[str, np.ndarray] = {}
    bad: list[str] = []
    for name in tensors:
        _check_name(name)
    for name in sorted(tensors, key=_utf8):
        try:
            with np.errstate(all="ignore"):
                array = np.array(tensors[name], dtype=np.float32, copy=True, order="C")
        except (TypeError, ValueError) as err:
            raise InvalidArgumentError(f"tensor {name!r} is not numeric: {err}") from err
        if not np.isfinite(array).all():
            bad.append(name)
        else:
            _check_fp16_range(name, array, encoding)
        array.flags.writeable = False
        out[name] = array
    if bad:
        raise TrainingDivergedError(f"the delta has NaN or infinite values in {_names(bad)}; it was not saved")
    return out


def _check_fp16_range(name: str, array: np.ndarray, encoding: str) -> None:
    if encoding == "fp16" and array.size and float(np.max(np.abs(array))) > _FP16_MAX:
        raise TrainingDivergedError(
            f"tensor {name!r} has differences beyond the fp16 range ({_FP16_MAX:g}); "
            "that usually means training diverged. Use encoding='fp32' if it is intended."
        )


def _int8_quantize(d: np.ndarray) -> tuple[np.ndarray, np.float32]:
    peak = float(np.max(np.abs(d))) if d.size else 0.0
    if peak == 0.0:
        scale = np.float32(1.0)  # any positive scale decodes zeros; 1.0 is the spec's choice
    else:
        # max(): peak/127 underflows to 0 for subnormal peaks; clipping below keeps q in range.
        scale = np.float32(max(peak / 127.0, float(np.finfo(np.float32).smallest_subnormal)))
    with np.errstate(all="ignore"):
        q = np.clip(np.rint(d / scale), -127, 127).astype(np.int8)
    return q, scale


def _int8_dequantize(q: np.ndarray, scale: np.float32) -> np.ndarray:
    return q.astype(np.float32) * np.float32(scale)


def _round_trip(d: np.ndarray, encoding: str) -> np.ndarray:
    if encoding == "fp16":
        with np.errstate(all="ignore"):
            return d.astype(np.float16).astype(np.float32)
    if encoding == "int8":
        return _int8_dequantize(*_int8_quantize(d))
    return d


def _payload(delta: Delta) -> dict[str, np.ndarray]:
    """The stored tensors: every difference in one flat ``values``, plus int8's ``scales``."""
    flat = [d.ravel() for d in delta.tensors.values()]
    if delta.encoding == "int8":
        quantized = [_int8_quantize(d) for d in flat]
        return {
            VALUES: np.concatenate([q for q, _ in quantized] or [np.zeros(0, np.int8)]),
            SCALES: np.array([scale for _, scale in quantized], dtype="<f4"),
        }
    dtype = "<f4" if delta.encoding == "fp32" else "<f2"
    with np.errstate(all="ignore"):  # the fp16 range was checked when the Delta was built
        return {VALUES: np.concatenate(flat or [np.zeros(0, np.float32)]).astype(dtype)}


def _encode_layout(layout: list[tuple[str, tuple[int, ...]]]) -> str:
    # Compressed because the names are most of the header: the 50 MiniLM names are 2,517
    # bytes of JSON and 328 of base64 once deflated (they share long prefixes).
    text = json.dumps([[name, [int(n) for n in shape]] for name, shape in layout], separators=(",", ":"))
    return base64.b64encode(zlib.compress(text.encode("ascii"), 9)).decode("ascii")


def _checksum(metadata: Mapping[str, str], tensors: list[tuple[str, str, tuple[int, ...], bytes]]) -> str:
    """sha256 over the metadata and the stored tensors, exactly as docs/delta-format.md defines it."""
    h = hashlib.sha256()
    for key in sorted((k for k in metadata if k != "checksum"), key=_utf8):
        h.update(_utf8(key) + b"\0" + _utf8(metadata[key]) + b"\0")
    for name, dtype, shape, raw in sorted(tensors, key=lambda t: _utf8(t[0])):
        h.update(_utf8(name) + b"\0" + dtype.encode("ascii") + b"\0")
        h.update(json.dumps([int(s) for s in shape], separators=(",", ":")).encode("ascii") + b"\0")
        h.update(raw)
    return "sha256:" + h.hexdigest()


def _aesgcm(key: bytes) -> Any:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError as err:
        raise MissingDependencyError(
            "encrypted deltas need the 'cryptography' package: pip install cryptography "
            "(or pip install 'bitfit[crypto]')"
        ) from err
    return AESGCM(key)


def _encrypt(plain: bytes, key: bytes, context: bytes = b"") -> bytes:
    nonce = os.urandom(_NONCE_BYTES)
    return ENCRYPTED_MAGIC + nonce + _aesgcm(key).encrypt(nonce, plain, ENCRYPTED_MAGIC + bytes(context))


def _decrypt(data: bytes, key: bytes, context: bytes = b"") -> bytes:
    aes = _aesgcm(key)
    start = len(ENCRYPTED_MAGIC)
    if len(data) < start + _NONCE_BYTES + _TAG_BYTES:
        raise DecryptionError(f"the encrypted delta is truncated ({len(data)} bytes)")
    nonce, ciphertext = data[start : start + _NONCE_BYTES], data[start + _NONCE_BYTES :]
    try:
        return aes.decrypt(nonce, ciphertext, ENCRYPTED_MAGIC + bytes(context))
    except Exception as err:  # cryptography raises InvalidTag; anything else is as bad
        raise DecryptionError(
            "the encrypted delta could not be authenticated: wrong key, the file was altered, or it was "
            "copied from another user or version"
        ) from err


def _corrupt(why: str) -> DeltaCorruptError:
    return DeltaCorruptError(f"{why}; the delta cannot be used: delete it and personalize again")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in JSON object")
    return out


def _is_text(value: Any) -> bool:
    """A str a non-Python reader sees the same way: valid UTF-8 (no lone surrogate), no NUL."""
    if not isinstance(value, str) or "\0" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_int(x: Any) -> bool:
    return type(x) is int and x >= 0


def _parse_header(data: bytes) -> tuple[dict[str, str], dict[str, tuple[str, tuple[int, ...], bytes]]]:
    """The metadata and the stored tensors (name -> (dtype, shape, raw bytes)) of a delta file.

    The header is read here, since safetensors' own reader does not return the metadata,
    and checked for what docs/delta-format.md refuses but safetensors accepts: repeated
    keys, entry keys beyond dtype/shape/data_offsets, dtypes other than F32/F16/I8, empty or
    NUL names. safetensors then checks the rest of the framing: shapes and offsets are
    non-negative integers, each byte range matches its shape, and the ranges tile the data
    buffer (no gap, no overlap, no trailing byte).
    """
    from safetensors import SafetensorError, deserialize

    if len(data) < 8:
        raise _corrupt(f"the file is {len(data)} bytes, too short for a safetensors header (truncated or empty)")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise _corrupt(
            f"the header claims {n} bytes but the file has {len(data) - 8} after the length (truncated or not a delta)"
        )
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise _corrupt(f"the safetensors header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise _corrupt("the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise _corrupt("the file has no bitfit-delta metadata (it may be another safetensors file)")
    if not all(_is_text(k) and _is_text(v) for k, v in metadata.items()):
        raise _corrupt("the metadata has non-string values, NUL characters or invalid unicode")
    for name, entry in header.items():
        if not name or not _is_text(name):
            raise _corrupt("a tensor name is empty, contains NUL or is invalid unicode")
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _corrupt(f"tensor {name!r} has a malformed header entry")
        if entry["dtype"] not in _NUMPY_DTYPE:
            raise _corrupt(f"tensor {name!r} has dtype {entry['dtype']!r}; a delta stores only F32, F16 or I8")
    try:
        raw = {name: bytes(info["data"]) for name, info in deserialize(data)}
    except SafetensorError as err:
        detail = str(err).removeprefix("Error while deserializing: ")
        raise _corrupt(
            f"the header's shapes and data_offsets do not describe the file's tensor data ({detail}): "
            "the byte ranges must match the shapes and tile the data exactly"
        ) from err
    entries = {name: (entry["dtype"], tuple(entry["shape"]), raw[name]) for name, entry in header.items()}
    return metadata, entries


def _decode_layout(text: str) -> list[tuple[str, tuple[int, ...]]]:
    """Metadata ``layout`` -> [(name, shape)], refusing anything but what docs/delta-format.md allows."""
    try:
        packed = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error) as err:
        raise _corrupt("metadata 'layout' is not base64") from err
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(packed, MAX_LAYOUT_BYTES + 1)
    except zlib.error as err:
        raise _corrupt(f"metadata 'layout' is not zlib data ({err})") from err
    if len(raw) > MAX_LAYOUT_BYTES:
        raise _corrupt(f"metadata 'layout' inflates to more than {MAX_LAYOUT_BYTES} bytes")
    if not inflater.eof or inflater.unused_data:
        raise _corrupt("metadata 'layout' is a truncated zlib stream or has bytes after it")
    try:
        listed = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise _corrupt("metadata 'layout' is not UTF-8 JSON") from err
    if not isinstance(listed, list):
        raise _corrupt("metadata 'layout' is not a list")
    layout: list[tuple[str, tuple[int, ...]]] = []
    for item in listed:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and item[0]
                and _is_text(item[0]) and isinstance(item[1], list) and all(_is_int(s) for s in item[1])):
            raise _corrupt("metadata 'layout' has a malformed entry (want [name, [d0, d1, ...]])")
        layout.append((item[0], tuple(item[1])))
    keys = [_utf8(name) for name, _ in layout]
    if any(a >= b for a, b in itertools.pairwise(keys)):
        raise _corrupt("metadata 'layout' is not sorted by name or has duplicates")
    return layout


def _check_version(metadata: Mapping[str, str]) -> None:
    version = metadata.get("format_version")
    if version is None:
        raise _corrupt("the metadata lacks format_version")
    if version in READABLE_VERSIONS:
        return
    known = ", ".join(READABLE_VERSIONS)
    if version.isdecimal() and int(version) < int(FORMAT_VERSION):
        hint = "it was written by an older bitfit: personalize again to write a current one"
    else:
        hint = "upgrade bitfit to read it, or personalize again with this one"
    raise DeltaCorruptError(
        f"the delta has format_version {version!r}; this bitfit reads format_version {known} only; {hint}"
    )


def _decode_plain(data: bytes) -> Delta:
    metadata, entries = _parse_header(data)
    _check_version(metadata)  # first: an old file also lacks this version's keys
    missing = [k for k in _METADATA_KEYS if k not in metadata]
    if missing:
        raise _corrupt(f"the metadata lacks {', '.join(missing)}")
    if not _CHECKSUM_RE.fullmatch(metadata["checksum"]):
        raise _corrupt("the checksum field is malformed")
    raw = {name: data for name, (_, _, data) in entries.items()}
    actual = _checksum(metadata, [(name, dt, shape, data) for name, (dt, shape, data) in entries.items()])
    if actual != metadata["checksum"]:
        raise _corrupt("checksum mismatch: the file was altered or damaged")
    encoding = metadata["encoding"]
    if encoding not in get_args(Encoding):
        raise _corrupt(f"unknown encoding {encoding!r}")
    try:
        info = json.loads(metadata["info"])
    except (ValueError, RecursionError) as err:
        raise _corrupt("metadata 'info' is not JSON") from err
    if not isinstance(info, dict):
        raise _corrupt("metadata 'info' is not a JSON object")
    layout = _decode_layout(metadata["layout"])
    sizes = [math.prod(shape) for _, shape in layout]
    expected = {VALUES: (_STORED_DTYPE[encoding], (sum(sizes),))}
    if encoding == "int8":
        expected[SCALES] = ("F32", (len(layout),))
    if set(entries) != set(expected):
        lacking = sorted(set(expected) - set(entries))
        surplus = sorted(set(entries) - set(expected))
        raise _corrupt(
            f"encoding {encoding!r} stores exactly the tensors {', '.join(sorted(expected))}"
            + (f"; missing {_names(lacking)}" if lacking else "")
            + (f"; unexpected {_names(surplus)}" if surplus else "")
        )
    for name, (dtype, shape) in expected.items():
        got_dtype, got_shape, _ = entries[name]
        if got_dtype != dtype:
            raise _corrupt(f"tensor {name!r} is stored as {got_dtype}, but encoding {encoding!r} stores {dtype}")
        if got_shape != shape:
            raise _corrupt(
                f"tensor {name!r} has shape {list(got_shape)}, but the layout ({len(layout)} tensors, "
                f"{sum(sizes)} values) needs {list(shape)}"
            )
    tensors = _unpack(encoding, layout, raw)
    try:
        return Delta(tensors, metadata["base_fingerprint"], encoding, created=metadata["created"], info=info)
    except (InvalidArgumentError, TrainingDivergedError) as err:
        raise _corrupt(f"the delta's content is invalid ({err})") from err


def _unpack(
    encoding: str, layout: list[tuple[str, tuple[int, ...]]], raw: Mapping[str, bytes]
) -> dict[str, np.ndarray]:
    """Split the checked ``values`` (and ``scales``) into the layout's float32 tensors."""
    sizes = [math.prod(shape) for _, shape in layout]
    ends = list(itertools.accumulate(sizes))

    def owner(index: int) -> str:  # the name of the tensor holding flat value ``index``
        return layout[bisect.bisect_right(ends, index)][0]

    flat = np.frombuffer(raw[VALUES], dtype=_NUMPY_DTYPE[_STORED_DTYPE[encoding]])
    if encoding == "int8":
        scales = np.frombuffer(raw[SCALES], dtype="<f4")
        bad = np.flatnonzero(~(np.isfinite(scales) & (scales > 0)))
        if bad.size:
            i = int(bad[0])
            raise _corrupt(f"scale of {layout[i][0]!r} is {float(scales[i])!r}; it must be finite and > 0")
        if flat.size and int(flat.min()) < -127:
            raise _corrupt(f"tensor {owner(int(np.argmin(flat)))!r} holds -128, outside the symmetric int8 range")
        with np.errstate(all="ignore"):
            values = flat.astype(np.float32) * np.repeat(scales, sizes)  # float32 * float32, as the spec says
    else:
        values = flat.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise _corrupt(f"tensor {owner(int(bad[0]))!r} holds NaN or infinite values")
    return {name: part.reshape(shape) for (name, shape), part in zip(layout, np.split(values, ends[:-1]))}
