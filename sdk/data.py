"""User data -> validated examples -> padded batches. Tokenization runs here, with the
bundle's ``tokenizer.json`` and the ``tokenizers`` library only (no transformers).

Accepted ``user_data``:
- a list of ``(text, label)`` pairs, or of dicts with ``text`` and ``label`` keys, or one
  dict of columns ``{"text": [...], "label": [...]}``;
- a path to a ``.jsonl`` file (one such dict per line) or a ``.csv`` file with a header
  that has ``text`` and ``label`` columns;
- for bundles without a tokenizer: a dict of numpy arrays named like the model inputs
  (first axis = examples) plus a ``labels`` array, or a ``(features, labels)`` tuple.
Labels by name (``"positive"``) or by index (``2``), not both in one call.

Example:
    >>> from bitfit.sdk.data import normalize_records
    >>> normalize_records([("great", "pos"), {"text": "bad", "label": "neg"}])
    [('great', 'pos'), ('bad', 'neg')]
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Bundle, Manifest
from .errors import BudgetExceededError, InvalidArgumentError, InvalidUserDataError

DEFAULT_MAX_EXAMPLES = 100_000
LENGTH_WINDOW = 8
"""``batches(by_length=True)`` sorts by length within windows of this many batches."""
SCORING_TOKENS = 512
"""Padded tokens per batch when scoring (``scoring_batches``). Measured through
``Personalizer.evaluate``'s path on MiniLM (2 cores, onnxruntime 1.19.2; /tmp study,
2026-12-02, two rounds): 300 tweets took 1.70-1.72 s in batches of 64 rows in data order,
0.97-0.99 s sorted by length with 512 tokens a batch (128: 1.12-1.20 s, 1024: 1.01-1.04 s,
sorted batches of 16 rows: 0.90-1.00 s); 200 SMS messages 1.22-1.24 s -> 0.45-0.46 s; a
15-message holdout 96-99 -> 53-54 ms (one batch padded to its longest message before).
Through the API, ``evaluate`` on those 300 tweets 1.65-1.68 -> 0.93-0.99 s, on the 200 SMS
1.20-1.21 -> 0.43-0.48 s, accuracy identical."""
SCORING_ROWS = 64
"""At most this many rows in a scoring batch (all of a feature-array batch's rows)."""


@dataclass
class Examples:
    """Validated examples: either token id lists (text) or feature arrays, plus labels.

    Example:
        >>> ex = Examples(labels=np.array([0, 1, 1]), token_ids=[[101, 7, 102], [101, 8, 102], [101, 9, 102]])
        >>> len(ex), ex.subset([2, 0]).labels.tolist()
        (3, [1, 0])
    """

    labels: np.ndarray
    token_ids: list[list[int]] | None = None
    type_ids: list[list[int]] | None = None
    features: dict[str, np.ndarray] | None = None
    duplicates_removed: int = 0
    causal_lm: bool = False
    """Text for a causal LM: the labels are the next tokens, built per batch (``labels`` is a placeholder)."""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: Sequence[int] | np.ndarray) -> "Examples":
        """The examples at ``index``, in that order.

        Example:
            >>> Examples(labels=np.array([5, 6, 7]), features={"x": np.arange(3.0)}).subset([1]).features["x"].tolist()
            [1.0]
        """
        index = [int(i) for i in index]
        return Examples(
            labels=self.labels[index],
            token_ids=[self.token_ids[i] for i in index] if self.token_ids is not None else None,
            type_ids=[self.type_ids[i] for i in index] if self.type_ids is not None else None,
            features={k: v[index] for k, v in self.features.items()} if self.features is not None else None,
            causal_lm=self.causal_lm,
        )

    def lengths(self) -> np.ndarray:
        """Tokens per example (text), or 1 each (feature arrays).

        Example:
            >>> Examples(labels=np.zeros(2), token_ids=[[1, 2, 3], [4]]).lengths().tolist()
            [3, 1]
        """
        if self.token_ids is None:
            return np.ones(len(self), np.int64)
        return np.array([len(x) for x in self.token_ids], np.int64)

    def class_counts(self) -> dict[int, int]:
        """Examples per class index, for class-index labels (empty for other label kinds).

        Example:
            >>> Examples(labels=np.array([0, 2, 2])).class_counts()
            {0: 1, 2: 2}
        """
        if self.causal_lm or self.labels.ndim != 1 or self.labels.dtype.kind not in "iu":
            return {}
        values, counts = np.unique(self.labels, return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts)}


