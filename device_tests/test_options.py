"""The shared options on plain onnxruntime: the bundle's training_defaults reach personalize,
CPU is the default for training and inference, store=None is one directory for Personalizer
and Predictor, store=False is the base model only, and wrong values are InvalidArgumentError."""

from __future__ import annotations

import pytest

from bitfit.sdk import Personalizer, Predictor
from bitfit.sdk.bundle import Bundle
from bitfit.sdk.errors import InvalidArgumentError
from bitfit.sdk.training_plan import learning_rate_for_size

from sdk_fixtures import PROBE_LABELS, PROBES, QUICK, text_data

TRAIN = {k: v for k, v in QUICK.items() if k != "learning_rate"}


def test_training_defaults_cpu_and_one_store(text_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data-home"))
    manifest = Bundle.open(text_bundle).manifest  # the rate for the model's size, recorded at export
    assert manifest.training_defaults == {"learning_rate": learning_rate_for_size(manifest.policy["total_values"])}
    p = Personalizer(text_bundle, verify="sizes")
    r = p.personalize(text_data(32), user="alice", **TRAIN)
    assert r.learning_rate == manifest.training_defaults["learning_rate"]
    assert p.store.load("alice").info["learning_rate_from"] == "bundle"
    predictor = Predictor(text_bundle, verify="sizes")
    assert predictor.store.root == p.store.root == tmp_path / "data-home" / "bitfit" / "deltas"
    assert predictor.predict(PROBES, user="alice").labels == PROBE_LABELS
    assert predictor.session.get_providers() == ["CPUExecutionProvider"]
    base = Predictor(text_bundle, store=False)
    assert base.predict(PROBES).labels == ["neg"] * 4
    with pytest.raises(InvalidArgumentError, match="no delta store"):
        base.predict(PROBES, user="alice")
    for bad in ({"providers": "gpu"}, {"verify": "sha"}, {"store": False}):
        with pytest.raises(InvalidArgumentError):
            Personalizer(text_bundle, **{"store": tmp_path / "s", **bad})
