"""Tiny bundles of every task for the task tests (``tests/test_sdk_tasks.py``, ``tests/test_training_plan.py``).

Import into a test module with ``from task_fixtures import *``. Each bundle is exported once
per test process (the cache of ``sdk_fixtures``), portable backend only (``ort_training="never"``:
the tests are about what ``personalize`` decides, not the backend).

- ``bag_bundle(task)``: a bag-of-words text model (Embedding -> masked mean -> Linear -> tanh ->
  Linear) over ``sdk_fixtures.VOCAB`` with its WordLevel tokenizer, so text, ``bitfit
  personalize`` and ``bitfit predict`` work for ``classification`` (labels ``neg, pos``),
  ``regression`` (one output) and ``multilabel`` (labels ``MULTILABELS``).
- ``token_bundle``: ``tiny_models.token_tagger`` (input ``input_ids`` [batch, sequence] ->
  5 tags per token), token cross-entropy with ignore index -100; numeric arrays only.
- ``lm_bundle``: ``tiny_models.tiny_gpt2`` with a WordLevel tokenizer of ``LM_WORDS`` (its
  100-token vocabulary): a causal LM that learns from plain texts.
- ``pair_bundle``: an MLP over two numeric inputs ``a`` and ``b`` (labels ``a, b, c``).

``habit_data`` is labelled data for ``sdk_fixtures.numeric_bundle`` that training clearly helps.

Example:
    >>> lm_style(3, seed=0)[0].split()[:3]
    ['w15', 'w10', 'w11']
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sdk_fixtures import (  # noqa: F401
    VOCAB, _bundle_root, _export, build_tokenizer, numeric_data, sentence, tokenizer_file,
)

MULTILABELS = ["sport", "work", "family", "urgent"]
LM_WORDS = ["[PAD]", "[UNK]", *[f"w{i}" for i in range(98)]]
"""100 words: the vocabulary size of ``tiny_models.tiny_gpt2``."""
LM_CYCLE = 6
"""The user's style: the words w10..w15 in a fixed cycle, so every next word is predictable."""


def build_bag_model(outputs: int, seed: int = 0):
    """The bag-of-words text model with ``outputs`` outputs, and example inputs for export."""
    import torch
    from torch import nn

    class BagOfWords(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(len(VOCAB), 16)
            self.hidden = nn.Linear(16, 16)
            self.head = nn.Linear(16, outputs)

        def forward(self, input_ids, attention_mask):
            mask = attention_mask.unsqueeze(-1).to(torch.float32)
            pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            return self.head(torch.tanh(self.hidden(pooled)))

    torch.manual_seed(seed)
    model = BagOfWords().eval()
    ids = torch.randint(2, len(VOCAB), (2, 5))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def build_pair_model():
    """An MLP over two numeric inputs ``a: [batch, 3]`` and ``b: [batch, 2]``."""
    import torch
    from torch import nn

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(5, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, a, b):
            return self.head(torch.tanh(self.body(torch.cat([a, b], dim=-1))))

    torch.manual_seed(2)
    return Pair().eval(), {"a": torch.randn(2, 3), "b": torch.randn(2, 2)}


def bag_texts(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct five-word sentences of ``sdk_fixtures.VOCAB`` words."""
    rng = np.random.default_rng(seed)
    out: dict[str, None] = {}
    while len(out) < count:
        out[sentence("pos" if rng.random() < 0.5 else "neg", rng)] = None
    return list(out)


def habit_data(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``sdk_fixtures.numeric_data`` for a user who says 'c' (class 2) ~70% of the time: a
    habit the numeric bundle's biases learn clearly, whatever the holdout split."""
    features, labels = numeric_data(count, seed)
    habit = np.random.default_rng(seed + 100).random(count) < 0.7
    return features, np.where(habit, 2, labels)


def lm_style(count: int, seed: int = 0, lengths: tuple[int, int] = (4, 20)) -> list[str]:
    """Texts in the user's style: ``LM_CYCLE`` words in a fixed order, from a random start."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        start, length = int(rng.integers(0, LM_CYCLE)), int(rng.integers(*lengths))
        out.append(" ".join(f"w{10 + (start + k) % LM_CYCLE}" for k in range(length)))
    return out


def _export_to(name: str, tmp_path_factory: pytest.TempPathFactory, model_and_inputs, **options) -> Path:
    def make() -> Path:
        from bitfit.export import export_bundle

        model, inputs = model_and_inputs()
        out = _bundle_root(tmp_path_factory) / name
        export_bundle(model, out, example_inputs=inputs, ort_training="never", **options)
        return out

    return _export(name, make)


@pytest.fixture(scope="session")
def bag_bundle(tmp_path_factory: pytest.TempPathFactory, tokenizer_file: Path):
    """``bag_bundle(task)`` -> the bag-of-words text bundle of ``task``, exported on first use."""
    options = {
        "classification": (2, {"labels": ["neg", "pos"]}),
        "regression": (1, {}),
        "multilabel": (len(MULTILABELS), {"labels": MULTILABELS}),
    }

    def get(task: str) -> Path:
        outputs, extra = options[task]
        return _export_to(f"bag-{task}", tmp_path_factory, lambda: build_bag_model(outputs), task=task,
                          tokenizer=tokenizer_file, max_length=16, **extra)

    return get


@pytest.fixture(scope="session")
def token_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import tiny_models as tm

    return _export_to("token-tagger", tmp_path_factory, tm.token_tagger, task="token-classification")


@pytest.fixture(scope="session")
def lm_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import tiny_models as tm

    words = _export("lm-tokenizer", lambda: build_tokenizer(_bundle_root(tmp_path_factory) / "lm-tokenizer.json",
                                                            vocab=LM_WORDS))
    return _export_to("lm", tmp_path_factory, tm.tiny_gpt2, task="causal-lm", tokenizer=words, max_length=32)


@pytest.fixture(scope="session")
def pair_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export_to("pair", tmp_path_factory, build_pair_model, labels=["a", "b", "c"])


__all__ = ["MULTILABELS", "LM_WORDS", "LM_CYCLE", "build_bag_model", "build_pair_model", "bag_texts", "habit_data", "lm_style",
           "tokenizer_file", "bag_bundle", "token_bundle", "lm_bundle", "pair_bundle"]
