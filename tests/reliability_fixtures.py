"""Tiny bundles, data and child-process programs for the reliability tests.

Two bundles are built once per test session (``text_bundle``, ``numeric_bundle``):

- TEXT: a 2-layer, 32-wide BERT (eager attention) + mean pooling + a Linear head over a
  60-word WordLevel tokenizer, labels ``["neg", "pos"]``;
- NUMERIC: an MLP over float ``x: [batch, 8]``, labels ``["a", "b", "c"]``.

This module is also the program the crash and concurrency tests start as a child
process (``python tests/reliability_fixtures.py <mode> ...``); importing it costs
nothing (torch and onnxruntime are imported inside the functions that need them), so
a child that only saves deltas starts in a fraction of a second.

Example:
    >>> texts, labels = zip(*text_data(4))
    >>> sorted(set(labels)) == ["neg", "pos"]
    True
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

TEXT_LABELS = ["neg", "pos"]
NUMERIC_LABELS = ["a", "b", "c"]
NUMERIC_WIDTH = 8
MAX_LENGTH = 32

POSITIVE = ["good", "great", "fine", "happy", "love", "nice", "best", "fun", "calm", "warm"]
NEGATIVE = ["bad", "awful", "sad", "hate", "poor", "worst", "late", "cold", "rude", "slow"]
NEUTRAL = [
    "the", "a", "flight", "food", "seat", "crew", "bag", "gate", "day", "trip", "was", "is", "very", "so",
    "and", "but", "my", "our", "this", "that", "today", "again", "service", "staff", "time", "plane",
    "airport", "hotel", "room", "coffee", "music", "movie", "book", "game", "city", "road", "train", "bus",
]
WORDS = POSITIVE + NEGATIVE + NEUTRAL  # 58 words + [PAD] + [UNK] = 60 tokens

_BUILD_LOCK = threading.Lock()
_BUILT: dict[str, Path] = {}


# ------------------------------------------------------------------------------ data


def text_data(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """``count`` distinct (text, label) pairs; the label follows the sentiment words used.

    Example:
        >>> text_data(2, seed=1)[0][1] in ("neg", "pos")
        True
    """
    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    while len(out) < count:
        label = rng.choice(TEXT_LABELS)
        pool = POSITIVE if label == "pos" else NEGATIVE
        words = rng.sample(NEUTRAL, rng.randint(2, 6)) + rng.sample(pool, rng.randint(1, 2))
        rng.shuffle(words)
        text = " ".join(words)
        if text not in seen:
            seen.add(text)
            out.append((text, label))
    return out


def numeric_data(count: int, seed: int = 0) -> dict[str, Any]:
    """``{"x": float32 [count, 8], "labels": [count] ints}``; the label is the argmax of 3 sums.

    Example:
        >>> d = numeric_data(5); d["x"].shape, len(d["labels"])
        ((5, 8), 5)
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, NUMERIC_WIDTH)).astype(np.float32)
    labels = np.stack([x[:, 0:3].sum(1), x[:, 3:6].sum(1), x[:, 6:8].sum(1)], 1).argmax(1)
    return {"x": x, "labels": labels.astype(np.int64)}


# ------------------------------------------------------------------------------ bundles


