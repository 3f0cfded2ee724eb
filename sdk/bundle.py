"""The bundle format: a directory with ONNX Runtime training artifacts, an inference
model, the base weights (stored once) and ``manifest.json``. This module is the
format's only reader and writer; ``docs/bundle-format.md`` is its spec.

Example:
    >>> from bitfit.sdk.bundle import Bundle
    >>> b = Bundle.open("bundles/minilm-sentiment")          # doctest: +SKIP
    >>> b.manifest.labels, len(b.manifest.trainable)           # doctest: +SKIP
    (['negative', 'neutral', 'positive'], 50)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from .errors import BundleInvalidError
from .file_facts import FileFacts

BUNDLE_FORMAT = "bitfit-bundle"
BUNDLE_FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"

Task = Literal["classification", "regression", "multilabel", "token-classification", "causal-lm"]
LossName = Literal["cross-entropy", "mse", "bce-with-logits", "token-cross-entropy"]
OptimizerName = Literal["adamw", "sgd"]
TensorRole = Literal["bias", "head-weight", "other"]
Backend = Literal["portable", "ort-training"]
BACKENDS: tuple[Backend, ...] = ("portable", "ort-training")

# The file keys every bundle has; each training backend adds its own (docs/bundle-format.md).
REQUIRED_FILES = ("inference_model", "weights")
BACKEND_FILES: dict[str, tuple[str, ...]] = {
    "portable": ("portable_gradient_model", "portable_eval_model", "portable_optimizer_model"),
    "ort-training": ("training_model", "eval_model", "optimizer_model", "checkpoint"),
}
FORMAT_1_PORTABLE_REASON = (
    "bundle format 1 predates the portable training model; re-export it with this bitfit "
    "(bitfit export ...) to train on plain onnxruntime"
)


@dataclass(frozen=True)
class IOSpec:
    """One model input or output: name, element type and shape (ints or symbolic names).

    Example:
        >>> IOSpec("x", "float32", ["batch", 4]).shape
        ['batch', 4]
    """

    name: str
    dtype: str
    shape: list[int | str]


@dataclass(frozen=True)
class TrainableTensor:
    """One trainable tensor: its name in every model of the bundle, its shape and role.

    ``inference_shape`` is the shape the inference model's overridable input takes for
    a single user (``[1, d]`` for a per-row bias: feed ``[batch, d]`` to give each row
    its own bias; equal to ``shape`` otherwise).

    Example:
        >>> t = TrainableTensor("0.bias", [16], "float32", "bias", [1, 16])
        >>> t.size, t.inference_shape
        (16, [1, 16])
    """

    name: str
    shape: list[int]
    dtype: str
    role: TensorRole
    inference_shape: list[int]

    @property
    def size(self) -> int:
        """How many values the tensor holds.

        Example:
            >>> TrainableTensor("w", [2, 3], "float32", "bias", [2, 3]).size
            6
        """
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class TextSpec:
    """How text becomes model inputs: the tokenizer file and the input names it fills.

    Example:
        >>> TextSpec("tokenizer.json", 64).attention_mask
        'attention_mask'
    """

    tokenizer: str
    max_length: int
    input_ids: str = "input_ids"
    attention_mask: str | None = "attention_mask"
    token_type_ids: str | None = None


@dataclass(frozen=True)
class FileEntry:
    """One bundle file as the manifest lists it: relative path, sha256 and size.

    Example:
        >>> FileEntry("inference.onnx", "0" * 64, 1234).bytes
        1234
    """

    path: str
    sha256: str
    bytes: int


@dataclass
class Manifest:
    """Everything a device needs to know about a bundle, as stored in ``manifest.json``.

    Example:
        >>> m = _example_manifest()
        >>> m.task, m.logits_output, m.trainable_shapes
        ('classification', 'logits', {'0.bias': (3,)})
    """

    base_fingerprint: str
    task: Task
    loss: LossName
    optimizer: OptimizerName
    inputs: list[IOSpec]
    outputs: list[IOSpec]
    trainable: list[TrainableTensor]
    files: dict[str, FileEntry]
    policy: dict[str, Any]
    labels: list[str] | None = None
    text: TextSpec | None = None
    ignore_index: int | None = None
    per_row: bool = False
    label_input: str = "labels"
    source: dict[str, Any] = field(default_factory=dict)
    opset: int = 17
    ort_version: str = ""
    validation: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    training_backends: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per backend (``portable``, ``ort-training``): ``{"available": bool, "reason": str}``;
    the reason says why a backend is missing (format 1 bundles: derived on reading)."""
    training_defaults: dict[str, Any] = field(default_factory=dict)
    """Training options this bundle's model needs by default, e.g. ``{"learning_rate": 0.01}``;
    ``personalize`` uses them when the caller gives none. Optional: ``{}`` for bundles
    written before the field (the SDK's defaults apply); names a reader does not know are ignored."""
    format: str = BUNDLE_FORMAT
    format_version: int = BUNDLE_FORMAT_VERSION

    @property
    def logits_output(self) -> str:
        """The name of the model's first output (what losses and predictions read).

        Example:
            >>> _example_manifest().logits_output
            'logits'
        """
        return self.outputs[0].name

    @property
    def total_values(self) -> int | None:
        """How many parameter values the whole model has (``policy.total_values``; None when
        the manifest does not say).

        Example:
            >>> _example_manifest().total_values
            15
        """
        total = self.policy.get("total_values") if isinstance(self.policy, dict) else None
        return total if type(total) is int and total > 0 else None

    def backend_available(self, backend: str) -> bool:
        """Whether this bundle has the models of a training backend (see ``training_backends``).

        Example:
            >>> _example_manifest().backend_available("ort-training")
            False
        """
        entry = self.training_backends.get(backend, {})
        return bool(entry.get("available")) and all(k in self.files for k in BACKEND_FILES.get(backend, ("?",)))

    def backend_reason(self, backend: str) -> str:
        """Why a backend is not available (empty when it is).

        Example:
            >>> _example_manifest().backend_reason("ort-training")
            'exported with onnxruntime only'
        """
        if self.backend_available(backend):
            return ""
        return str(self.training_backends.get(backend, {}).get("reason") or f"the bundle has no {backend} training models")

    @property
    def trainable_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each trainable tensor's training shape, by name.

        Example:
            >>> _example_manifest().trainable_shapes
            {'0.bias': (3,)}
        """
        return {t.name: tuple(t.shape) for t in self.trainable}

    def to_json(self) -> str:
        """The manifest as JSON, with its ``checksum`` over every other field.

        Example:
            >>> import json
            >>> sorted(json.loads(_example_manifest().to_json()))[:3]
            ['base_fingerprint', 'checksum', 'created']
        """
        fields = asdict(self)
        fields["checksum"] = manifest_checksum(fields)
        return json.dumps(fields, indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        """Parse and check a manifest; any problem is a BundleInvalidError.

        Example:
            >>> text = _example_manifest().to_json()
            >>> Manifest.from_json(text).labels
            ['a', 'b', 'c']
            >>> Manifest.from_json(text.replace('"a"', '"A"'))
            Traceback (most recent call last):
            ...
            bitfit.sdk.errors.BundleInvalidError: manifest.json is damaged or was edited (its checksum does not match its content); ...
        """
        try:
            raw = json.loads(text, parse_float=_written_float)
        except (ValueError, TypeError, RecursionError) as err:  # ValueError covers JSON and UTF-8 errors
            raise BundleInvalidError(f"manifest.json is not valid JSON ({err}); re-export the bundle") from err
        if _UPPER_HEX_ESCAPE.search(text):
            raise BundleInvalidError(
                "manifest.json has a \\u escape with upper-case hex digits, which bitfit never writes: the file "
                "is damaged or was edited; copy the bundle again or re-export it"
            )
        if not isinstance(raw, dict):
            raise BundleInvalidError("manifest.json must hold a JSON object; re-export the bundle")
        if raw.get("format") != BUNDLE_FORMAT:
            raise BundleInvalidError(f"manifest.json format is {raw.get('format')!r}, expected {BUNDLE_FORMAT!r}")
        version = raw.get("format_version")
        if version not in READABLE_FORMAT_VERSIONS:
            raise BundleInvalidError(
                f"bundle format_version {version!r} is not supported by this bitfit "
                f"(reads versions {', '.join(map(str, READABLE_FORMAT_VERSIONS))}); re-export with a matching bitfit"
            )
        stored = raw.pop("checksum", None)
        if stored is None:
            raise BundleInvalidError(
                "manifest.json has no checksum: the bundle was exported by an older bitfit, or the field was "
                "removed; re-export it with this bitfit (bitfit export ...)"
            )
        if stored != manifest_checksum(raw):
            raise BundleInvalidError(
                "manifest.json is damaged or was edited (its checksum does not match its content); "
                "copy the bundle again or re-export it"
            )
        try:
            manifest = cls(
                **{
                    **raw,
                    "inputs": [IOSpec(**x) for x in raw["inputs"]],
                    "outputs": [IOSpec(**x) for x in raw["outputs"]],
                    "trainable": [TrainableTensor(**x) for x in raw["trainable"]],
                    "files": {k: FileEntry(**v) for k, v in raw["files"].items()},
                    "text": TextSpec(**raw["text"]) if raw.get("text") else None,
                }
            )
            if version == 1:  # format 1: ORT training artifacts only, no portable model
                manifest.training_backends = {
                    "portable": {"available": False, "reason": FORMAT_1_PORTABLE_REASON},
                    "ort-training": {"available": True, "reason": ""},
                }
        except (KeyError, TypeError, AttributeError) as err:
            raise BundleInvalidError(f"manifest.json is missing or has malformed fields ({err}); re-export the bundle") from err
        manifest._check()
        return manifest

    def _check(self) -> None:
        self._check_types()  # first: the checks below assume the types
        checks: list[tuple[bool, str]] = [
            (self.task in get_args(Task), f"unknown task {self.task!r}"),
            (self.loss in get_args(LossName), f"unknown loss {self.loss!r}"),
            (self.optimizer in get_args(OptimizerName), f"unknown optimizer {self.optimizer!r}"),
            (bool(self.trainable), "no trainable tensors"),
            (bool(self.outputs), "no outputs"),
            (bool(self.inputs), "no inputs"),
            (isinstance(self.base_fingerprint, str) and self.base_fingerprint.startswith("sha256:"), "bad base_fingerprint"),
            (all(k in self.files for k in REQUIRED_FILES), f"files must list {', '.join(REQUIRED_FILES)}"),
            (any(self.backend_available(b) for b in BACKENDS), "no training backend's models are listed"),
            (self.labels is None or all(isinstance(x, str) for x in self.labels), "labels must be strings"),
            (self.labels is None or len(set(self.labels)) == len(self.labels), "duplicate label names"),
            (len({t.name for t in self.trainable}) == len(self.trainable), "duplicate trainable tensor names"),
        ]
        for t in self.trainable:
            checks.append((all(isinstance(d, int) and d > 0 for d in t.shape), f"bad shape for {t.name}"))
        for ok, problem in checks:
            if not ok:
                raise BundleInvalidError(f"manifest.json: {problem}; re-export the bundle")

    def _check_types(self) -> None:
        """Every field has the type its readers rely on; a damaged or hand-edited manifest may not."""
        problems = [f"{name} is {getattr(self, name)!r:.60}" for name, ok in _FIELD_TYPES.items() if not ok(getattr(self, name))]
        for group in ("inputs", "outputs"):
            for spec in getattr(self, group) if isinstance(getattr(self, group), list) else []:
                if not (_is_name(spec.name) and _is_dtype(spec.dtype) and isinstance(spec.shape, list)
                        and all(_is_int(d) or _is_name(d) for d in spec.shape)):
                    problems.append(f"{group} entry {spec.name!r:.60} is malformed")
        for t in self.trainable if isinstance(self.trainable, list) else []:
            if not (_is_name(t.name) and _is_shape(t.shape) and _is_shape(t.inference_shape) and t.dtype == "float32"
                    and t.role in get_args(TensorRole) and np.prod(t.shape) == np.prod(t.inference_shape)):
                problems.append(f"trainable tensor {t.name!r:.60} is malformed (name, float32, shapes, role)")
        for key, entry in self.files.items() if isinstance(self.files, dict) else []:
            if not (isinstance(entry.path, str) and isinstance(entry.sha256, str) and _is_int(entry.bytes)):
                problems.append(f"files entry {key!r:.60} is malformed")
        text = self.text
        if text is not None and not (_is_name(text.tokenizer) and _is_int(text.max_length, 1) and _is_name(text.input_ids)
                                     and all(x is None or _is_name(x) for x in (text.attention_mask, text.token_type_ids))):
            problems.append("text is malformed")
        order = self.source.get("parameter_order", []) if isinstance(self.source, dict) else []
        if not (isinstance(order, list) and all(_is_name(x) for x in order)):
            problems.append("source.parameter_order is not a list of names")
        if problems:
            raise BundleInvalidError(f"manifest.json: {'; '.join(problems[:5])}; re-export the bundle")


def _is_int(x: Any, low: int = 0) -> bool:
    return type(x) is int and x >= low


def _is_name(x: Any) -> bool:
    return isinstance(x, str) and bool(x) and "\0" not in x


def _is_shape(x: Any) -> bool:
    return isinstance(x, list) and all(_is_int(d, 1) for d in x)


def _is_dtype(x: Any) -> bool:
    try:
        return isinstance(x, str) and np.dtype(x).kind in "biuf"
    except (TypeError, ValueError):
        return False


_FIELD_TYPES = {
    "base_fingerprint": lambda x: isinstance(x, str), "task": lambda x: isinstance(x, str),
    "loss": lambda x: isinstance(x, str), "optimizer": lambda x: isinstance(x, str),
    "inputs": lambda x: isinstance(x, list), "outputs": lambda x: isinstance(x, list),
    "trainable": lambda x: isinstance(x, list), "files": lambda x: isinstance(x, dict),
    "policy": lambda x: isinstance(x, dict), "source": lambda x: isinstance(x, dict),
    "validation": lambda x: isinstance(x, dict), "per_row": lambda x: type(x) is bool,
    "labels": lambda x: x is None or (isinstance(x, list) and all(isinstance(n, str) for n in x)),
    "ignore_index": lambda x: x is None or type(x) is int, "label_input": _is_name,
    "opset": _is_int, "ort_version": lambda x: isinstance(x, str), "created": lambda x: isinstance(x, str),
    "training_defaults": lambda x: isinstance(x, dict) and (
        "learning_rate" not in x or (type(x["learning_rate"]) in (int, float) and 0 < x["learning_rate"] < float("inf"))),
    "training_backends": lambda x: isinstance(x, dict) and all(
        k in BACKENDS and isinstance(v, dict) and type(v.get("available")) is bool and isinstance(v.get("reason", ""), str)
        for k, v in x.items()),
}


# The checksum covers the parsed values, and some spellings parse to the same value: "1e-06" and
# "1E-06", a 17th digit that rounds away, "\u00e9" and "\u00E9" (one bit apart each). Only the
# spelling json.dumps writes is accepted, so that every bit flip of the file is refused.
_UPPER_HEX_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u[0-9a-fA-F]{0,3}[A-F]")


def _written_float(token: str) -> float:
    value = float(token)
    if repr(value) != token:  # json.dumps writes floats as float.__repr__
        raise ValueError(f"the number {token} is not spelled as bitfit writes it ({value!r})")
    return value


def manifest_checksum(fields: dict[str, Any]) -> str:
    """``sha256:`` over the manifest's fields except ``checksum``, as canonical JSON.

    Canonical JSON: keys sorted, separators ``,`` and ``:``, ASCII escapes. It catches a
    damaged manifest whose JSON is still valid (a flipped letter in a label name); it is
    not a signature: whoever can rewrite the manifest can rewrite the checksum too.

    Example:
        >>> manifest_checksum({"b": 1, "a": [1.5, "x"]})[:15]
        'sha256:27edd549'
    """
    body = {k: v for k, v in fields.items() if k != "checksum"}
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise BundleInvalidError(f"manifest.json holds values JSON cannot represent ({err}); re-export the bundle") from err
    return "sha256:" + hashlib.sha256(text.encode("ascii")).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x"; _ = p.write_bytes(b"abc")
        >>> sha256_file(p)[:12]
        'ba7816bf8f01'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_tensors(tensors: dict[str, np.ndarray]) -> str:
    """The base fingerprint: sha256 over every base tensor, sorted by name.

    For each name: utf-8 name, NUL, dtype name, NUL, shape as JSON, NUL, the C-order
    little-endian bytes. A delta records it; a delta with another one is refused.

    Example:
        >>> fingerprint_tensors({"b": np.zeros(2, np.float32)})[:15]
        'sha256:013ce9e8'
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        digest.update(name.encode("utf-8") + b"\0" + str(arr.dtype).encode() + b"\0")
        digest.update(json.dumps(list(arr.shape)).encode() + b"\0")
        digest.update(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
    return "sha256:" + digest.hexdigest()


def _inside(resolved_root: Path, relative: str) -> Path:
    """The resolved path of bundle file ``relative`` under the bundle's resolved root; refused
    unless it is a plain relative path that stays inside."""
    if (not isinstance(relative, str) or not relative or "\0" in relative or os.path.isabs(relative) or "\\" in relative
            or any(p in ("..", "") for p in relative.split("/"))):
        raise BundleInvalidError(f"bundle file path {relative!r} must be a plain relative path inside the bundle")
    if _no_links_below(resolved_root, relative):
        return resolved_root / relative  # already its own resolved path: nothing to follow
    path = (resolved_root / relative).resolve()
    if resolved_root not in path.parents:
        raise BundleInvalidError(f"bundle file {relative!r} resolves outside the bundle directory; refusing it")
    return path


def _no_links_below(resolved_root: Path, relative: str) -> bool:
    """Whether every component of ``relative`` (checked plain: no ``..``, no empty part) under
    the already-resolved root exists and is no link, so ``resolved_root / relative`` is the
    resolved path: one ``lstat`` per component instead of one per component of the whole path
    (a bundle deep in a file system was lstat'ed ~230 times an open). POSIX only: elsewhere
    (Windows junctions are not links to ``lstat``) the full resolve decides.
    """
    if os.name != "posix":
        return False
    current = str(resolved_root)
    for part in relative.split("/"):
        current = os.path.join(current, part)
        try:
            if stat.S_ISLNK(os.lstat(current).st_mode):
                return False
        except OSError:
            return False  # missing: the full resolve and the caller's checks say what is wrong
    return True


def _external_refs(path: Path) -> tuple[Any, ...]:
    from .onnx_refs import external_data_refs

    # Located refs only: what can make ONNX Runtime read another file (see external_data_refs).
    return tuple(external_data_refs(path.read_bytes(), located_only=True))


# What opening a bundle learns of each file, reused while the file is unchanged (file_facts.py).
_FILE_SHA256: FileFacts[str] = FileFacts(sha256_file)
_FILE_EXTERNAL_REFS: FileFacts[tuple[Any, ...]] = FileFacts(_external_refs)


def forget_checked_files() -> None:
    """Make the next ``Bundle.open`` of every bundle hash and parse its files again.

    Opening a bundle remembers each file's sha256 and external-data references while the
    file is provably unchanged (``bitfit.sdk.file_facts``), so reopening it in the same
    process skips that work; this drops what was remembered (a cold start, e.g. for a
    benchmark).

    Example:
        >>> forget_checked_files()
    """
    _FILE_SHA256.forget()
    _FILE_EXTERNAL_REFS.forget()


def _check_external_data(path: Path, relative: str, listed: set[str]) -> None:
    """Refuse an ONNX file (``relative`` in the manifest, resolved to ``path``) whose external
    data is anything but one of the bundle's own files.

    ONNX Runtime opens a tensor's external-data ``location`` relative to the model's folder,
    so ``../x``, an absolute path or ORT's in-memory tag would read outside the bundle.
    """
    folder = relative.rpartition("/")[0]
    for ref in _FILE_EXTERNAL_REFS.get(path, resolved=True):
        location = ref.location
        plain = (isinstance(location, str) and location and "\0" not in location and ":" not in location
                 and "\\" not in location and not os.path.isabs(location)
                 and not any(p in ("..", ".", "") for p in location.split("/")))
        target = f"{folder}/{location}" if folder else location
        if not plain or target not in listed:
            raise BundleInvalidError(
                f"bundle file {relative!r}: tensor {ref.tensor!r:.80} reads external data from {location!r:.120}, "
                "which is not a file listed in the manifest; refusing the bundle (it was altered): re-export it"
            )


class Bundle:
    """A bundle directory opened for reading, with its manifest checked.

    ``verify`` controls the file check: "hashes" (default) re-hashes every listed file,
    "sizes" only compares sizes (fast start on slow storage), "none" trusts the files. Every
    ONNX file's external-data references are checked whatever ``verify`` says. A file this
    process already hashed or parsed, and provably unchanged since (same inode, size,
    modification and status-change times, written over 2 s before), is not read again
    (``bitfit.sdk.file_facts``; :func:`forget_checked_files` forgets).

    Example:
        >>> b = Bundle.open("bundles/minilm-sentiment", verify="sizes")          # doctest: +SKIP
        >>> b.file("inference_model").name, len(b.trainable_base())              # doctest: +SKIP
        ('inference.onnx', 50)
    """

    def __init__(self, path: Path, manifest: Manifest):
        self.path = path
        self.manifest = manifest
        self._resolved_root: Path | None = None
        self._trainable_base: dict[str, np.ndarray] | None = None

    @property
    def resolved_root(self) -> Path:
        """The bundle directory with links resolved (resolved once: every file check needs it).

        Example:
            >>> Bundle(Path("/b"), None).resolved_root
            PosixPath('/b')
        """
        if self._resolved_root is None:
            self._resolved_root = self.path.resolve()
        return self._resolved_root

    @classmethod
    def open(cls, path: str | os.PathLike, verify: Literal["hashes", "sizes", "none"] = "hashes") -> "Bundle":
        """Open and check a bundle directory.

        Example:
            >>> Bundle.open("/nonexistent")
            Traceback (most recent call last):
            ...
            bitfit.sdk.errors.BundleInvalidError: /nonexistent is not a bundle directory (no manifest.json): export one with `bitfit export`
        """
        root = Path(os.path.expanduser(str(path)))
        manifest_path = root / MANIFEST_NAME
        if not manifest_path.is_file():
            raise BundleInvalidError(f"{path} is not a bundle directory (no {MANIFEST_NAME}): export one with `bitfit export`")
        try:
            text = manifest_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise BundleInvalidError(f"cannot read {manifest_path}: {err}") from err
        manifest = Manifest.from_json(text)
        bundle = cls(root, manifest)
        resolved_root = bundle.resolved_root
        listed = {e.path for e in manifest.files.values()}
        for key, entry in manifest.files.items():
            file_path = _inside(resolved_root, entry.path)
            try:
                found = os.stat(file_path)
            except OSError:
                found = None
            if found is None or not stat.S_ISREG(found.st_mode):
                raise BundleInvalidError(f"bundle file {entry.path!r} ({key}) is missing; copy the whole bundle directory")
            if verify != "none" and found.st_size != entry.bytes:
                raise BundleInvalidError(f"bundle file {entry.path!r} has {found.st_size} bytes, manifest says {entry.bytes}: the bundle is incomplete or altered; copy it again")
            if verify == "hashes" and _FILE_SHA256.get(file_path, resolved=True) != entry.sha256:
                raise BundleInvalidError(f"bundle file {entry.path!r} does not match its sha256 in the manifest: the bundle was altered or damaged; copy it again")
            if entry.path.endswith(".onnx"):
                _check_external_data(file_path, entry.path, listed)
        return bundle

    def file(self, key: str) -> Path:
        """Absolute path of a bundle file by its manifest key (e.g. "inference_model").

        Example:
            >>> Bundle(Path("/b"), _example_manifest()).file("inference_model")
            PosixPath('/b/inference_model.onnx')
        """
        if key not in self.manifest.files:
            raise BundleInvalidError(f"this bundle has no {key!r} file; re-export it with the option that writes one")
        return _inside(self.resolved_root, self.manifest.files[key].path)

    def base_weights(self, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """The base model's tensors (all, or only ``names``) as float arrays, from ``weights``.

        Example:
            >>> Bundle.open("bundles/tiny").base_weights(["0.bias"])["0.bias"].shape   # doctest: +SKIP
            (16,)
        """
        from safetensors import SafetensorError
        from safetensors.numpy import safe_open

        try:
            with safe_open(str(self.file("weights")), framework="numpy") as fh:
                keys = names if names is not None else list(fh.keys())
                return {k: fh.get_tensor(k) for k in keys}
        except (SafetensorError, OSError, KeyError) as err:
            raise BundleInvalidError(f"cannot read the bundle's weights ({err}); re-export the bundle") from err

    def file_problems(self, keys: list[str]) -> list[str]:
        """What is wrong with the listed files (missing, size, sha256 against the manifest); [] if intact.

        Used to tell a damaged bundle from other load failures (memory, providers) after
        onnxruntime refused a model.

        Example:
            >>> Bundle(Path("/nonexistent"), None).file_problems([])
            []
        """
        unlisted = [f"the manifest lists no {key}" for key in keys if key not in self.manifest.files]
        return unlisted + self.path_problems([self.file(k) for k in keys if k in self.manifest.files])

    def path_problems(self, paths: list[Path]) -> list[str]:
        """What is wrong with these files: missing, or (for a file the manifest lists) its size or sha256.

        Example:
            >>> Bundle(Path("/nonexistent"), None).path_problems([Path("/nonexistent/x.onnx")])
            ['x.onnx is missing']
        """
        # Resolved on both sides: a bundle opened by a relative path or through a link still
        # finds each file's manifest entry.
        listed = ({_inside(self.resolved_root, entry.path): entry for entry in self.manifest.files.values()}
                  if self.manifest else {})
        problems = []
        for path in paths:
            entry = listed.get(path.resolve())
            if not path.is_file():
                problems.append(f"{path.name} is missing")
            elif entry is not None and path.stat().st_size != entry.bytes:
                problems.append(f"{path.name} has {path.stat().st_size} bytes, the manifest says {entry.bytes}")
            elif entry is not None and sha256_file(path) != entry.sha256:
                problems.append(f"{path.name} does not match its sha256 in the manifest")
        return problems

    def trainable_base(self) -> dict[str, np.ndarray]:
        """The base values of the trainable tensors, in manifest order.

        Example:
            >>> list(Bundle.open("bundles/tiny").trainable_base())                     # doctest: +SKIP
            ['0.bias', '2.bias']
        """
        if self._trainable_base is None:  # read once: every training session starts from it
            self._trainable_base = self.base_weights([t.name for t in self.manifest.trainable])
        return {name: value.copy() for name, value in self._trainable_base.items()}


def write_manifest(directory: str | os.PathLike, manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically (temp file + fsync + rename).

    Example:
        >>> import tempfile
        >>> path = write_manifest(tempfile.mkdtemp(), _example_manifest())
        >>> Manifest.from_json(path.read_text()).task
        'classification'
    """
    path = Path(directory) / MANIFEST_NAME
    tmp = path.with_name(f".tmp-{MANIFEST_NAME}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(manifest.to_json())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def file_entry(directory: str | os.PathLike, relative: str) -> FileEntry:
    """Hash and size of one bundle file, as recorded in the manifest.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp()); _ = (folder / "a.bin").write_bytes(b"abc")
        >>> file_entry(folder, "a.bin")
        FileEntry(path='a.bin', sha256='ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad', bytes=3)
    """
    full = Path(directory) / relative
    return FileEntry(path=relative, sha256=sha256_file(full), bytes=full.stat().st_size)


def _example_manifest() -> Manifest:
    """A small valid manifest for the examples in this module's docstrings."""
    return Manifest(
        base_fingerprint="sha256:" + "0" * 64, task="classification", loss="cross-entropy", optimizer="adamw",
        inputs=[IOSpec("x", "float32", ["batch", 4])], outputs=[IOSpec("logits", "float32", ["batch", 3])],
        trainable=[TrainableTensor("0.bias", [3], "float32", "bias", [1, 3])],
        files={key: FileEntry(f"{key}.onnx", "0" * 64, 1) for key in ("inference_model", *BACKEND_FILES["portable"])}
        | {"weights": FileEntry("weights.safetensors", "0" * 64, 1)},
        policy={"name": "all-biases", "trainable_values": 3, "total_values": 15}, labels=["a", "b", "c"],
        training_backends={"portable": {"available": True, "reason": ""},
                           "ort-training": {"available": False, "reason": "exported with onnxruntime only"}},
    )
