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
    """Base of every error bitfit raises on purpose."""


class InvalidUserDataError(BitfitError, ValueError):
    """The examples passed to ``personalize`` (or ``predict``) cannot be used as given."""


class BundleInvalidError(BitfitError):
    """A bundle directory is missing files, has a bad manifest, or fails its hashes."""


class ExportError(BitfitError):
    """The workstation export could not turn a model into a bundle."""


class UnsupportedModelError(ExportError):
    """The model has no biases, an op with no gradient, or a structure bitfit cannot train."""


class PolicyError(ExportError, ValueError):
    """The trainable-set policy or its regexes are unknown or select nothing."""


class ValidationFailedError(ExportError):
    """The exported bundle does not reproduce the source model, or training touched frozen tensors."""


class DeltaCorruptError(BitfitError):
    """A delta file is truncated, altered, undecodable or fails its checksum."""


class DeltaMismatchError(BitfitError):
    """A delta belongs to another base model (fingerprint) or has another tensor set or shape."""


class DeltaNotFoundError(BitfitError, KeyError):
    """The user or version asked for has no delta in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class StoreBusyError(BitfitError):
    """Another process holds the user's lock longer than the timeout allows."""


class StoreWriteError(BitfitError, OSError):
    """The store could not write (disk full, read-only, permissions); the previous delta is intact."""


class StoreReadError(BitfitError, OSError):
    """The store could not read a file or list a directory it needs (permissions, I/O error); it
    refuses to guess rather than treat the file as missing, and changed nothing."""


class TrainingDivergedError(BitfitError):
    """The loss became NaN or infinite; the user's previous delta was kept."""


class BudgetExceededError(BitfitError):
    """The data or the work asked for is over a budget the caller set."""


class ProviderUnavailableError(BitfitError):
    """An execution provider that was required is not available in this onnxruntime build."""


class BackendUnavailableError(BitfitError):
    """The training backend that was asked for cannot run here: the bundle lacks its model
    (e.g. a format-1 bundle has no portable training model) or the installed onnxruntime
    lacks its API (plain onnxruntime has no ``onnxruntime.training``)."""


class ResourceExhaustedError(BitfitError, MemoryError):
    """onnxruntime ran out of memory (host or device) loading or running a model: use a smaller
    batch or sequence length, fewer threads, or free memory; the bundle and the data are fine."""


class DecryptionError(DeltaCorruptError):
    """An encrypted delta could not be authenticated: wrong key, or the file was altered."""


class InvalidArgumentError(BitfitError, ValueError):
    """An argument has the wrong type, size or value (e.g. a key that is not 16, 24 or 32 bytes)."""


class MissingDependencyError(BitfitError, ImportError):
    """An optional package needed for the feature asked for is not installed; the message says what to pip install."""
