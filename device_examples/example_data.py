"""Built-in data for the device examples, so they run without any data file.

Device side: numpy only (never torch). Text messages are short English sentences
("the train is late again") whose *general* sentiment follows the predicate; a user's
**habit** relabels some of them the way that user sees things (an optimist calls
"the meeting starts tomorrow" positive). Numeric examples follow a fixed random linear
rule, and a user's habit shifts its class scores. Personalization has to learn the habit.

Example:
    >>> from example_data import message_stream, LABELS
    >>> message_stream("optimist", 3, seed=0)[0][1] in LABELS
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

LABELS = ("negative", "neutral", "positive")
SUBJECTS = (
    "the meeting", "my flight", "the new phone", "the release", "dinner", "the train", "the concert",
    "the update", "the delivery", "the game", "the weekend trip", "the doctor's appointment",
)
PREDICATES = {
    "positive": ("was great", "went really well", "made my day", "is awesome", "was lovely", "worked perfectly"),
    "negative": ("was cancelled", "is broken again", "was a disaster", "is late again", "was terrible", "crashed twice"),
    "neutral": ("is at 6pm", "moved to tuesday", "is on the calendar", "starts tomorrow", "is in room 4", "takes two hours"),
}
SUFFIXES = ("", "!", " today", " this week", " again", " lol")
# How each simulated user relabels a message whose general sentiment is the key.
HABITS: dict[str, dict[str, str]] = {
    "general": {},
    "optimist": {"neutral": "positive"},
    "critic": {"neutral": "negative", "positive": "neutral"},
    "stoic": {"positive": "neutral", "negative": "neutral"},
}
# Messages whose label depends on who reads them: the examples print these before and after.
PROBES = ("the meeting starts tomorrow", "the delivery moved to tuesday", "the concert takes two hours",
          "the update was great")


def corpus() -> list[str]:
    """Every piece of text the built-in messages are made of (to build a tokenizer's vocabulary)."""
    return [*SUBJECTS, *(p for ps in PREDICATES.values() for p in ps), *SUFFIXES, *PROBES]


def message_stream(habit: str, count: int, seed: int = 0) -> list[tuple[str, str]]:
    """``count`` (text, label) pairs labelled the way a user with ``habit`` would label them."""
    if habit not in HABITS:
        raise ValueError(f"unknown habit {habit!r}: use one of {sorted(HABITS)}")
    rng = np.random.default_rng(seed)
    relabel = HABITS[habit]
    out = []
    for _ in range(count):
        general = LABELS[rng.integers(len(LABELS))]
        text = f"{SUBJECTS[rng.integers(len(SUBJECTS))]} {PREDICATES[general][rng.integers(len(PREDICATES[general]))]}"
        text += SUFFIXES[rng.integers(len(SUFFIXES))]
        out.append((text, relabel.get(general, general)))
    return out


def habit_label(text: str, habit: str) -> str:
    """The label a user with ``habit`` gives one message built from the pieces above."""
    general = next((label for label, preds in PREDICATES.items() if any(p in text for p in preds)), "neutral")
    return HABITS[habit].get(general, general)


# ------------------------------------------------------------------------- numeric bundles


def feature_shapes(inputs: Sequence[Any]) -> dict[str, tuple[int, ...]]:
    """Per-example shape of each model input (from a manifest's ``inputs``); named dims -> 8."""
    return {spec.name: tuple(d if isinstance(d, int) and d > 0 else 8 for d in spec.shape[1:]) for spec in inputs}


def random_features(inputs: Sequence[Any], rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Standard-normal float32 features for every model input, ``rows`` examples."""
    return {name: rng.standard_normal((rows, *shape)).astype(np.float32) for name, shape in feature_shapes(inputs).items()}


def rule_scores(features: Mapping[str, np.ndarray], classes: int) -> np.ndarray:
    """The general rule's class scores: a fixed (seeded) linear map of the flattened features."""
    flat = np.concatenate([np.asarray(v, np.float32).reshape(len(v), -1) for _, v in sorted(features.items())], axis=1)
    weights = np.random.default_rng(1234).standard_normal((flat.shape[1], classes)).astype(np.float32)
    return flat @ weights / np.sqrt(flat.shape[1])


def numeric_labels(features: Mapping[str, np.ndarray], classes: int, habit: int | None = None, shift: float = 1.5) -> np.ndarray:
    """Labels under the general rule, or a user's habit: class ``habit`` gets ``shift`` more score."""
    scores = rule_scores(features, classes)
    if habit is not None:
        scores[:, habit] += shift
    return scores.argmax(axis=1).astype(np.int64)


# ------------------------------------------------------------------------- any bundle

# The numeric counterpart of each habit: which class that user favours (None = the rule as is).
NUMERIC_HABITS: dict[str, int | None] = {"general": None, "critic": 0, "stoic": 1, "optimist": -1}


def classes_of(manifest: Any) -> int:
    """Number of classes of a classification bundle's manifest."""
    return len(manifest.labels) if manifest.labels else int(manifest.outputs[0].shape[-1])


def user_examples(manifest: Any, habit: str, count: int, seed: int = 0) -> Any:
    """A user's labelled data in the form ``Personalizer.personalize`` takes for this bundle:
    (text, label) pairs for text bundles, ``{input: array, ..., "labels": array}`` otherwise."""
    if manifest.text is not None:
        return message_stream(habit, count, seed=seed)
    features = random_features(manifest.inputs, count, np.random.default_rng(seed))
    classes = classes_of(manifest)
    favoured = NUMERIC_HABITS[habit]
    return {**features, "labels": numeric_labels(features, classes, None if favoured is None else favoured % classes)}


def probe_inputs(manifest: Any, rows: int = 4) -> Any:
    """Fixed inputs to show predictions before and after: PROBES, or seeded random features."""
    if manifest.text is not None:
        return list(PROBES[:rows])
    return random_features(manifest.inputs, rows, np.random.default_rng(999))
