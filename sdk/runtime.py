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

from .errors import BitfitError

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


def cuda_available() -> bool:
    """Whether this onnxruntime build can run on CUDA here.

    Example:
        >>> cuda_available() in (True, False)
        True
    """
    return "CUDAExecutionProvider" in ort.get_available_providers()


__all__ = ["ort", "has_training_api", "cuda_available", "INSTALL_HINT"]
