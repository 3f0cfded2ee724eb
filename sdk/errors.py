"""Typed errors of bitfit: one base class, one subclass per kind of failure.

Every message says what was wrong and what to do next. Catch ``BitfitError`` to
catch them all; catch a subclass to react to one kind.

Example:
    >>> from bitfit.sdk.errors import BitfitError, InvalidUserDataError
    >>> try:
    ...     raise InvalidUserDataError("user_data is empty: pass at least 2 labelled examples")
    ... except BitfitError as err:
    ...     print(type(err).__name__, "-", err)
    InvalidUserDataError - user_data is empty: pass at least 2 labelled examples
"""

from __future__ import annotations


class BitfitError(Exception):
    """Base of every error bitfit raises on purpose.

    Example:
        >>> from bitfit.sdk.delta import decode_delta
        >>> try:
        ...     decode_delta(b"junk")
        ... except BitfitError as err:          # one except for every error bitfit raises on purpose
        ...     print(type(err).__name__)
        DeltaCorruptError
    """


class InvalidUserDataError(BitfitError, ValueError):
    """The examples passed to ``personalize`` (or ``predict``) cannot be used as given.

    Example:
        >>> from bitfit.sdk.data import check_text
        >>> check_text(42, "example 3")
        Traceback (most recent call last):
        ...
        bitfit.sdk.errors.InvalidUserDataError: example 3: text must be a non-empty string, got int; pass str (or UTF-8 bytes)
        >>> issubclass(InvalidUserDataError, ValueError)        # caught by code that expects ValueError
        True
    """


class BundleInvalidError(BitfitError):
    """A bundle directory is missing files, has a bad manifest, or fails its hashes.

    Example:
        >>> import tempfile
        >>> from bitfit.sdk.bundle import Bundle
        >>> Bundle.open(tempfile.mkdtemp())
        Traceback (most recent call last):
        ...
        bitfit.sdk.errors.BundleInvalidError: ... is not a bundle directory (no manifest.json): export one with `bitfit export`
    """


class ExportError(BitfitError):
    """The workstation export could not turn a model into a bundle.

    Example:
        >>> from bitfit.export.artifacts import loss_for
        >>> loss_for("ranking")
        Traceback (most recent call last):
        ...
        bitfit.sdk.errors.ExportError: unknown task 'ranking': use one of classification, regression, multilabel, token-classification, causal-lm
    """


class UnsupportedModelError(ExportError):
    """The model has no biases, an op with no gradient, or a structure bitfit cannot train.

    Example:
        >>> from onnx import helper
        >>> from bitfit.export.repairs import refuse_unsupported
        >>> quantized = helper.make_model(helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "g", [], []))
        >>> try:
        ...     refuse_unsupported(quantized)
        ... except ExportError as err:                      # an ExportError: one except covers every export failure
        ...     print(type(err).__name__, str(err)[:60])
        UnsupportedModelError the graph uses MatMulInteger, which ONNX Runtime training ca
    """


class PolicyError(ExportError, ValueError):
    """The trainable-set policy or its regexes are unknown or select nothing.

    Example:
        >>> from bitfit.export.biases import select_trainable
        >>> select_trainable(None, [], "everything")
        Traceback (most recent call last):
        ...
        bitfit.sdk.errors.PolicyError: unknown policy 'everything': use one of all-biases, paper-subset, all-biases+head, paper-subset+head
    """


class ValidationFailedError(ExportError):
    """The exported bundle does not reproduce the source model, or training touched frozen tensors.

    Example:
        >>> from types import SimpleNamespace
        >>> import numpy as np
        >>> from bitfit.export.validate import example_labels
        >>> bundle = SimpleNamespace(manifest=SimpleNamespace(loss="hinge"))
        >>> example_labels(bundle, np.zeros((2, 3)), np.random.default_rng(0))
        Traceback (most recent call last):
        ...
        bitfit.sdk.errors.ValidationFailedError: the manifest names loss 'hinge', which validation does not know: ...
    """


