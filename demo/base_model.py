"""The base model every demo user starts from, built by one recipe that the demo story
(``python -m demo``) and the benchmarks (``benchmarks/``) share, so README's demo table and
BENCHMARKS.md measure the same kind of base model.

The recipe: an encoder with masked mean pooling (``MeanPoolClassifier``) gets a linear head
trained as a logistic regression (full-batch Adam, a small L2 on the weight) on cached
embeddings of a *general* slice of examples, 80% to train and 20% to check it; then
``export_bundle`` writes the bias-only training bundle. Text is tokenized by the SDK's own
``bitfit.sdk.data.TextEncoder`` (its truncation and pad id), the same code that tokenizes
on the device.

Workstation side: imports torch and ``bitfit.export``.

Example:
    >>> from demo.base_model import HEAD_STEPS, MAX_LENGTH, text_encoder
    >>> HEAD_STEPS, MAX_LENGTH
    (300, 64)
    >>> from bitfit.export.minilm import minilm_dir
    >>> encoder = text_encoder(minilm_dir() / "tokenizer.json")          # doctest: +SKIP
    >>> sorted(encoder.feeds_for_texts(["great crew!"]))                  # doctest: +SKIP
    ['attention_mask', 'input_ids', 'token_type_ids']
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from bitfit.sdk.bundle import TextSpec
from bitfit.sdk.data import TextEncoder

MAX_LENGTH = 64
EMBED_BATCH = 64
HEAD_STEPS = 300
HEAD_LEARNING_RATE = 1e-2
HEAD_L2 = 1e-2  # with 480-1200 examples in 384 dims, less L2 overfits (held-out accuracy 0.61-0.67)
VALID_FRACTION = 0.2


def text_encoder(tokenizer_file: str | os.PathLike, max_length: int = MAX_LENGTH) -> TextEncoder:
    """The SDK's ``TextEncoder`` for a tokenizer file, before any bundle exists.

    ``TextEncoder`` reads a bundle's text spec and tokenizer file; this hands it exactly those
    two, so the head is trained on the arrays the device will feed.

    Example:
        >>> from bitfit.export.minilm import minilm_dir
        >>> feeds = text_encoder(minilm_dir() / "tokenizer.json", 8).feeds_for_texts(["a b", "a b c d e f g h i j"])
        >>> feeds["input_ids"].shape, feeds["attention_mask"].sum(1).tolist()
        ((2, 8), [4, 8])
    """
    spec = TextSpec(tokenizer=Path(tokenizer_file).name, max_length=max_length, input_ids="input_ids",
                    attention_mask="attention_mask", token_type_ids="token_type_ids")
    # TextEncoder needs only these two of a Bundle (sdk/data.py); a bundle is written after the head exists.
    source = SimpleNamespace(manifest=SimpleNamespace(text=spec), file=lambda key: Path(tokenizer_file))
    return TextEncoder(source)  # type: ignore[arg-type]


def embed_texts(model: Any, encoder: TextEncoder, texts: Sequence[str], *, desc: str | None = None) -> np.ndarray:
    """Mean-pooled embeddings (``model.embed``) of ``texts``, in batches of similar length.

    Example:
        >>> from benchmarks.workspace import build_model, tokenizer_file
        >>> x = embed_texts(build_model("tiny"), text_encoder(tokenizer_file()), ["great crew!", "late again"])
        >>> x.shape, x.dtype
        ((2, 32), dtype('float32'))
    """
    import torch
    from tqdm.auto import tqdm

    ids, types = encoder.encode(list(texts))
    order = np.argsort([len(x) for x in ids], kind="stable")  # less padding per batch
    out = np.zeros((len(texts), model.head.in_features), np.float32)
    model.eval()
    with torch.no_grad():
        for start in tqdm(range(0, len(texts), EMBED_BATCH), desc=desc or "embedding", unit="batch", leave=False,
                          disable=None if desc else True):
            index = order[start:start + EMBED_BATCH]
            feeds = encoder.pad([ids[i] for i in index], [types[i] for i in index])
            out[index] = model.embed(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
    return out


def train_head(head: Any, embeddings: np.ndarray, labels: np.ndarray, train: np.ndarray,
               valid: np.ndarray) -> tuple[float, float]:
    """Logistic regression on cached embeddings, in place: ``HEAD_STEPS`` full-batch Adam steps
    with L2 ``HEAD_L2`` on the weight. Returns the accuracy on ``train`` and on ``valid``.

    Example:
        >>> import torch
        >>> head = torch.nn.Linear(2, 2)
        >>> x = np.array([[1, 0], [0, 1], [1, 0.1], [0.1, 1]], np.float32)
        >>> train_head(head, x, np.array([0, 1, 0, 1]), np.arange(2), np.arange(2, 4))
        (1.0, 1.0)
    """
    import torch
    from tqdm.auto import tqdm

    x, y = torch.from_numpy(embeddings), torch.from_numpy(np.asarray(labels, np.int64))
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(head.parameters(), lr=HEAD_LEARNING_RATE)
    for _ in tqdm(range(HEAD_STEPS), desc="training the head", unit="step", leave=False, disable=None):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x[train]), y[train]) + HEAD_L2 * head.weight.pow(2).sum()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        predicted = head(x).argmax(-1)
    valid_acc = float((predicted[valid] == y[valid]).float().mean()) if len(valid) else float("nan")
    return float((predicted[train] == y[train]).float().mean()), valid_acc


def fit_base_head(model: Any, encoder: TextEncoder, examples: Sequence[tuple[str, str]], labels: Sequence[str],
                  *, verbose: bool = False) -> dict[str, Any]:
    """Train ``model.head`` in place by the recipe on ``examples`` ((text, label) pairs).

    Returns the numbers: examples, head accuracy on its 80% and on the 20% it did not see, seconds.

    Example:
        >>> from benchmarks.workspace import build_model, tokenizer_file, synthetic_corpus
        >>> model, general = build_model("tiny"), synthetic_corpus(general_size=40).general
        >>> info = fit_base_head(model, text_encoder(tokenizer_file()), general, ["negative", "neutral", "positive"])
        >>> info["general_examples"], info["head_train_examples"], info["head_valid_examples"]
        (40, 32, 8)
    """
    t = time.perf_counter()
    embeddings = embed_texts(model, encoder, [text for text, _ in examples],
                             desc="embedding the general slice" if verbose else None)
    embed_seconds = time.perf_counter() - t
    y = np.array([list(labels).index(label) for _, label in examples], np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    cut = int(len(order) * VALID_FRACTION)
    valid, train = order[:cut], order[cut:]
    t = time.perf_counter()
    train_acc, valid_acc = train_head(model.head, embeddings, y, train, valid)
    head_seconds = time.perf_counter() - t
    if verbose:
        print(f"head: {HEAD_STEPS} Adam steps on cached embeddings in {head_seconds:.1f} s; accuracy {train_acc:.3f} "
              f"on its {len(train)} training examples, {valid_acc:.3f} on {len(valid)} held-out general examples")
    return {"general_examples": len(y), "head_train_examples": len(train), "head_valid_examples": len(valid),
            "head_train_accuracy": train_acc, "head_valid_accuracy": valid_acc, "embed_seconds": embed_seconds,
            "head_seconds": head_seconds}


def build_base_bundle(examples: Sequence[tuple[str, str]], bundle_dir: str | os.PathLike, labels: Sequence[str], *,
                      model: Any = None, tokenizer_file: str | os.PathLike | None = None,
                      max_length: int = MAX_LENGTH, verbose: bool = False) -> tuple[Any, Any, dict[str, Any]]:
    """The whole recipe: the packaged MiniLM (or ``model``) + a head fitted on ``examples``,
    exported to ``bundle_dir``. Returns ``(torch model, Bundle, numbers)``.

    Example:
        >>> model, bundle, info = build_base_bundle(general, "demo_out/bundle", ["negative", "neutral", "positive"])  # doctest: +SKIP
        >>> bundle.manifest.labels, info["head_valid_accuracy"] > 0.6                                                 # doctest: +SKIP
        (['negative', 'neutral', 'positive'], True)
    """
    from bitfit.export import export_bundle
    from bitfit.export.minilm import MeanPoolClassifier, example_text_inputs, minilm_dir

    labels = list(labels)
    tokenizer_file = Path(tokenizer_file) if tokenizer_file else minilm_dir() / "tokenizer.json"
    load_seconds = 0.0
    if model is None:
        with quiet_transformers():
            t = time.perf_counter()
            model = MeanPoolClassifier.from_packaged(labels)
            load_seconds = time.perf_counter() - t
        if verbose:
            print(f"model: packaged all-MiniLM-L6-v2 + mean pooling + linear head over {labels} ({load_seconds:.1f} s to load)")
    info = {"load_seconds": load_seconds,
            **fit_base_head(model, text_encoder(tokenizer_file, max_length), examples, labels, verbose=verbose)}
    if verbose:
        print("export: torch module -> ONNX -> bias-only training bundle ...", flush=True)
    t = time.perf_counter()
    bundle = export_bundle(model, bundle_dir, example_inputs=example_text_inputs(tokenizer_file, max_length), labels=labels,
                           tokenizer=tokenizer_file, max_length=max_length, overwrite=True)
    info["export_seconds"] = time.perf_counter() - t
    return model, bundle, info


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' warning about loading the encoder without its pooler (intended).

    Example:
        >>> with quiet_transformers():
        ...     pass
    """
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
