"""The delta store on a device: versions, continuing from the last delta, rollback that the
predictor follows, and encryption at rest."""

from __future__ import annotations

import os

import numpy as np
import pytest

from bitfit.sdk import DeltaStore, Personalizer, Predictor
from bitfit.sdk.errors import DecryptionError

from sdk_fixtures import PROBE_LABELS, PROBES, QUICK, delta_file, text_data


def test_versions_continue_and_rollback_restores_the_old_predictions(text_bundle, tmp_path):
    p = Personalizer(text_bundle, store=tmp_path)
    first = p.personalize(text_data(24), user="alice", max_steps=2, **{**QUICK, "learning_rate": 3e-3})
    v1 = p.predict(PROBES, user="alice").logits
    second = p.personalize(text_data(48, seed=1), user="alice", **QUICK)
    v2 = p.predict(PROBES, user="alice")
    assert (first.version, second.version) == (1, 2)
    assert (first.started_from, second.started_from) == ("base", "previous-delta")
    assert p.store.versions("alice") == [1, 2] and p.store.current_version("alice") == 2
    assert v2.labels == PROBE_LABELS
    assert np.abs(v2.logits - v1).max() > 1e-3

    assert p.store.rollback("alice") == 1 and p.store.current_version("alice") == 1
    np.testing.assert_allclose(p.predict(PROBES, user="alice").logits, v1, atol=1e-6)
    # Another process's view of the same store follows the rollback too.
    np.testing.assert_allclose(Predictor(text_bundle, tmp_path).predict(PROBES, user="alice").logits, v1, atol=1e-6)

    third = p.personalize(text_data(24, seed=2), user="alice", max_steps=1, **QUICK)
    assert third.version == 3 and p.store.versions("alice") == [1, 2, 3]  # versions are never reused
    p.store.delete("alice")
    assert p.store.users() == []
    np.testing.assert_array_equal(p.predict(PROBES, user="alice").logits, p.predict(PROBES).logits)


def test_an_encrypted_delta_needs_its_key(text_bundle, tmp_path):
    key = os.urandom(32)
    p = Personalizer(text_bundle, store=tmp_path, key=key)
    p.personalize(text_data(48), user="alice", **QUICK)
    raw = delta_file(tmp_path, "alice", 1).read_bytes()
    assert b"__metadata__" not in raw and b"base_fingerprint" not in raw  # not a plain safetensors file
    assert Personalizer(text_bundle, store=tmp_path, key=key).predict(PROBES, user="alice").labels == PROBE_LABELS
    with pytest.raises(DecryptionError):
        DeltaStore(tmp_path, key=os.urandom(32)).load("alice")
    served = Predictor(text_bundle, DeltaStore(tmp_path, key=os.urandom(32))).predict(PROBES, user="alice")
    assert served.labels == ["neg"] * 4 and "alice" in served.fallbacks  # the base, said so
