"""bitfit.sdk — the device side: personalize a bundle per user, store kilobyte deltas,
and serve every user's predictions from one shared session. Never imports torch.

Example:
    >>> from bitfit.sdk import Personalizer
    >>> p = Personalizer("bundles/minilm-sentiment")                            # doctest: +SKIP
    >>> p.personalize([("great flight!", "positive"), ("delayed again", "negative")], user="alice")  # doctest: +SKIP
"""

from .bundle import Bundle, Manifest
from .delta import Delta, decode_delta, encode_delta, load_delta, save_delta
from .errors import (
    BitfitError, BudgetExceededError, BundleInvalidError, DeltaCorruptError, DeltaMismatchError,
    DeltaNotFoundError, InvalidUserDataError, ProviderUnavailableError, StoreBusyError, StoreWriteError,
    TrainingDivergedError,
)
from .personalizer import PersonalizeResult, Personalizer, Progress
from .predictor import Prediction, Predictor
from .store import DeltaStore

__all__ = [
    "Bundle", "Manifest", "Delta", "DeltaStore", "Personalizer", "PersonalizeResult", "Progress", "Predictor",
    "Prediction", "decode_delta", "encode_delta", "load_delta", "save_delta", "BitfitError", "BudgetExceededError",
    "BundleInvalidError", "DeltaCorruptError", "DeltaMismatchError", "DeltaNotFoundError", "InvalidUserDataError",
    "ProviderUnavailableError", "StoreBusyError", "StoreWriteError", "TrainingDivergedError",
]
