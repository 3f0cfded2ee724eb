"""The built-in ``minilm`` bundle (packaged all-MiniLM-L6-v2 + mean pooling + a 3-label
head), exported once per session by the ``minilm_bundle`` fixture in conftest.py."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.integration

LABELS = ["negative", "neutral", "positive"]


@pytest.fixture(scope="module")
def torch_minilm():
    from bitfit.export.minilm import MeanPoolClassifier

    return MeanPoolClassifier.from_packaged(LABELS)


@pytest.fixture(scope="module")
def encoded(minilm_bundle):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm_bundle.file("tokenizer")))
    tokenizer.enable_padding()
    batch = tokenizer.encode_batch(["the service was slow and rude", "fine", "what a lovely surprise, thank you!"])
    return {"input_ids": np.array([e.ids for e in batch], np.int64),
            "attention_mask": np.array([e.attention_mask for e in batch], np.int64),
            "token_type_ids": np.array([e.type_ids for e in batch], np.int64)}


def test_minilm_bundle(minilm_bundle, torch_minilm, check_bundle):
    from tiny_models import bias_names

    expected = bias_names(torch_minilm)
    assert len(expected) == 50
    check_bundle(minilm_bundle, trainable=expected)
    m = minilm_bundle.manifest
    assert len(m.trainable) == 50
    assert all(t.role == "bias" for t in m.trainable)
    assert m.policy["trainable_values"] == sum(int(np.prod(t.shape)) for t in m.trainable) == 25_731
    assert m.policy["total_values"] == sum(p.numel() for p in torch_minilm.parameters())
    assert 0.0005 <= m.policy["fraction"] <= 0.002
    assert m.per_row is True
    assert m.labels == LABELS and m.task == "classification" and m.loss == "cross-entropy"
    assert m.source["kind"] == "minilm"
    assert m.text is not None and m.text.token_type_ids == "token_type_ids" and m.files["tokenizer"].path == "tokenizer.json"
    assert len(m.source["repairs"]["layernorm_stat_outputs"]) == 13
    v = m.validation
    assert v["inference_vs_source_max_abs_diff"] <= 1e-4
    assert v["one_step_frozen_unchanged"] is True
    assert v["one_step_trainable_changed"] == 50
    assert v["per_row_vs_row_by_row_max_abs_diff"] <= 1e-5


def test_minilm_inference_matches_torch_and_is_per_row(minilm_bundle, torch_minilm, encoded):
    import torch

    from bitfit.sdk.runtime import ort

    session = ort.InferenceSession(str(minilm_bundle.file("inference_model")), providers=["CPUExecutionProvider"])
    ours = session.run(["logits"], encoded)[0]
    with torch.no_grad():
        expected = torch_minilm(*[torch.from_numpy(encoded[k]) for k in ("input_ids", "attention_mask", "token_type_ids")]).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-4)

    base = minilm_bundle.trainable_base()
    rng = np.random.default_rng(0)
    rows = {t.name: np.stack([base[t.name] + rng.standard_normal(t.shape).astype(np.float32) * 0.05 for _ in range(3)])
            for t in minilm_bundle.manifest.trainable}
    together = session.run(["logits"], {**encoded, **rows})[0]
    apart = np.concatenate([session.run(["logits"], {**{k: v[i:i + 1] for k, v in encoded.items()},
                                                     **{k: v[i:i + 1] for k, v in rows.items()}})[0] for i in range(3)])
    np.testing.assert_allclose(together, apart, atol=1e-5)
    assert np.abs(together - ours).max() > 1e-4  # the per-row biases did change the logits
