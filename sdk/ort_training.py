"""The one place that imports onnxruntime and its on-device training API, torch-free.

Why: in onnxruntime-training 1.19.2 ``onnxruntime.training/__init__`` imports its
``amp``/``optim`` subpackages, which import torch, and ``import onnxruntime`` itself
tries ``onnxruntime.training.ortmodule``. A device has no torch. Registering a bare
``onnxruntime.training`` package object before the first import lets
``onnxruntime.training.api`` (pure C++ bindings plus thin wrappers) load on its own:
57 MB RSS instead of failing. See ../shared/ORT_TRAINING_NOTES.md, "Runtime facts".

Example:
    >>> from bitfit.sdk.ort_training import ort, training_api
    >>> ort.__version__
    '1.19.2'
    >>> sorted(n for n in ("CheckpointState", "Module", "Optimizer") if hasattr(training_api, n))
    ['CheckpointState', 'Module', 'Optimizer']
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

from .errors import BitfitError


def _register_bare_training_package() -> None:
    if "onnxruntime.training" in sys.modules:
        return  # a workstation process already imported the real package (with torch): reuse it
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or spec.origin is None:
        raise BitfitError(
            "onnxruntime is not installed: install onnxruntime-training-cpu==1.19.2 "
            "(pip install 'bitfit') to train on this device"
        )
    package = types.ModuleType("onnxruntime.training")
    package.__path__ = [os.path.join(os.path.dirname(spec.origin), "training")]
    package.__package__ = "onnxruntime.training"
    sys.modules["onnxruntime.training"] = package
    # ``import onnxruntime`` probes ``onnxruntime.training.ortmodule`` (which imports torch,
    # ~1 s and hundreds of MB even where torch is installed); a None entry makes that probe
    # an ImportError, which onnxruntime treats as "no ORTModule".
    sys.modules.setdefault("onnxruntime.training.ortmodule", None)  # type: ignore[arg-type]


_register_bare_training_package()

import onnxruntime as ort  # noqa: E402  (must follow the registration above)

try:
    import onnxruntime.training.api as training_api  # noqa: E402
    from onnxruntime.capi.onnxruntime_inference_collection import OrtValue  # noqa: E402
except ImportError as err:  # plain onnxruntime (>= 1.20) has no training API at all
    raise BitfitError(
        f"onnxruntime {ort.__version__} has no on-device training API ({err}). "
        "Install onnxruntime-training-cpu==1.19.2, the last release that has it."
    ) from err

ort.set_default_logger_severity(3)  # ORT's INFO lines would drown the user's output

__all__ = ["ort", "training_api", "OrtValue"]
