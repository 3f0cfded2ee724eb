"""Export tiny bundles to try the device examples with (workstation side: uses torch).

Writes, under OUT (default ``tiny_bundles/``), in a few seconds:

- ``tiny-text/``: a 3-way sentiment classifier over short messages (word embedding ->
  masked mean pooling -> Linear -> tanh -> LayerNorm -> Linear), with a word-level
  ``tokenizer.json`` built from the built-in messages of ``example_data.py``. Its base is
  trained on the messages' *general* sentiment, so a user's habit is something to learn.
- ``tiny-mlp/``: an MLP over ``x: [batch, 8]`` floats with 3 classes, trained on the
  general numeric rule of ``example_data.py``.
- ``tiny-cnn/`` (with ``--cnn``): Conv2d + BatchNorm2d, twice, over ``image: [batch, 3, 8, 8]``.

The device examples take any bundle, so ``make demo``'s ``demo_out/bundle`` (MiniLM) works
too. ``--ort-format`` adds the ``mobile/`` ORT-format artifacts (see docs/mobile.md).

Usage:
    python device_examples/make_tiny_bundles.py [OUT] [--cnn] [--ort-format]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from example_data import LABELS, corpus, message_stream, numeric_labels, random_features

TEXT_MAX_LENGTH = 32
MLP_FEATURES = 8
NUMERIC_LABELS = ["low", "medium", "high"]


class TinyTextClassifier(nn.Module):
    """Word embedding -> masked mean pooling -> Linear -> tanh -> LayerNorm -> Linear."""

    def __init__(self, vocab_size: int, width: int = 32, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.hidden = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return self.head(self.norm(torch.tanh(self.hidden(pooled))))


class TinyMLP(nn.Module):
    def __init__(self, features: int = MLP_FEATURES, hidden: int = 32, classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyCNN(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(image)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.head(h.mean(dim=(2, 3)))


def build_tokenizer(path: Path):
    """A word-level tokenizer over the built-in messages' words ([PAD] = 0, [UNK] = 1)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    splitter = pre_tokenizers.Whitespace()
    words = sorted({w for text in corpus() for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text))})
    tokenizer = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}},
                                           unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = splitter
    tokenizer.enable_truncation(TEXT_MAX_LENGTH)
    tokenizer.save(str(path))
    return tokenizer


def _fit(model: nn.Module, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor, steps: int = 300) -> float:
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(*inputs), labels).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        return float((model(*inputs).argmax(-1) == labels).float().mean())


def _text_inputs(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = tokenizer.encode_batch(texts)
    length = max(len(e.ids) for e in encoded)
    ids = torch.zeros(len(texts), length, dtype=torch.long)
    mask = torch.zeros(len(texts), length, dtype=torch.long)
    for row, e in enumerate(encoded):
        ids[row, : len(e.ids)] = torch.tensor(e.ids)
        mask[row, : len(e.ids)] = 1
    return ids, mask


def make_text_bundle(out: Path, *, ort_format: bool = False) -> Path:
    from bitfit.export import export_bundle

    work = out / "_tokenizer"
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(work / "tokenizer.json")
    torch.manual_seed(0)
    model = TinyTextClassifier(tokenizer.get_vocab_size())
    pairs = message_stream("general", 600, seed=0)
    ids, mask = _text_inputs(tokenizer, [t for t, _ in pairs])
    accuracy = _fit(model, (ids, mask), torch.tensor([LABELS.index(label) for _, label in pairs]))
    with contextlib.redirect_stdout(io.StringIO()):  # the ORT-format converter prints every file it writes
        export_bundle(model, out / "tiny-text", example_inputs={"input_ids": ids[:2], "attention_mask": mask[:2]},
                      labels=list(LABELS), tokenizer=work / "tokenizer.json", max_length=TEXT_MAX_LENGTH,
                      ort_format=ort_format, overwrite=True)
    (work / "tokenizer.json").unlink()
    work.rmdir()
    print(f"tiny-text: {tokenizer.get_vocab_size()} words, base accuracy {accuracy:.2f} on the general messages")
    return out / "tiny-text"


def make_numeric_bundle(out: Path, kind: str = "mlp", *, ort_format: bool = False) -> Path:
    from types import SimpleNamespace

    from bitfit.export import export_bundle

    torch.manual_seed(0)
    if kind == "mlp":
        model, name, shape = TinyMLP(), "x", (MLP_FEATURES,)
    else:
        model, name, shape = TinyCNN(), "image", (3, 8, 8)
    specs = [SimpleNamespace(name=name, shape=["batch", *shape])]
    features = random_features(specs, 1000, np.random.default_rng(0))
    labels = numeric_labels(features, len(NUMERIC_LABELS))
    x = torch.from_numpy(features[name])
    accuracy = _fit(model, (x,), torch.from_numpy(labels))
    with contextlib.redirect_stdout(io.StringIO()):
        export_bundle(model, out / f"tiny-{kind}", example_inputs={name: x[:2]}, labels=NUMERIC_LABELS,
                      ort_format=ort_format, overwrite=True)
    print(f"tiny-{kind}: input {name} [batch, {', '.join(map(str, shape))}], base accuracy {accuracy:.2f} on the general rule")
    return out / f"tiny-{kind}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default="tiny_bundles", help="directory to write the bundles into")
    parser.add_argument("--cnn", action="store_true", help="also export tiny-cnn (Conv2d + BatchNorm2d)")
    parser.add_argument("--ort-format", action="store_true", help="also write mobile/ ORT-format artifacts")
    args = parser.parse_args(argv)
    out = Path(args.out)
    started = time.perf_counter()
    torch.set_num_threads(1)  # tiny matrices: more threads only add synchronisation
    paths = [make_text_bundle(out, ort_format=args.ort_format), make_numeric_bundle(out, "mlp", ort_format=args.ort_format)]
    if args.cnn:
        paths.append(make_numeric_bundle(out, "cnn", ort_format=args.ort_format))
    print(f"wrote {', '.join(str(p) for p in paths)} in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
