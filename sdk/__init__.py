"""bitfit.sdk — the device side: personalize a bundle per user, store kilobyte deltas,
and serve every user's predictions from one shared session. Never imports torch.

Names are loaded on first use, so ``from bitfit.sdk import DeltaStore`` (a delta reader,
a store tool) does not load onnxruntime.

Example:
    >>> from bitfit.sdk import Personalizer
    >>> p = Personalizer("bundles/minilm-sentiment")                            # doctest: +SKIP
    >>> p.personalize([("great flight!", "positive"), ("delayed again", "negative")], user="alice")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Bundle": "bundle", "Manifest": "bundle",
    "Delta": "delta", "decode_delta": "delta", "encode_delta": "delta", "load_delta": "delta", "save_delta": "delta",
    "DeltaStore": "store",
    "Personalizer": "personalizer", "PersonalizeResult": "personalizer", "Progress": "personalizer",
    "Predictor": "predictor", "Prediction": "predictor",
    "open_training_session": "trainer", "PortableTrainingSession": "portable_trainer", "OrtTrainingSession": "trainer",
}
_ERRORS = (
    "BackendUnavailableError", "BitfitError", "BudgetExceededError", "BundleInvalidError", "DeltaCorruptError", "DeltaMismatchError",
    "DeltaNotFoundError", "DecryptionError", "InvalidArgumentError", "InvalidUserDataError", "ProviderUnavailableError", "ResourceExhaustedError",
    "StoreBusyError", "StoreReadError", "StoreWriteError", "TrainingDivergedError",
)
_EXPORTS.update({name: "errors" for name in _ERRORS})

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bitfit.sdk' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
