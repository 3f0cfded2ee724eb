"""The one place that imports onnxruntime for inference sessions, whichever package
provides it: plain ``onnxruntime`` (the device install) or ``onnxruntime-training``
(the workstation and the old training backend). Both install the module ``onnxruntime``.

Why a guard: with the training wheel (1.19.2) ``import onnxruntime`` probes
``onnxruntime.training.ortmodule``, which imports torch (seconds and hundreds of MB, or a
failure on a device without torch), and ``onnxruntime.training/__init__`` imports torch
too. Where that package exists, a bare ``onnxruntime.training`` package object is
registered before the first import, and the ORTModule probe is made an ImportError,
which onnxruntime treats as "no ORTModule". Plain onnxruntime (>= 1.20) has no
``training`` folder and is imported as it is. See ../shared/ORT_TRAINING_NOTES.md.

Example:
    >>> from bitfit.sdk.runtime import ort, has_training_api
    >>> isinstance(ort.__version__, str), isinstance(has_training_api(), bool)
    (True, True)
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
import warnings
from collections.abc import Sequence
from typing import Any

from .errors import BitfitError, ProviderUnavailableError

INSTALL_HINT = (
    "install the device runtime with `pip install 'bitfit[device]'` (plain onnxruntime), or "
    "`pip install 'bitfit[ort-training]'` for the onnxruntime-training 1.19.2 backend (never both in one environment)"
)


def _onnxruntime_dir() -> str:
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or spec.origin is None:
        raise BitfitError(f"onnxruntime is not installed: {INSTALL_HINT}")
    return os.path.dirname(spec.origin)


def _register_bare_training_package(package_dir: str) -> None:
    if "onnxruntime.training" in sys.modules:
        return  # a workstation process already imported the real package (with torch): reuse it
    training_dir = os.path.join(package_dir, "training")
    if not os.path.isdir(training_dir):
        return  # plain onnxruntime: nothing to guard
    package = types.ModuleType("onnxruntime.training")
    package.__path__ = [training_dir]
    package.__package__ = "onnxruntime.training"
    sys.modules["onnxruntime.training"] = package
    sys.modules.setdefault("onnxruntime.training.ortmodule", None)  # type: ignore[arg-type]


_register_bare_training_package(_onnxruntime_dir())

import onnxruntime as ort  # noqa: E402  (must follow the registration above)

ort.set_default_logger_severity(3)  # ORT's INFO lines would drown the user's output


def has_training_api() -> bool:
    """Whether this onnxruntime is the training build (1.19.2) with ``onnxruntime.training.api``.

    Example:
        >>> has_training_api() in (True, False)
        True
    """
    return importlib.util.find_spec("onnxruntime.training.api") is not None if "onnxruntime.training" in sys.modules else False


_OUT_OF_MEMORY = ("bad_alloc", "Failed to allocate memory", "out of memory", "OutOfMemory", "CUDNN_STATUS_ALLOC_FAILED")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether an onnxruntime failure is an allocation failure (host or device memory).

    Example:
        >>> is_out_of_memory(RuntimeError("std::bad_alloc")), is_out_of_memory(RuntimeError("bad shape"))
        (True, False)
    """
    return isinstance(err, MemoryError) or any(s in str(err) for s in _OUT_OF_MEMORY)


def cuda_available() -> bool:
    """Whether this onnxruntime build can run on CUDA here.

    Example:
        >>> device = "cuda" if cuda_available() else "cpu"
        >>> resolve_providers(device)[-1]                 # CPU stays the fallback either way
        'CPUExecutionProvider'
    """
    return "CUDAExecutionProvider" in ort.get_available_providers()


def resolve_providers(providers: str | Sequence[Any] = "auto", *, strict: bool = False) -> list[Any]:
    """The execution providers to ask ONNX Runtime for, CPU always last as a fallback.

    ``"auto"`` is CUDA when this build has it, else CPU. An explicit list (names, or
    ``(name, options)`` pairs) is passed through; a provider this build lacks is dropped
    with a warning, or refused with ProviderUnavailableError when ``strict``.

    Example:
        >>> resolve_providers("cpu")
        ['CPUExecutionProvider']
        >>> resolve_providers(["XNNPACKExecutionProvider"])[-1]       # doctest: +SKIP
        'CPUExecutionProvider'
    """
    available = ort.get_available_providers()
    if providers == "auto":
        wanted: list[Any] = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []
    elif providers == "cpu":
        wanted = []
    elif providers == "cuda":
        wanted = ["CUDAExecutionProvider"]
        strict = True
    elif isinstance(providers, str):
        wanted = [providers]
    else:
        wanted = list(providers)
    chosen: list[Any] = []
    for item in wanted:
        name = item[0] if isinstance(item, (tuple, list)) else item
        if name == "CPUExecutionProvider":
            continue
        if name not in available:
            message = f"execution provider {name} is not available in this onnxruntime build (has {available})"
            if strict:
                raise ProviderUnavailableError(message + "; install a build with it or use providers='cpu'")
            warnings.warn(message + "; falling back to CPU", RuntimeWarning, stacklevel=2)
            continue
        chosen.append(tuple(item) if isinstance(item, (tuple, list)) else item)
    return [*chosen, "CPUExecutionProvider"]


__all__ = ["ort", "has_training_api", "cuda_available", "resolve_providers", "is_out_of_memory", "INSTALL_HINT"]