def build_tokenizer(path: Path) -> Path:
    """A WordLevel tokenizer over ``WORDS`` with [PAD]=0 and [UNK]=1, saved as tokenizer.json."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(path))
    return path


def _text_module(seed: int = 0):
    import torch
    from torch import nn
    from transformers import BertConfig, BertModel

    class MeanPoolBert(nn.Module):
        """BERT encoder -> masked mean over tokens -> Linear head."""

        def __init__(self) -> None:
            super().__init__()
            config = BertConfig(
                vocab_size=len(WORDS) + 2, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=64, attn_implementation="eager",
            )
            self.encoder = BertModel(config, add_pooling_layer=False)
            self.head = nn.Linear(32, len(TEXT_LABELS))

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            return self.head(pooled)

    torch.manual_seed(seed)
    model = MeanPoolBert().eval()
    with torch.no_grad():
        # Random init zeroes every bias; the exporter would merge identical zero tensors.
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.02)
    ids = torch.tensor([[2, 5, 9, 30, 0, 0], [3, 4, 40, 41, 42, 7]], dtype=torch.long)
    mask = (ids != 0).long()
    return model, {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def _numeric_module(seed: int = 0):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(NUMERIC_WIDTH, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, len(NUMERIC_LABELS))).eval()
    return model, {"x": torch.randn(2, NUMERIC_WIDTH)}


def build_text_bundle(out: Path, *, seed: int = 0, optimizer: str = "adamw"):
    """Export the tiny text bundle to ``out`` (a few seconds)."""
    from bitfit.export import export_bundle

    model, inputs = _text_module(seed)
    tokenizer = build_tokenizer(out.parent / f"tokenizer-{out.name}.json")
    return export_bundle(model, out, example_inputs=inputs, labels=TEXT_LABELS, tokenizer=tokenizer,
                         max_length=MAX_LENGTH, optimizer=optimizer)


def build_numeric_bundle(out: Path, *, seed: int = 0, optimizer: str = "adamw"):
    """Export the tiny numeric (MLP) bundle to ``out`` (about a second)."""
    from bitfit.export import export_bundle

    model, inputs = _numeric_module(seed)
    return export_bundle(model, out, example_inputs=inputs, labels=NUMERIC_LABELS, optimizer=optimizer)


def cached_bundle(kind: str, base: Path) -> Path:
    """Build a bundle once per process under ``base`` and return its path.

    ``kind``: "text", "numeric", "numeric-other" (same MLP, other weights: another base
    fingerprint), "numeric-sgd", "text-sgd". Tests must not modify the returned directory:
    copy it (``copy_bundle``) first.
    """
    builders = {
        "text": lambda p: build_text_bundle(p),
        "text-sgd": lambda p: build_text_bundle(p, optimizer="sgd"),
        "numeric": lambda p: build_numeric_bundle(p),
        "numeric-other": lambda p: build_numeric_bundle(p, seed=1),
        "numeric-sgd": lambda p: build_numeric_bundle(p, optimizer="sgd"),
    }
    with _BUILD_LOCK:
        if kind not in _BUILT:
            path = base / f"bundle-{kind}"
            builders[kind](path)
            _BUILT[kind] = path
        return _BUILT[kind]


def copy_bundle(src: Path, dst: Path) -> Path:
    """A writable copy of a bundle directory."""
    shutil.copytree(src, dst)
    return dst


def rewrite_manifest(bundle_dir: Path, edit) -> None:
    """Apply ``edit(raw_dict)`` to manifest.json and re-hash every listed file.

    Simulates an attacker who can rewrite the manifest and its hashes together.
    """
    from bitfit.sdk.bundle import sha256_file

    path = bundle_dir / "manifest.json"
    raw = json.loads(path.read_text())
    edit(raw)
    for entry in raw["files"].values():
        file = bundle_dir / entry["path"]
        if file.is_file() and not os.path.isabs(entry["path"]) and ".." not in entry["path"]:
            entry["sha256"], entry["bytes"] = sha256_file(file), file.stat().st_size
    from bitfit.sdk.bundle import manifest_checksum

    raw["checksum"] = manifest_checksum(raw)
    path.write_text(json.dumps(raw, indent=2))


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative posix path -> bytes), for "nothing changed" checks."""
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ child programs


def _say(*parts: Any) -> None:
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    sys.stdout.flush()


def child_save_loop(root: str, users: list[str], seed: int) -> None:
    """Save deltas for ``users`` round-robin forever; after each save print ``saved <user#> <i> <version>``.

    Delta ``i`` holds tensors filled with ``i`` and ``info={"i": i}``, so a reader can
    check that a loaded version's content is the one written with it.
    """
    import numpy as np

    from bitfit.sdk.delta import Delta
    from bitfit.sdk.store import DeltaStore

    store = DeltaStore(root, retention=3)
    rng = random.Random(seed)
    i = seed * 1_000_000
    _say("ready")
    while True:
        u = rng.randrange(len(users))
        i += 1
        delta = Delta({"a.bias": np.full(64, float(i % 60000)), "b.bias": np.full(16, float(u))},
                      "sha256:" + "ab" * 32, "fp32", info={"i": i, "user": u})
        version = store.save(users[u], delta)
        _say("saved", u, i, version)


