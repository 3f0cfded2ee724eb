"""Bad input on a device gets the typed error that says what to do, and saves nothing."""

from __future__ import annotations

import numpy as np
import pytest

from bitfit.sdk import Personalizer
from bitfit.sdk.bundle import Bundle
from bitfit.sdk.errors import BackendUnavailableError, BitfitError, InvalidUserDataError
from bitfit.sdk.trainer import open_training_session

from sdk_fixtures import QUICK, numeric_data, text_data


def test_an_unknown_label_is_invalid_user_data_and_nothing_is_saved(text_bundle, tmp_path):
    p = Personalizer(text_bundle, store=tmp_path)
    data = text_data(12) + [("good great the movie was", "positive")]  # the bundle's labels are neg, pos
    with pytest.raises(InvalidUserDataError, match="positive"):
        p.personalize(data, user="alice", **QUICK)
    assert p.store.users() == []


def test_numeric_labels_out_of_range_and_wrong_shapes_are_refused(numeric_bundle, tmp_path):
    p = Personalizer(numeric_bundle, store=tmp_path)
    features, labels = numeric_data(12)
    with pytest.raises(InvalidUserDataError):
        p.personalize({"features": features, "labels": np.full_like(labels, 7)}, user="u", progress_bar=False)
    with pytest.raises(InvalidUserDataError):
        p.personalize({"features": features[:, :5], "labels": labels}, user="u", progress_bar=False)
    assert p.store.users() == []


def test_the_ort_training_backend_is_unavailable_on_plain_onnxruntime(text_bundle, tmp_path):
    assert Bundle.open(text_bundle).manifest.backend_available("ort-training")  # the bundle has its artifacts...
    p = Personalizer(text_bundle, store=tmp_path, backend="ort-training")
    with pytest.raises(BackendUnavailableError, match="onnxruntime-training"):  # ...but this runtime cannot run them
        p.personalize(text_data(12), user="alice", **QUICK)
    assert p.store.users() == []
    with pytest.raises(BackendUnavailableError):
        open_training_session(Bundle.open(text_bundle), backend="ort-training")
    with pytest.raises(BackendUnavailableError):
        import bitfit.sdk.ort_training  # noqa: F401
    assert issubclass(BackendUnavailableError, BitfitError)
