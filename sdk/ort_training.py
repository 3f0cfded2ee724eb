"""The one place that imports onnxruntime's on-device training API (onnxruntime-training
1.19.2, the ``ort-training`` backend), torch-free.

Why: in onnxruntime-training 1.19.2 ``onnxruntime.training/__init__`` imports its
``amp``/``optim`` subpackages, which import torch. :mod:`bitfit.sdk.runtime` registers a
bare ``onnxruntime.training`` package object before the first import, so that
``onnxruntime.training.api`` (pure C++ bindings plus thin wrappers) loads on its own:
57 MB RSS instead of failing. See ../shared/ORT_TRAINING_NOTES.md, "Runtime facts".
Plain onnxruntime (>= 1.20) has no training API: importing this module there raises
:class:`~bitfit.sdk.errors.BackendUnavailableError`; the ``portable`` backend needs none.

Example:
    >>> from bitfit.sdk.runtime import has_training_api
    >>> if has_training_api():
    ...     from bitfit.sdk.ort_training import training_api
    ...     assert hasattr(training_api, "Module")
"""

from __future__ import annotations

from .errors import BackendUnavailableError
from .runtime import INSTALL_HINT, ort

try:
    import onnxruntime.training.api as training_api  # noqa: E402
    from onnxruntime.capi.onnxruntime_inference_collection import OrtValue  # noqa: E402
except ImportError as err:  # plain onnxruntime (>= 1.20) has no training API at all
    raise BackendUnavailableError(
        f"onnxruntime {ort.__version__} has no on-device training API ({err}): the 'ort-training' backend needs "
        "onnxruntime-training-cpu==1.19.2 (`pip install 'bitfit[ort-training]'`, not beside plain onnxruntime). "
        "Bundles with a portable training model train on plain onnxruntime with backend='portable'."
    ) from err

__all__ = ["ort", "training_api", "OrtValue"]
