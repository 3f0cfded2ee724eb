"""The device runtime on the real packaged MiniLM and real tweets (one slow test).

Uses the session ``minilm_bundle`` of tests/conftest.py (exported once per session).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from bitfit.sdk import Personalizer

DELTA_BUDGET = 52 * 1024  # bytes: docs/delta-format.md, "within the 52 KiB a delta may take"


@pytest.mark.integration
def test_minilm_personalizes_on_real_tweets_within_the_delta_budget(minilm_bundle, tmp_path):
    from demo.datasets import load_tweets, sample

    tweets = [(t.text, t.label) for t in sample(load_tweets(), 60, seed=0)]
    weights = minilm_bundle.file("weights")
    weights_sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    p = Personalizer(minilm_bundle, store=tmp_path)
    texts = [t for t, _ in tweets[:16]]
    base = p.predict(texts)

    seen = []
    # No holdout: with 9 holdout tweets, 6 steps rarely beat the start, and the best-epoch rule
    # would then keep the base (an all-zero delta); here every step counts.
    r = p.personalize(tweets, user="alice", max_steps=6, batch_size=16, learning_rate=5e-3, holdout=0.0,
                      progress=seen.append, progress_bar=False)

    assert r.steps == 6 == len(seen) and r.stopped_by == "steps" and r.encoding == "fp16"
    assert r.examples_used == 60 - r.duplicates_removed and r.holdout_examples == 0
    assert all(np.isfinite(s.loss) for s in seen)
    manifest = minilm_bundle.manifest
    delta = p.store.load("alice")
    assert {n: a.shape for n, a in delta.tensors.items()} == {t.name: tuple(t.shape) for t in manifest.trainable}
    assert len(delta.tensors) == 50 and manifest.policy["trainable_values"] == 25731
    path = p.store.path_for("alice") / "v000001.delta"
    assert r.delta_bytes == path.stat().st_size
    assert r.delta_bytes <= DELTA_BUDGET, f"fp16 MiniLM delta is {r.delta_bytes} bytes, over {DELTA_BUDGET}"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == weights_sha

    after = p.predict(texts, user="alice")
    assert after.labels[0] in manifest.labels and after.probabilities.shape == (16, 3)
    assert not np.allclose(after.logits, base.logits)
    np.testing.assert_array_equal(p.predict(texts).logits, base.logits)
    mixed = p.predict(texts, user=["alice", None] * 8)
    np.testing.assert_allclose(mixed.logits[0::2], after.logits[0::2], atol=1e-4)
    np.testing.assert_allclose(mixed.logits[1::2], base.logits[1::2], atol=1e-4)