class TextEncoder:
    """The bundle's tokenizer with truncation to the bundle's max length.

    Example:
        >>> enc = TextEncoder(Bundle.open("bundles/minilm-sentiment"))              # doctest: +SKIP
        >>> enc.feeds_for_texts(["great flight!"])["input_ids"].tolist()           # doctest: +SKIP
        [[101, 2307, 3462, 999, 102]]
    """

    def __init__(self, bundle: Bundle):
        from tokenizers import Tokenizer

        spec = bundle.manifest.text
        if spec is None:
            raise InvalidUserDataError("this bundle takes numeric inputs, not text: pass a dict of arrays")
        self.spec = spec
        try:
            self.tokenizer = Tokenizer.from_file(str(bundle.file("tokenizer")))
        except Exception as err:
            from .errors import BundleInvalidError

            raise BundleInvalidError(f"the bundle's tokenizer.json cannot be loaded ({err}); re-export the bundle") from err
        # Read the tokenizer's own pad id before turning its padding off (we pad per batch).
        pad = self.tokenizer.padding
        self.pad_id = pad["pad_id"] if pad else (self.tokenizer.token_to_id("[PAD]") or 0)
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(spec.max_length)

    def encode(self, texts: list[str]) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids and token type ids per text, truncated, not padded.

        Example:
            >>> enc.encode(["great flight!"])                                          # doctest: +SKIP
            ([[101, 2307, 3462, 999, 102]], [[0, 0, 0, 0, 0]])
        """
        encodings = self.tokenizer.encode_batch(texts)
        return [e.ids for e in encodings], [e.type_ids for e in encodings]

    def pad(self, ids: list[list[int]], type_ids: list[list[int]] | None = None) -> dict[str, np.ndarray]:
        """Pad a batch to its longest sequence and build the model's text inputs.

        Example:
            >>> enc.pad([[101, 102], [101, 7, 102]])["attention_mask"].tolist()         # doctest: +SKIP
            [[1, 1, 0], [1, 1, 1]]
        """
        length = max(1, max(len(x) for x in ids))
        input_ids = np.full((len(ids), length), self.pad_id, np.int64)
        mask = np.zeros((len(ids), length), np.int64)
        types = np.zeros((len(ids), length), np.int64)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
            if type_ids is not None:
                types[row, : len(seq)] = type_ids[row]
        feeds = {self.spec.input_ids: input_ids}
        if self.spec.attention_mask:
            feeds[self.spec.attention_mask] = mask
        if self.spec.token_type_ids:
            feeds[self.spec.token_type_ids] = types
        return feeds

    def feeds_for_texts(self, texts: list[str]) -> dict[str, np.ndarray]:
        """The model's padded text inputs for ``texts`` (``encode`` then ``pad``).

        Example:
            >>> sorted(enc.feeds_for_texts(["hi", "hello there"]))                     # doctest: +SKIP
            ['attention_mask', 'input_ids', 'token_type_ids']
        """
        ids, types = self.encode(texts)
        return self.pad(ids, types)


def check_text(value: Any, where: str) -> str:
    """A usable text, or an InvalidUserDataError naming the example.

    Example:
        >>> check_text("café".encode("utf-8"), "example 0")
        'café'
        >>> check_text("  ", "example 3")
        Traceback (most recent call last):
        ...
        bitfit.sdk.errors.InvalidUserDataError: example 3: text is empty; drop the example or give it text
    """
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as err:
            raise InvalidUserDataError(f"{where}: text is not valid UTF-8 ({err.reason} at byte {err.start}); decode it to str first") from err
    if value is None or not isinstance(value, str):
        raise InvalidUserDataError(f"{where}: text must be a non-empty string, got {type(value).__name__}; pass str (or UTF-8 bytes)")
    if not value.strip():
        raise InvalidUserDataError(f"{where}: text is empty; drop the example or give it text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidUserDataError(f"{where}: text holds characters that are not valid Unicode ({err.reason}); clean it first") from err
    return value


def normalize_records(user_data: Any) -> list[tuple[Any, Any]]:
    """``(text, label)`` pairs from a list of pairs/dicts or a .jsonl/.csv path.

    Example:
        >>> normalize_records({"text": ["a", "b"], "label": [0, 1]})
        [('a', 0), ('b', 1)]
    """
    if isinstance(user_data, (str, os.PathLike)):
        return _read_file(Path(user_data))
    if _is_text_columns(user_data):
        texts, labels = user_data["text"], user_data.get("label", user_data.get("labels"))
        if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence) or not isinstance(labels, Sequence) \
                or isinstance(labels, (str, bytes)) or len(texts) != len(labels):
            raise InvalidUserDataError("column data needs equally long 'text' and 'label' lists")
        return list(zip(texts, labels))
    if isinstance(user_data, Mapping) or not isinstance(user_data, Sequence) or isinstance(user_data, (bytes, str)):
        raise InvalidUserDataError(
            f"user_data must be a list of (text, label) pairs or dicts, or a .jsonl/.csv path; got {type(user_data).__name__}"
        )
    records = []
    for i, item in enumerate(user_data):
        if isinstance(item, Mapping):
            if "text" not in item or "label" not in item:
                raise InvalidUserDataError(f"example {i}: a dict needs 'text' and 'label' keys, got {sorted(map(str, item))[:5]}")
            records.append((item["text"], item["label"]))
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            records.append((item[0], item[1]))
        else:
            raise InvalidUserDataError(f"example {i}: expected a (text, label) pair or a dict, got {type(item).__name__}")
    return records


def _read_file(path: Path, *, labelled: bool = True) -> list[tuple[Any, Any]]:
    try:
        found = path.is_file()
    except (OSError, ValueError):  # a name too long for the filesystem, ...
        found = False
    if not found:
        raise InvalidUserDataError(f"{str(path)[:200]!r} is not a file: pass a .jsonl or .csv file with text and label")
    try:
        raw = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidUserDataError(f"{path} is not UTF-8 (byte {err.start}); re-save it as UTF-8") from err
    except OSError as err:
        raise InvalidUserDataError(f"cannot read {path} ({err.strerror or err}); check its permissions") from err
    if path.suffix.lower() == ".jsonl":
        rows = []
        # Split on "\n" only: str.splitlines() also splits on U+2028, U+0085, ..., which
        # JSON allows unescaped inside strings (json.dumps(..., ensure_ascii=False) writes them).
        for number, line in enumerate(raw.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except (ValueError, RecursionError) as err:
                raise InvalidUserDataError(f"{path}:{number} is not valid JSON ({err})") from err
        if not labelled:
            return [(row.get("text") if isinstance(row, Mapping) else row, None) for row in rows]
        return normalize_records(rows)
    if path.suffix.lower() == ".csv":
        # A file-like reader, not splitlines(): quoted fields may hold newlines (and U+2028...).
        reader = csv.DictReader(io.StringIO(raw, newline=""))
        if not labelled and reader.fieldnames and "text" in reader.fieldnames:
            try:
                return [(row["text"], None) for row in reader]
            except csv.Error as err:
                raise InvalidUserDataError(f"{path} is not a readable CSV file ({err}); re-save it as plain UTF-8 CSV") from err
        if not reader.fieldnames or "text" not in reader.fieldnames or "label" not in reader.fieldnames:
            raise InvalidUserDataError(f"{path} needs a header row with 'text' and 'label' columns, has {reader.fieldnames}")
        try:
            return [(row["text"], _csv_label(row["label"])) for row in reader]
        except csv.Error as err:
            raise InvalidUserDataError(f"{path} is not a readable CSV file ({err}); re-save it as plain UTF-8 CSV") from err
    raise InvalidUserDataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl or .csv")


def _csv_label(value: str | None) -> Any:
    if value is None:  # a short row; encode_labels reports it
        return None
    try:
        return int(value) if value.strip().lstrip("-").isdigit() else value
    except ValueError:  # "²" is a digit int() does not read
        return value


def encode_labels(raw: Sequence[Any], manifest: Manifest) -> np.ndarray:
    """Labels as the loss wants them: class indices, floats, or multi-hot vectors.

    Example:
        >>> from types import SimpleNamespace
        >>> m = SimpleNamespace(labels=["neg", "pos"], outputs=[SimpleNamespace(shape=["batch", 2])], loss="cross-entropy")
        >>> encode_labels(["pos", "neg"], m).tolist()
        [1, 0]
        >>> encode_labels([["pos"], []], SimpleNamespace(**{**vars(m), "loss": "bce-with-logits"})).tolist()
        [[0.0, 1.0], [0.0, 0.0]]
    """
    names = manifest.labels
    width = manifest.outputs[0].shape[-1] if manifest.outputs[0].shape else 1
    if manifest.loss == "cross-entropy":
        is_index = [isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in raw]
        is_name = [isinstance(x, str) for x in raw]
        if not all(a or b for a, b in zip(is_index, is_name)):
            bad = next(i for i, (a, b) in enumerate(zip(is_index, is_name)) if not (a or b))
            raise InvalidUserDataError(f"example {bad}: label {raw[bad]!r} ({type(raw[bad]).__name__}) must be a label name or an integer index")
        if any(is_index) and any(is_name):
            raise InvalidUserDataError("labels mix names and integer indices; use one form for every example")
        count = len(names) if names else (width if isinstance(width, int) else None)
        if any(is_name):
            if not names:
                raise InvalidUserDataError("this bundle has no label names; give labels as integer indices")
            lookup = {n: i for i, n in enumerate(names)}
            unknown = sorted({x for x in raw if x not in lookup})
            if unknown:
                raise InvalidUserDataError(f"unknown label(s) {unknown[:5]}: this bundle knows {names}; use those names (or their indices)")
            return np.array([lookup[x] for x in raw], np.int64)
        if any(not -2**63 <= int(x) < 2**63 for x in raw):
            raise InvalidUserDataError(f"label index out of range: indices must be in 0..{(count or 2**63) - 1}")
        values = np.array(raw, np.int64)
        if count is not None and values.size and (values.min() < 0 or values.max() >= count):
            raise InvalidUserDataError(f"label index out of range: indices must be in 0..{count - 1}")
        return values
    if manifest.loss == "mse":
        try:
            values = np.array(raw, np.float32)
        except (TypeError, ValueError, OverflowError) as err:
            raise InvalidUserDataError(f"regression labels must be numbers ({err})") from err
        if not np.all(np.isfinite(values)):
            raise InvalidUserDataError("regression labels contain NaN or inf; drop or fix those examples")
        return values.reshape(len(raw), *([width] if isinstance(width, int) and len(manifest.outputs[0].shape) > 1 else []))
    if manifest.loss == "bce-with-logits":
        lookup = {n: i for i, n in enumerate(names or [])}
        out = np.zeros((len(raw), width), np.float32)
        for i, item in enumerate(raw):
            items = item if isinstance(item, (list, tuple, np.ndarray)) else [item]
            if len(items) == width and all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in items):
                out[i] = np.array(items, np.float32)
                continue
            for name in items:
                if not isinstance(name, str) or name not in lookup:
                    raise InvalidUserDataError(f"example {i}: unknown label {name!r}: this bundle knows {names}; use those names")
                out[i, lookup[name]] = 1.0
        return out
    raise InvalidUserDataError(f"text user_data is not supported for a {manifest.loss} bundle; pass token-level arrays")


def load_examples(
    user_data: Any, bundle: Bundle, encoder: TextEncoder | None, *, max_examples: int = DEFAULT_MAX_EXAMPLES
) -> Examples:
    """Validate and encode all of ``user_data`` up front: an invalid call trains nothing.

    Example:
        >>> bundle = Bundle.open("bundles/minilm-sentiment")                                   # doctest: +SKIP
        >>> ex = load_examples([("great", "positive"), ("great", "positive")], bundle, TextEncoder(bundle))  # doctest: +SKIP
        >>> len(ex), ex.duplicates_removed                                                     # doctest: +SKIP
        (1, 1)
    """
    manifest = bundle.manifest
    if encoder is None or _looks_like_arrays(user_data):
        return _array_examples(user_data, manifest, max_examples, vocab_size=encoder.vocab_size if encoder else None)
    if manifest.task == "causal-lm":
        return _causal_lm_examples(user_data, encoder, max_examples)
    records = normalize_records(user_data)
    if not records:
        raise InvalidUserDataError("user_data is empty: pass at least one labelled example")
    if len(records) > max_examples:
        raise BudgetExceededError(
            f"{len(records)} examples exceed max_examples={max_examples}; pass a sample, or raise max_examples"
        )
    seen: set[tuple[str, str]] = set()
    texts, raw_labels, removed = [], [], 0
    for i, (text, label) in enumerate(records):
        text = check_text(text, f"example {i}")
        key = (text, repr(label))
        if key in seen:
            removed += 1  # an exact repeat would also leak into the holdout
            continue
        seen.add(key)
        texts.append(text)
        raw_labels.append(label)
    labels = encode_labels(raw_labels, manifest)
    ids, types = encoder.encode(texts)
    return Examples(labels=labels, token_ids=ids, type_ids=types, duplicates_removed=removed)


def _causal_lm_examples(user_data: Any, encoder: TextEncoder, max_examples: int) -> Examples:
    """Texts for a causal LM: each text teaches its own next tokens, so no labels are given."""
    if isinstance(user_data, (str, os.PathLike)):
        path = Path(user_data)
        if path.suffix.lower() == ".txt" and path.is_file():
            try:
                texts = [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
            except (OSError, UnicodeDecodeError) as err:
                raise InvalidUserDataError(f"cannot read {path} as UTF-8 text ({err})") from err
        else:
            texts = [t for t, _ in _read_file(path, labelled=False)]
    elif isinstance(user_data, Mapping) and "text" in user_data:
        texts = list(user_data["text"])
    elif isinstance(user_data, Sequence) and not isinstance(user_data, (str, bytes)):
        texts = [item.get("text") if isinstance(item, Mapping) else item for item in user_data]
    else:
        raise InvalidUserDataError(
            f"a causal-LM bundle learns from texts: pass a list of str, dicts with 'text', or a .txt/.jsonl/.csv "
            f"path; got {type(user_data).__name__}"
        )
    if not texts:
        raise InvalidUserDataError("user_data is empty: pass at least one text")
    if len(texts) > max_examples:
        raise BudgetExceededError(f"{len(texts)} examples exceed max_examples={max_examples}; pass a sample, or raise max_examples")
    unique = list(dict.fromkeys(check_text(t, f"example {i}") for i, t in enumerate(texts)))
    ids, types = encoder.encode(unique)
    if all(len(x) < 2 for x in ids):
        raise InvalidUserDataError("every text is a single token: a causal LM learns from the next token, so give longer texts")
    return Examples(labels=np.zeros(len(unique), np.int64), token_ids=ids, type_ids=types,
                    duplicates_removed=len(texts) - len(unique), causal_lm=True)


def next_token_labels(input_ids: np.ndarray, mask: np.ndarray | None, ignore_index: int) -> np.ndarray:
    """Causal-LM labels: position t is taught token t+1; the last position and padding are ignored.

    Example:
        >>> next_token_labels(np.array([[5, 6, 7], [8, 9, 0]]), np.array([[1, 1, 1], [1, 1, 0]]), -100).tolist()
        [[6, 7, -100], [9, -100, -100]]
    """
    labels = np.full(input_ids.shape, ignore_index, np.int64)
    labels[:, :-1] = input_ids[:, 1:]
    if mask is not None:
        labels[:, :-1][mask[:, 1:] == 0] = ignore_index
    return labels


def _is_text_columns(user_data: Any) -> bool:
    """``{"text": [...], "label": [...]}``: the column form of text examples."""
    return isinstance(user_data, Mapping) and "text" in user_data and ("label" in user_data or "labels" in user_data)


def _looks_like_arrays(user_data: Any) -> bool:
    if _is_text_columns(user_data):
        return False
    return isinstance(user_data, Mapping) or (
        isinstance(user_data, tuple) and len(user_data) == 2 and (isinstance(user_data[0], Mapping) or _is_bare_array(user_data[0]))
    )


def _is_bare_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.dtype.kind in "fiub"


def as_feature_dict(features: Any, manifest: Manifest) -> dict[str, Any]:
    """Model feeds from what a caller passed: a dict of arrays as is; a bare array for a
    one-input bundle under that input's name; anything else refused with the names to use.

    Example:
        >>> from types import SimpleNamespace
        >>> spec = SimpleNamespace(inputs=[SimpleNamespace(name="x")])
        >>> sorted(as_feature_dict(np.zeros((2, 4), np.float32), spec))
        ['x']
    """
    if isinstance(features, Mapping):
        return dict(features)
    names = [i.name for i in manifest.inputs]
    if len(names) == 1 and isinstance(features, np.ndarray):
        return {names[0]: features}
    if len(names) == 1 and isinstance(features, (list, tuple)) and not any(isinstance(x, (str, bytes)) for x in features):
        return {names[0]: features}
    if len(names) == 1:
        raise InvalidUserDataError(f"this bundle takes numeric inputs, one array {names[0]!r} (rows = examples); "
                                   f"got {type(features).__name__}" + (" of text" if isinstance(features, (list, tuple)) else ""))
    raise InvalidUserDataError(f"this bundle takes {len(names)} numeric inputs: pass a dict of arrays named {names}")


def _array_examples(user_data: Any, manifest: Manifest, max_examples: int, vocab_size: int | None = None) -> Examples:
    if isinstance(user_data, tuple) and len(user_data) == 2 and isinstance(user_data[0], Mapping):
        features, labels = dict(user_data[0]), user_data[1]
    elif isinstance(user_data, tuple) and len(user_data) == 2 and isinstance(user_data[0], (np.ndarray, list)):
        # (rows, labels) for a one-input bundle: rows as an array or a list, as predict takes them
        features, labels = as_feature_dict(user_data[0], manifest), user_data[1]
    elif isinstance(user_data, Mapping):
        features = {k: v for k, v in user_data.items() if k != "labels"}
        labels = user_data.get("labels")
    else:
        names = [i.name for i in manifest.inputs]
        raise InvalidUserDataError(
            "this bundle takes numeric inputs: pass (features, labels)"
            + (f" with features an array for its one input {names[0]!r}," if len(names) == 1 else "")
            + f" or {{{', '.join(repr(n) + ': array' for n in names)}, 'labels': array}}"
        )
    if labels is None:
        raise InvalidUserDataError("numeric user_data needs a 'labels' array (or a (features, labels) tuple)")
    arrays = check_feature_arrays(features, manifest, vocab_size=vocab_size)
    count = next(iter(arrays.values())).shape[0]
    if count == 0:
        raise InvalidUserDataError("user_data is empty: pass at least one labelled example")
    if count > max_examples:
        raise BudgetExceededError(f"{count} examples exceed max_examples={max_examples}; pass a sample, or raise max_examples")
    if isinstance(labels, (str, bytes, bytearray, Mapping)) or not (
        isinstance(labels, Sequence) or (isinstance(labels, np.ndarray) and labels.ndim >= 1)
    ):
        raise InvalidUserDataError(f"labels must be a list or array with one label per example, got {type(labels).__name__}")
    if len(labels) != count:
        raise InvalidUserDataError(f"{len(labels)} labels for {count} examples; give one label per example")
    raw = list(labels) if not isinstance(labels, np.ndarray) or manifest.loss == "cross-entropy" else labels
    if manifest.loss == "token-cross-entropy":
        try:
            encoded = np.asarray(labels)
        except (TypeError, ValueError, OverflowError) as err:
            raise InvalidUserDataError(f"token labels are not a rectangular integer array ({err})") from err
        if encoded.dtype.kind not in "iu" or encoded.shape[:2] != next(iter(arrays.values())).shape[:2]:
            raise InvalidUserDataError("token labels must be integers shaped like the input ids [examples, sequence]")
        encoded = encoded.astype(np.int64)
    else:
        if isinstance(raw, np.ndarray) and raw.dtype.kind in "iu" and raw.ndim == 1:
            raw = [int(x) for x in raw]
        encoded = encode_labels(list(raw) if not isinstance(raw, np.ndarray) else raw.tolist(), manifest)
    if encoded.shape[0] != count:
        raise InvalidUserDataError(f"{encoded.shape[0]} labels for {count} examples; give one label per example")
    # Exact repeats (features and label) are dropped, as for text: a repeat would also leak into the holdout.
    seen: set[tuple[bytes, ...]] = set()
    keep = []
    for i in range(count):
        key = tuple(a[i].tobytes() for a in (*arrays.values(), encoded))
        if key not in seen:
            seen.add(key)
            keep.append(i)
    if len(keep) == count:
        return Examples(labels=encoded, features=arrays)
    examples = Examples(labels=encoded, features=arrays).subset(keep)
    examples.duplicates_removed = count - len(keep)
    return examples


def check_feature_arrays(
    features: Mapping[str, Any], manifest: Manifest, *, vocab_size: int | None = None
) -> dict[str, np.ndarray]:
    """Numeric inputs checked against the manifest: names, dtypes, fixed dims, finite values.

    Example:
        >>> from types import SimpleNamespace
        >>> m = SimpleNamespace(inputs=[SimpleNamespace(name="x", dtype="float32", shape=["batch", 2])], text=None)
        >>> check_feature_arrays({"x": [[1, 2], [3, 4]]}, m)["x"].dtype
        dtype('float32')
        >>> check_feature_arrays({"x": [[1, 2, 3]]}, m)
        Traceback (most recent call last):
        ...
        bitfit.sdk.errors.InvalidUserDataError: input 'x' has size 3 on axis 1, the model takes 2 (shape ['batch', 2])

    ``vocab_size`` (text bundles given token arrays): token ids must lie in ``0..vocab_size-1``
    and the other integer inputs must not be negative.
    """
    expected = {spec.name: spec for spec in manifest.inputs}
    missing = sorted(set(expected) - set(features))
    extra = sorted(set(features) - set(expected), key=repr)
    if missing or extra:
        raise InvalidUserDataError(f"inputs must be exactly {sorted(expected)}; missing {missing}, unexpected {extra}")
    out: dict[str, np.ndarray] = {}
    count = None
    for name, spec in expected.items():
        try:
            arr = np.asarray(features[name])
        except (TypeError, ValueError, OverflowError) as err:
            raise InvalidUserDataError(f"input {name!r} is not an array ({err})") from err
        want = np.dtype(spec.dtype)
        if arr.dtype.kind not in "fiub" or (want.kind == "f") != (arr.dtype.kind == "f") and not (want.kind == "f" and arr.dtype.kind in "iu"):
            raise InvalidUserDataError(f"input {name!r} has dtype {arr.dtype}, the model takes {want}")
        if arr.ndim != len(spec.shape):
            raise InvalidUserDataError(f"input {name!r} has shape {arr.shape}, the model takes {spec.shape} (first axis = examples)")
        for axis, (have, dim) in enumerate(zip(arr.shape, spec.shape)):
            if isinstance(dim, int) and dim > 0 and have != dim:
                raise InvalidUserDataError(f"input {name!r} has size {have} on axis {axis}, the model takes {dim} (shape {spec.shape})")
        if arr.dtype.kind in "iu" and want.kind in "iu" and arr.size and (
            int(arr.min()) < np.iinfo(want).min or int(arr.max()) > np.iinfo(want).max
        ):
            raise InvalidUserDataError(f"input {name!r} has values outside the range of {want}")
        with np.errstate(over="ignore", invalid="ignore"):
            converted = arr.astype(want, copy=False)
        # After the cast: 1e300 is a finite float64 but an infinite float32.
        if converted.dtype.kind == "f" and not np.all(np.isfinite(converted)):
            raise InvalidUserDataError(f"input {name!r} contains NaN or inf (or values too large for {want}); drop or fix those examples")
        if vocab_size is not None and converted.dtype.kind in "iu" and converted.size:
            high = vocab_size if manifest.text is not None and name == manifest.text.input_ids else None
            if int(converted.min()) < 0 or (high is not None and int(converted.max()) >= high):
                raise InvalidUserDataError(
                    f"input {name!r} holds values outside {'0..' + str(high - 1) if high else '0 and up'}: "
                    f"token arrays must come from this bundle's tokenizer (vocabulary of {vocab_size})"
                )
        if count is not None and arr.shape[0] != count:
            raise InvalidUserDataError(f"inputs disagree on the number of examples ({count} vs {arr.shape[0]} for {name!r})")
        count = arr.shape[0]
        out[name] = converted
    return out


def split_holdout(count: int, size: int, rng: np.random.Generator, *, labels: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled (train, holdout) indices with ``size`` examples held out (0 <= size < count).

    With class-index ``labels`` the holdout is stratified: each class gets its share (largest
    classes first when shares round), so a rare class is not left out of the holdout or the
    training set by chance.

    Example:
        >>> train, held = split_holdout(10, 4, np.random.default_rng(0), labels=np.array([0] * 8 + [1] * 2))
        >>> len(train), len(held), sorted(int(i >= 8) for i in held)
        (6, 4, [0, 0, 0, 1])
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 0 <= size < max(count, 1):
        raise InvalidArgumentError(f"holdout size must be an int in [0, {count}), got {size!r}")
    order = rng.permutation(count)
    if size == 0:
        return order, order[:0]
    if labels is None or labels.ndim != 1 or labels.dtype.kind not in "iu":
        return order[size:], order[:size]
    # Group the shuffled order by class (stable: the random order holds within a class), then
    # take evenly spaced positions: every class contributes in proportion to its size.
    grouped = order[np.argsort(labels[order], kind="stable")]
    step = count / size
    picks = np.floor(np.arange(size) * step + step / 2).astype(np.int64)
    held = grouped[picks]
    chosen = np.zeros(count, bool)
    chosen[held] = True
    return order[~chosen[order]], rng.permutation(held)


def batches(
    examples: Examples, encoder: TextEncoder | None, batch_size: int, rng: np.random.Generator | None, *,
    ignore_index: int | None = None, by_length: bool = False,
) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """(feeds, labels) per batch; shuffled when ``rng`` is given. Text is padded per batch.

    ``by_length`` (text, with ``rng``): examples of similar length share a batch (sorted within
    windows of ``LENGTH_WINDOW`` batches, then the batches shuffled), so a batch carries less
    padding; what each step sees stays random. Causal-LM text gets next-token labels.

    Example:
        >>> ex = Examples(labels=np.arange(4), features={"x": np.arange(8.0).reshape(4, 2)})
        >>> [labels.tolist() for _, labels in batches(ex, None, 3, None)]
        [[0, 1, 2], [3]]
    """
    order = rng.permutation(len(examples)) if rng is not None else np.arange(len(examples))
    starts = list(range(0, len(examples), batch_size))
    if by_length and rng is not None and examples.token_ids is not None:
        lengths = examples.lengths()
        window = batch_size * LENGTH_WINDOW
        order = np.concatenate([chunk[np.argsort(lengths[chunk], kind="stable")]
                                for chunk in np.split(order, range(window, len(order), window))]) if len(order) else order
        starts = [starts[i] for i in rng.permutation(len(starts))]
    return _padded(examples, encoder, (order[start:start + batch_size] for start in starts), ignore_index)


def scoring_batches(
    examples: Examples, encoder: TextEncoder | None, *, ignore_index: int | None = None,
    token_budget: int = SCORING_TOKENS, max_rows: int = SCORING_ROWS,
) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """(feeds, labels) per batch for scoring (a holdout, ``evaluate``), whose metrics do not
    depend on the order: text sorted by length, each batch as many rows as fit in
    ``token_budget`` padded tokens (at most ``max_rows``); feature arrays in their order, in
    runs of ``max_rows`` (``max_rows`` <= ``token_budget``).

    Why: a batch is padded to its longest row, so batches of random rows spend much of their
    time on padding (``SCORING_TOKENS`` says what it measured).

    Example:
        >>> ex = Examples(labels=np.arange(5), features={"x": np.zeros((5, 2), np.float32)})
        >>> [labels.tolist() for _, labels in scoring_batches(ex, None, max_rows=2)]
        [[0, 1], [2, 3], [4]]
        >>> text = Examples(labels=np.arange(4), token_ids=[[1] * 9, [1] * 2, [1] * 5, [1] * 3])
        >>> [len(group) for group in length_groups(text.lengths(), token_budget=10, max_rows=64)]
        [2, 1, 1]
    """
    # Feature arrays count one token a row (Examples.lengths), so they keep their order in runs of max_rows.
    groups = length_groups(examples.lengths(), token_budget=token_budget, max_rows=max_rows)
    return _padded(examples, encoder, groups, ignore_index)


def length_groups(lengths: np.ndarray, *, token_budget: int, max_rows: int) -> list[np.ndarray]:
    """Row indices sorted by length, cut into groups whose rows x longest length stays within
    ``token_budget`` (a longer row alone is a group of one) and that hold at most ``max_rows``.

    Example:
        >>> [g.tolist() for g in length_groups(np.array([9, 2, 5, 3]), token_budget=10, max_rows=64)]
        [[1, 3], [2], [0]]
    """
    order = np.argsort(np.asarray(lengths), kind="stable")
    groups: list[np.ndarray] = []
    first = 0
    for position in range(1, len(order) + 1):
        if position == len(order) or (position - first + 1) * int(lengths[order[position]]) > token_budget \
                or position - first >= max_rows:
            groups.append(order[first:position])
            first = position
    return groups


def _padded(examples: Examples, encoder: TextEncoder | None, groups: Any, ignore_index: int | None
            ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """(feeds, labels) for each group of row indices: feature arrays as they are, text padded to the group's longest."""
    for index in groups:
        part = examples.subset(index)
        if part.features is not None:
            yield part.features, part.labels
        else:
            assert encoder is not None and part.token_ids is not None
            feeds = encoder.pad(part.token_ids, part.type_ids)
            if part.causal_lm:
                mask = feeds.get(encoder.spec.attention_mask) if encoder.spec.attention_mask else None
                yield feeds, next_token_labels(feeds[encoder.spec.input_ids], mask,
                                               ignore_index if ignore_index is not None else -100)
            else:
                yield feeds, part.labels
