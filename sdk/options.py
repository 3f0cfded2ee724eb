"""The options Personalizer, Predictor and the ``bitfit`` command share, checked in one place
so that each name means one thing everywhere:

- ``store``: a path or a DeltaStore; ``None`` is the platform's data directory (the same
  store for training and serving); ``False`` (Predictor only) is no store: the base model.
- ``providers``: where training *and* inference run: ``"cpu"`` (the default), ``"cuda"``
  (refused with ProviderUnavailableError where this onnxruntime has no CUDA), ``"auto"``
  (CUDA where this build has it, else CPU), or a list of execution providers (names or
  ``(name, options)`` pairs; CPU is always appended as the fallback).
- ``verify``: how a bundle's files are checked when it is opened (``Bundle.open``).
- ``threads``: onnxruntime's intra-op threads per session: an int (0: onnxruntime's default,
  one per core), or None: the SDK's choice, onnxruntime's default except for the training
  sessions of a small model (under ``SMALL_MODEL_VALUES``), which get one (:func:`session_threads`).

A wrong value is an InvalidArgumentError that names the accepted ones.

Example:
    >>> from bitfit.sdk.options import check_providers
    >>> check_providers("cuda"), check_providers(["CUDAExecutionProvider"])
    ('cuda', ['CUDAExecutionProvider'])
    >>> check_providers("gpu")
    Traceback (most recent call last):
    ...
    bitfit.sdk.errors.InvalidArgumentError: providers must be 'cpu', 'cuda', 'auto', an execution provider name (e.g. 'CUDAExecutionProvider') or a list of them, got 'gpu'
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any, Literal, Union

from .errors import InvalidArgumentError
from .training_plan import is_small_model

Verify = Literal["hashes", "sizes", "none"]
DEFAULT_VERIFY: Verify = "hashes"
Providers = Union[Literal["cpu", "cuda", "auto"], str, Sequence[Any]]
DEFAULT_PROVIDERS = "cpu"
_PROVIDER_WORDS = ("cpu", "cuda", "auto")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``, else InvalidArgumentError naming them.

    Example:
        >>> check_choice("verify", "sizes", ("hashes", "sizes", "none"))
        'sizes'
    """
    if not isinstance(value, (str, int, type(None))) or value not in choices:
        raise InvalidArgumentError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_threads(threads: Any) -> int | None:
    """``threads`` if it is None or an int >= 0, else InvalidArgumentError.

    Example:
        >>> check_threads(2), check_threads(None)
        (2, None)
        >>> check_threads(-1)
        Traceback (most recent call last):
        ...
        bitfit.sdk.errors.InvalidArgumentError: threads must be an int >= 0 (0: onnxruntime's default, one per core) or None (the SDK's choice), got -1
    """
    if threads is not None and (type(threads) is not int or threads < 0):
        raise InvalidArgumentError(
            f"threads must be an int >= 0 (0: onnxruntime's default, one per core) or None (the SDK's choice), "
            f"got {threads!r}"
        )
    return threads


def session_threads(threads: int | None, total_values: int | None, options_given: bool = False) -> int:
    """The intra-op threads for a *training* session of a model with ``total_values`` values:
    ``threads`` as given, or for None one thread when the model is small, else 0
    (onnxruntime's default). ``options_given``: the caller passed its own session options,
    which the SDK's choice does not override (0 for None).

    Why one thread for a small model's training: its ops are too small to split, and a thread
    pool costs more than it saves: started and stopped with each session (a Personalizer used
    once builds its own), woken for every op. Measured by ``tools/thread_study.py``
    (onnxruntime 1.19.2, 2 cores; open + 30 steps of 16 + close), one thread vs the default:
    9.8 vs 12.3 ms for a 17 k-value MLP, 22.6 vs 22.8 ms at 1 M, 80 vs 111 ms at 4.2 M (an
    earlier run of the same study: 8.3 vs 11.5, 22 vs 31, 90 vs 126 ms). Above
    ``SMALL_MODEL_VALUES`` (MiniLM: 22.6 M, whose steps are large matrix products) the default
    is kept. Inference keeps it for every model (``Predictor``): its session lives long and its
    batches are large (the same study, 64 rows: 6.9 ms on one thread vs 4.1 ms by default at
    4.2 M values; 16.8 vs 15.8 ms for a 1 M-value text model at 64 tokens).

    Example:
        >>> session_threads(None, 20_000), session_threads(None, 22_600_000), session_threads(4, 20_000)
        (1, 0, 4)
        >>> session_threads(None, 20_000, options_given=True), session_threads(4, 20_000, options_given=True)
        (0, 4)
    """
    if threads is not None:
        return threads
    return 1 if is_small_model(total_values) and not options_given else 0