class DeltaCorruptError(BitfitError):
    """A delta file is truncated, altered, undecodable or fails its checksum.

    Example:
        >>> from bitfit.sdk.delta import decode_delta
        >>> decode_delta(bytes(4))
        Traceback (most recent call last):
        ...
        bitfit.sdk.errors.DeltaCorruptError: the file is 4 bytes, too short for a safetensors header (truncated or empty); the delta cannot be used: delete it and personalize again
    """


class DeltaMismatchError(BitfitError):
    """A delta belongs to another base model (fingerprint) or has another tensor set or shape.

    Example:
        >>> import numpy as np
        >>> from bitfit.sdk.delta import Delta, check_delta_fits
        >>> delta = Delta({"b": np.zeros(2)}, "sha256:aa")
        >>> check_delta_fits(delta, base_fingerprint="sha256:bb", shapes={"b": (2,)})
        Traceback (most recent call last):
        ...
        bitfit.sdk.errors.DeltaMismatchError: the delta does not fit this model: it was trained on base sha256:aa, this model is sha256:bb; ...
    """


class DeltaNotFoundError(BitfitError, KeyError):
    """The user or version asked for has no delta in the store.

    Example:
        >>> from bitfit.sdk.delta import load_delta
        >>> try:
        ...     load_delta("/nowhere/v000001.delta")
        ... except KeyError as err:                     # a KeyError too, printed without quotes
        ...     print(err)
        no delta file at /nowhere/v000001.delta
    """

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class StoreBusyError(BitfitError):
    """Another process holds the user's lock longer than the timeout allows.

    Example:
        >>> import tempfile, filelock, numpy as np
        >>> from bitfit.sdk.delta import Delta
        >>> from bitfit.sdk.store import DeltaStore
        >>> store = DeltaStore(tempfile.mkdtemp(), lock_timeout=0.05)
        >>> store.save("alice", Delta({"b": np.zeros(2)}, "sha256:00"))
        1
        >>> with filelock.FileLock(str(next(store.root.glob("alice-*")) / ".lock")):   # another writer holds alice
        ...     store.save("alice", Delta({"b": np.ones(2)}, "sha256:00"))
        Traceback (most recent call last):
        ...
        bitfit.sdk.errors.StoreBusyError: another process has held .../.lock for over 0.05s; try again later or raise lock_timeout
    """


class StoreWriteError(BitfitError, OSError):
    """The store could not write (disk full, read-only, permissions); the previous delta is intact.

    Example:
        >>> import tempfile, pathlib
        >>> from bitfit.sdk.atomic_files import write_file_atomic
        >>> blocker = pathlib.Path(tempfile.mkdtemp()) / "deltas"
        >>> _ = blocker.write_bytes(b"")                     # a file where a directory should be
        >>> try:
        ...     write_file_atomic(blocker / "HEAD", b"{}")
        ... except OSError as err:                          # an OSError too, with the OS's errno
        ...     print(type(err).__name__, err.errno > 0)
        StoreWriteError True
    """


class StoreReadError(BitfitError, OSError):
    """The store could not read a file or list a directory it needs (permissions, I/O error); it
    refuses to guess rather than treat the file as missing, and changed nothing.

    Example:
        >>> import os, tempfile, numpy as np
        >>> from bitfit.sdk.delta import Delta
        >>> from bitfit.sdk.store import DeltaStore
        >>> store = DeltaStore(tempfile.mkdtemp())
        >>> store.save("alice", Delta({"b": np.zeros(2)}, "sha256:00"))
        1
        >>> head = next(store.root.glob("alice-*")) / "HEAD"
        >>> os.remove(head); head.mkdir()                   # HEAD exists but cannot be read as a file
        >>> store.load("alice")
        Traceback (most recent call last):
        ...
        bitfit.sdk.errors.StoreReadError: could not read .../HEAD: Is a directory; ... Nothing was treated as missing and no delta was changed
    """


