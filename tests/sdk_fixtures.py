"""Tiny bundles and synthetic data for the device-runtime tests (``tests/test_sdk_*.py``).

Import the fixtures into a test module with ``from sdk_fixtures import *``. Each bundle is
exported once per test process (a module-level cache), so several modules importing the
same fixture share one export.

- ``text_bundle``: a 2-layer, 32-wide BERT + mean pooling + Linear head over a WordLevel
  tokenizer of 48 words, labels ``["neg", "pos"]``, policy ``all-biases`` (per_row true).
  Its embeddings carry a sentiment direction but its head says "neg" for every 5-word
  sentence, so training the biases on ``text_data`` visibly moves predictions to "pos".
- ``text_head_bundle``: the same model with policy ``all-biases+head`` (per_row false).
- ``numeric_bundle``: an MLP over ``features: float32 [batch, 8]``, labels ``a, b, c``.

Example:
    >>> data = text_data(4, seed=0)
    >>> [label for _, label in data]
    ['pos', 'neg', 'pos', 'neg']
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

POS = ["good", "great", "nice", "love", "happy", "excellent", "fun", "awesome"]
NEG = ["bad", "awful", "poor", "hate", "sad", "terrible", "boring", "ugly"]
NEUTRAL = ["the", "a", "movie", "film", "was", "is", "it", "this", "really", "very", "show", "day", "food", "place",
           "and", "so", "quite", "my", "our", "plot", "story", "actor", "music", "time", "book", "game", "trip",
           "hotel", "one", "too"]
VOCAB = ["[PAD]", "[UNK]", *POS, *NEG, *NEUTRAL]
TEXT_LABELS = ["neg", "pos"]
NUMERIC_LABELS = ["a", "b", "c"]
FEATURES = 8
MAX_LENGTH = 48  # below the tiny BERT's 64 positions
# Five words per sentence as in training, so the probes sit where the base head says "neg".
PROBES = ["good great the movie was", "bad awful the film is", "love fun my trip too", "hate boring our hotel so"]
PROBE_LABELS = ["pos", "neg", "pos", "neg"]

_BUNDLES: dict[str, Path] = {}


def sentence(label: str, rng: np.random.Generator) -> str:
    """Two sentiment words of ``label`` and three neutral words, shuffled."""
    words = [*rng.choice(POS if label == "pos" else NEG, 2), *rng.choice(NEUTRAL, 3)]
    rng.shuffle(words)
    return " ".join(str(w) for w in words)


def text_data(count: int = 48, seed: int = 0) -> list[tuple[str, str]]:
    """``count`` distinct (sentence, label) pairs, alternating pos / neg."""
    rng = np.random.default_rng(seed)
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    while len(out) < count:
        label = TEXT_LABELS[1 - len(out) % 2]
        text = sentence(label, rng)
        if text not in seen:
            seen.add(text)
            out.append((text, label))
    return out


def numeric_data(count: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Float features [count, 8] and int labels in 0..2 (the label is the argmax of the first 3 features)."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(count, FEATURES)).astype(np.float32)
    return features, features[:, :3].argmax(axis=1).astype(np.int64)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, pairs: list[tuple[str, Any]]) -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(pairs)
    return path


def build_tokenizer(path: Path, pad_token: str = "[PAD]", vocab: list[str] | None = None) -> Path:
    """A WordLevel tokenizer over ``vocab`` with a Whitespace pre-tokenizer, padding with ``pad_token``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = vocab or VOCAB
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.enable_padding(pad_id=vocab.index(pad_token), pad_token=pad_token)
    tokenizer.save(str(path))
    return path