def set_threads(options: Any, threads: int) -> Any:
    """Give an ``onnxruntime.SessionOptions`` ``threads`` intra-op threads (and one inter-op
    thread); 0 leaves onnxruntime's default. Returns ``options``.

    Example:
        >>> from bitfit.sdk.runtime import ort
        >>> set_threads(ort.SessionOptions(), 3).intra_op_num_threads
        3
    """
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return options


def check_providers(providers: Any) -> Any:
    """``providers`` if it is a value the SDK accepts (see the module docstring), as a str or a list.

    Example:
        >>> check_providers(("CPUExecutionProvider", ("CUDAExecutionProvider", {"device_id": 0})))
        ['CPUExecutionProvider', ('CUDAExecutionProvider', {'device_id': 0})]
    """
    if isinstance(providers, str):
        if providers in _PROVIDER_WORDS or (providers.endswith("ExecutionProvider") and len(providers) > 17):
            return providers
    elif isinstance(providers, Sequence) and not isinstance(providers, (bytes, bytearray)):
        items = list(providers)
        if all(_is_provider_item(item) for item in items):
            return [tuple(item) if isinstance(item, (tuple, list)) else item for item in items]
    raise InvalidArgumentError(
        "providers must be 'cpu', 'cuda', 'auto', an execution provider name (e.g. 'CUDAExecutionProvider') "
        f"or a list of them, got {providers!r:.200}"
    )


def _is_provider_item(item: Any) -> bool:
    if isinstance(item, str):
        return item.endswith("ExecutionProvider")
    return (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)
            and item[0].endswith("ExecutionProvider") and isinstance(item[1], dict))


def providers_from_device(providers: Any, device: Any, *, stacklevel: int = 3) -> Any:
    """``providers``, or the value the deprecated ``device=`` alias maps onto (with a DeprecationWarning).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     providers_from_device("cpu", "cuda")
        'cuda'
    """
    if device is None:
        return check_providers(providers)
    warnings.warn(
        f"device={device!r} is deprecated: pass providers={device!r} (one option for training and inference)",
        DeprecationWarning, stacklevel=stacklevel,
    )
    check_choice("device", device, ("cpu", "cuda"))
    if providers != DEFAULT_PROVIDERS and providers != device:
        raise InvalidArgumentError(
            f"device={device!r} and providers={providers!r} disagree: pass providers= alone (device= is deprecated)"
        )
    return device


def open_store(store: Any, key: bytes | None, *, allow_none: bool) -> Any:
    """The DeltaStore for a ``store`` option: a path, a DeltaStore, None (the platform's data
    directory), or, when ``allow_none``, False for no store (returns None).

    Example:
        >>> open_store(False, None, allow_none=True) is None
        True
    """
    from .store import DeltaStore

    if store is False and allow_none:
        if key is not None:
            raise InvalidArgumentError("key= was given with store=False (no store): pass a store to read encrypted deltas")
        return None
    if isinstance(store, DeltaStore):
        if key is not None and not store.uses_key(key):
            # Ignoring it would write plain deltas while the app believes they are encrypted.
            raise InvalidArgumentError(
                "key= was given together with a DeltaStore that does not use that key: create the DeltaStore "
                "with key=..., or pass the store as a path"
            )
        return store
    if store is None or isinstance(store, (str, os.PathLike)):
        return DeltaStore(store, key=key)
    accepted = "a path, a DeltaStore, None (the platform's data directory)" + (" or False (no store)" if allow_none else "")
    raise InvalidArgumentError(f"store must be {accepted}, got {store!r:.100}")


__all__ = ["Verify", "DEFAULT_VERIFY", "Providers", "DEFAULT_PROVIDERS", "check_choice", "check_providers", "key_from_file",
           "providers_from_device", "open_store"]


def key_from_file(path: str | os.PathLike) -> bytes:
    """The AES key a key file holds: its raw bytes, 16, 24 or 32 of them (``--key-file``).

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "key")
        >>> _ = open(path, "wb").write(bytes(32))
        >>> len(key_from_file(path))
        32
        >>> _ = open(path, "wb").write(b"secret\\n")
        >>> key_from_file(path)
        Traceback (most recent call last):
        ...
        bitfit.sdk.errors.InvalidArgumentError: key file ... holds 7 bytes; an AES key is 16, 24 or 32 bytes (the raw bytes, no newline or hex), e.g. written once with `head -c 32 /dev/urandom > KEYFILE`
    """
    try:
        with open(path, "rb") as fh:
            key = fh.read(4096)
    except OSError as err:
        raise InvalidArgumentError(f"cannot read key file {path}: {err.strerror or err}") from err
    if len(key) not in (16, 24, 32):
        raise InvalidArgumentError(
            f"key file {path} holds {len(key)} bytes; an AES key is 16, 24 or 32 bytes (the raw bytes, "
            "no newline or hex), e.g. written once with `head -c 32 /dev/urandom > KEYFILE`"
        )
    return key