class TrainingDivergedError(BitfitError):
    """The loss became NaN or infinite; the user's previous delta was kept.

    Example:
        >>> import numpy as np
        >>> from bitfit.sdk.delta import Delta
        >>> base = {"b": np.zeros(2, np.float32)}
        >>> Delta.from_params({"b": np.array([0.5, np.nan])}, base, "sha256:00")
        Traceback (most recent call last):
        ...
        bitfit.sdk.errors.TrainingDivergedError: training produced NaN or infinite values in b; no delta was made and the previous one is kept. ...
    """


class BudgetExceededError(BitfitError):
    """The data or the work asked for is over a budget the caller set.

    Example:
        >>> try:
        ...     raise BudgetExceededError("5000 examples exceed max_examples=1000; pass a sample, or raise max_examples")
        ... except BitfitError as err:                  # personalize(..., max_examples=1000) raises it before any work
        ...     print(type(err).__name__)
        BudgetExceededError
    """


class ProviderUnavailableError(BitfitError):
    """An execution provider that was required is not available in this onnxruntime build.

    Example:
        >>> from bitfit.sdk.trainer import open_training_session
        >>> open_training_session("bundles/tiny", device="cuda")        # on a CPU-only onnxruntime   # doctest: +SKIP
        Traceback (most recent call last):
        ...
        bitfit.sdk.errors.ProviderUnavailableError: device='cuda' was asked for but this onnxruntime build has no CUDA provider ...
    """


class BackendUnavailableError(BitfitError):
    """The training backend that was asked for cannot run here: the bundle lacks its model
    (e.g. a format-1 bundle has no portable training model) or the installed onnxruntime
    lacks its API (plain onnxruntime has no ``onnxruntime.training``).

    Example:
        >>> from bitfit.sdk.trainer import open_training_session
        >>> open_training_session("bundles/format-1", backend="portable")                 # doctest: +SKIP
        Traceback (most recent call last):
        ...
        bitfit.sdk.errors.BackendUnavailableError: this bundle cannot train with the portable backend: ...
    """


class ResourceExhaustedError(BitfitError, MemoryError):
    """onnxruntime ran out of memory (host or device) loading or running a model: use a smaller
    batch or sequence length, fewer threads, or free memory; the bundle and the data are fine.

    Example:
        >>> try:
        ...     raise ResourceExhaustedError("onnxruntime ran out of memory running a training step; use a smaller batch")
        ... except MemoryError:                         # a MemoryError too: generic out-of-memory handling still works
        ...     print("retry with a smaller batch")
        retry with a smaller batch
    """


class DecryptionError(DeltaCorruptError):
    """An encrypted delta could not be authenticated: wrong key, or the file was altered.

    Example:
        >>> from bitfit.sdk.delta import ENCRYPTED_MAGIC, decode_delta
        >>> try:
        ...     decode_delta(ENCRYPTED_MAGIC + bytes(40))       # an encrypted file, read without its key
        ... except DeltaCorruptError as err:                   # a DeltaCorruptError too: the file is unusable as it is
        ...     print(type(err).__name__, "-", err)
        DecryptionError - the delta file is encrypted: pass the key it was saved with (key=...)
    """


class InvalidArgumentError(BitfitError, ValueError):
    """An argument has the wrong type, size or value (e.g. a key that is not 16, 24 or 32 bytes).

    Example:
        >>> from bitfit.sdk.delta import validate_key
        >>> validate_key(b"secret")
        Traceback (most recent call last):
        ...
        bitfit.sdk.errors.InvalidArgumentError: key must be 16, 24 or 32 bytes (AES-128/192/256), got 6; use os.urandom(32)
    """


class MissingDependencyError(BitfitError, ImportError):
    """An optional package needed for the feature asked for is not installed; the message says what to pip install.

    Example:
        >>> try:
        ...     raise MissingDependencyError("encrypted deltas need the 'cryptography' package: pip install cryptography")
        ... except ImportError as err:                  # an ImportError too
        ...     print(err)
        encrypted deltas need the 'cryptography' package: pip install cryptography
    """