def child_personalize_loop(bundle: str, root: str, user: str, seed: int, count: int) -> None:
    """Personalize ``user`` ``count`` times (0 = forever); print ``saved <version>`` after each."""
    from bitfit.sdk.personalizer import Personalizer

    p = Personalizer(bundle, root, verify="none", threads=1)
    data = text_data(12, seed=seed) if p.bundle.manifest.text else numeric_data(12, seed=seed)
    _say("ready")
    n = 0
    while count == 0 or n < count:
        n += 1
        result = p.personalize(data, user=user, epochs=1, batch_size=4, seed=seed + n, progress_bar=False)
        _say("saved", result.version)


def child_save_bundle_loop(bundle: str, root: str, user: str, seed: int, seconds: float) -> None:
    """Save valid random deltas for ``bundle`` as fast as possible for ``seconds`` (retention 2, so
    versions are pruned under concurrent readers); print ``saved <version>`` after each."""
    import time

    import numpy as np

    from bitfit.sdk.bundle import Bundle
    from bitfit.sdk.delta import Delta
    from bitfit.sdk.store import DeltaStore

    manifest = Bundle.open(bundle, verify="none").manifest
    store = DeltaStore(root, retention=2)
    rng = np.random.default_rng(seed)
    _say("ready")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        tensors = {t.name: rng.normal(0, 0.05, t.shape) for t in manifest.trainable}
        _say("saved", store.save(user, Delta(tensors, manifest.base_fingerprint)))


def child_predict_loop(bundle: str, root: str, user: str, seconds: float) -> None:
    """Predict for ``user`` for ``seconds``, checking as it goes; print one ``error <why>`` line per
    problem (an exception, a fallback, the current version going back) and ``done <predictions>
    <distinct versions seen>`` at the end. Printing only problems keeps the pipe from filling up."""
    import time

    from bitfit.sdk.personalizer import Personalizer

    p = Personalizer(bundle, root, verify="none", threads=1)
    inputs = [t for t, _ in text_data(3)] if p.bundle.manifest.text else {"x": numeric_data(3)["x"]}
    _say("ready")
    end = time.monotonic() + seconds
    count, last, seen = 0, 0, set()
    while time.monotonic() < end:
        try:
            before = p.store.current_version(user) or 0
            prediction = p.predict(inputs, user=user)
            after = p.store.current_version(user) or 0
        except Exception as err:  # the test fails on any line starting with "error"
            _say("error", repr(err).replace("\n", " "))
            continue
        count += 1
        seen.update((before, after))
        if not last <= before <= after:
            _say("error", f"versions went back: {last} then {before}..{after}")
        if prediction.fallbacks:
            _say("error", "fallback", json.dumps(prediction.fallbacks))
        last = after
    _say("done", count, len(seen - {0}))


def _main(argv: list[str]) -> None:
    mode, args = argv[0], argv[1:]
    if mode == "save-loop":
        child_save_loop(args[0], json.loads(args[1]), int(args[2]))
    elif mode == "personalize":
        child_personalize_loop(args[0], args[1], args[2], int(args[3]), int(args[4]))
    elif mode == "save-bundle-loop":
        child_save_bundle_loop(args[0], args[1], args[2], int(args[3]), float(args[4]))
    elif mode == "predict":
        child_predict_loop(args[0], args[1], args[2], float(args[3]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


# ------------------------------------------------------------------------------ pytest glue


def session_bundle(kind: str):
    """A session-scoped pytest fixture returning the path of the ``kind`` bundle (built once).

    Use in a test module as ``text_bundle = session_bundle("text")``.
    """
    import pytest

    @pytest.fixture(scope="session")
    def _fixture(tmp_path_factory) -> Path:
        base = tmp_path_factory.getbasetemp() / "reliability-bundles"
        base.mkdir(exist_ok=True)
        return cached_bundle(kind, base)

    return _fixture


def stress() -> bool:
    """True when the long stress mode is on (``BITFIT_STRESS=1``)."""
    return os.environ.get("BITFIT_STRESS", "") not in ("", "0")


if __name__ == "__main__":
    _main(sys.argv[1:])