def build_text_model():
    """The tiny BERT classifier, calibrated as described in the module docstring."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from torch import nn
    from transformers import BertConfig, BertModel

    class TinyTextClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64, attn_implementation="eager")
            self.encoder = BertModel(config, add_pooling_layer=False)
            self.head = nn.Linear(32, len(TEXT_LABELS))

        def pooled(self, input_ids, attention_mask, token_type_ids):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.head(self.pooled(input_ids, attention_mask, token_type_ids))

    torch.manual_seed(0)
    model = TinyTextClassifier().eval()
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    calibration = text_data(100, seed=1)
    ids = torch.tensor([e.ids for e in tokenizer.encode_batch([t for t, _ in calibration])])
    mask, types = torch.ones_like(ids), torch.zeros_like(ids)
    is_pos = torch.tensor([label == "pos" for _, label in calibration])
    with torch.no_grad():
        embeddings = model.encoder.embeddings.word_embeddings.weight
        direction = torch.randn(32)
        direction /= direction.norm()
        for word in POS:
            embeddings[VOCAB.index(word)] += 0.1 * direction
        for word in NEG:
            embeddings[VOCAB.index(word)] -= 0.1 * direction
        pooled = model.pooled(ids, mask, types)
        axis = pooled[is_pos].mean(0) - pooled[~is_pos].mean(0)
        axis /= axis.norm()
        score = pooled @ axis
        middle = (score[is_pos].mean() + score[~is_pos].mean()) / 2
        # The head separates along the sentiment axis but is offset so every sentence reads "neg".
        offset = 2.0 * float(score.max() - middle) + 1.0
        model.head.weight.copy_(torch.stack([-axis, axis]) * 2.0)
        model.head.bias.copy_(torch.tensor([offset + 2.0 * float(middle), -offset - 2.0 * float(middle)]))
        assert bool((model(ids, mask, types).argmax(-1) == 0).all()), "the base should say 'neg' for everything"
    example = {"input_ids": ids[:2], "attention_mask": mask[:2], "token_type_ids": types[:2]}
    return model, example


def build_numeric_model():
    import torch
    from torch import nn

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, len(NUMERIC_LABELS))).eval()
    return model, {"features": torch.randn(2, FEATURES)}


def _export(name: str, factory) -> Path:
    # One export per process: session fixtures imported into several modules are separate
    # fixture definitions, but they share this cache.
    if name not in _BUNDLES:
        _BUNDLES[name] = factory()
    return _BUNDLES[name]


def _bundle_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if "__root__" not in _BUNDLES:
        _BUNDLES["__root__"] = tmp_path_factory.mktemp("sdk-bundles")
    return _BUNDLES["__root__"]


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export("tokenizer", lambda: build_tokenizer(_bundle_root(tmp_path_factory) / "tokenizer.json"))


def _text_bundle(tmp_path_factory: pytest.TempPathFactory, tokenizer_file: Path, name: str, policy: str) -> Path:
    def make() -> Path:
        from bitfit.export import export_bundle

        model, example = build_text_model()
        out = _bundle_root(tmp_path_factory) / name
        export_bundle(model, out, example_inputs=example, labels=TEXT_LABELS, tokenizer=tokenizer_file,
                      policy=policy, max_length=MAX_LENGTH)
        return out

    return _export(name, make)


@pytest.fixture(scope="session")
def text_bundle(tmp_path_factory: pytest.TempPathFactory, tokenizer_file: Path) -> Path:
    """The per-row tiny text bundle (policy all-biases)."""
    return _text_bundle(tmp_path_factory, tokenizer_file, "text", "all-biases")


@pytest.fixture(scope="session")
def text_head_bundle(tmp_path_factory: pytest.TempPathFactory, tokenizer_file: Path) -> Path:
    """The tiny text model with its head weight trainable too: per_row is false."""
    return _text_bundle(tmp_path_factory, tokenizer_file, "text-head", "all-biases+head")


@pytest.fixture(scope="session")
def numeric_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    def make() -> Path:
        from bitfit.export import export_bundle

        model, example = build_numeric_model()
        out = _bundle_root(tmp_path_factory) / "numeric"
        export_bundle(model, out, example_inputs=example, labels=NUMERIC_LABELS)
        return out

    return _export("numeric", make)


def all_files_sha256(bundle: Path) -> dict[str, str]:
    """sha256 of every file in a bundle directory (relative path -> hex)."""
    import hashlib

    return {str(p.relative_to(bundle)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(bundle).rglob("*")) if p.is_file()}


def delta_file(store_root: Path | str, user: str, version: int) -> Path:
    from bitfit.sdk.store import DeltaStore

    return DeltaStore(store_root).path_for(user) / f"v{version:06d}.delta"


QUICK = {"epochs": 4, "learning_rate": 1e-2, "batch_size": 8, "progress_bar": False}
"""Training options that make the tiny text model learn ``text_data`` in well under a second."""

__all__ = [
    "POS", "NEG", "NEUTRAL", "VOCAB", "TEXT_LABELS", "NUMERIC_LABELS", "FEATURES", "MAX_LENGTH", "PROBES", "PROBE_LABELS", "QUICK",
    "sentence", "text_data", "numeric_data", "write_jsonl", "write_csv", "build_tokenizer", "build_text_model",
    "build_numeric_model", "all_files_sha256", "delta_file", "tokenizer_file", "text_bundle", "text_head_bundle",
    "numeric_bundle",
]
