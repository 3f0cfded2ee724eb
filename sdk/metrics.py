"""The metrics each task is judged by, computed from model outputs and encoded labels.

One function per task family, all returning a flat ``{name: float}`` dict; ``task_metrics``
picks by the bundle's loss. The holdout logic of ``personalize`` compares losses (defined
for every task); these are what a person reads:

- ``cross-entropy`` (classification): ``accuracy`` and ``macro_f1``;
- ``mse`` (regression): ``mae`` and ``rmse``;
- ``bce-with-logits`` (multi-label): ``subset_accuracy`` (every label right), ``label_accuracy``,
  ``micro_f1``, ``macro_f1`` and ``f1/<label>`` per label, outputs thresholded at 0 (p = 0.5);
- ``token-cross-entropy`` (token classification, causal LM): ``token_accuracy`` and
  ``macro_f1`` over the tokens whose label is not the ignore index; a causal-LM bundle adds
  ``perplexity`` (exp of the mean token loss, passed in by the caller).

Example:
    >>> import numpy as np
    >>> task_metrics("cross-entropy", np.array([[2.0, 0.1], [0.3, 1.0], [0.9, 0.2]]), np.array([0, 1, 1]))
    {'accuracy': 0.6666666666666666, 'macro_f1': 0.6666666666666666}
    >>> task_metrics("mse", np.array([[1.5], [2.0]]), np.array([1.0, 3.0]))
    {'mae': 0.75, 'rmse': 0.7905694150420949}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
import numpy as np

from .bundle import LossName, Task

PRIMARY_METRIC: dict[str, str] = {
    "classification": "accuracy",
    "regression": "mae",
    "multilabel": "micro_f1",
    "token-classification": "token_accuracy",
    "causal-lm": "perplexity",
}
"""The one number per task that results and reports lead with."""

LOWER_IS_BETTER = frozenset({"mae", "rmse", "perplexity", "loss"})


def task_metrics(
    loss: LossName, outputs: np.ndarray, labels: np.ndarray, *, label_names: Sequence[str] | None = None,
    ignore_index: int | None = -100,
) -> dict[str, float]:
    """The metrics of ``loss``'s task for model ``outputs`` against encoded ``labels``.

    Example:
        >>> import numpy as np
        >>> task_metrics("bce-with-logits", np.array([[1.0, -1.0], [1.0, 1.0]]), np.array([[1, 0], [0, 1]]),
        ...              label_names=["a", "b"])["subset_accuracy"]
        0.5
    """
    outputs = np.asarray(outputs)
    labels = np.asarray(labels)
    if loss == "cross-entropy":
        return classification_metrics(outputs.argmax(-1), labels, classes=outputs.shape[-1])
    if loss == "mse":
        return regression_metrics(outputs, labels)
    if loss == "bce-with-logits":
        return multilabel_metrics(outputs > 0, labels > 0.5, label_names=label_names)
    if loss == "token-cross-entropy":
        return token_metrics(outputs.argmax(-1), labels, classes=outputs.shape[-1], ignore_index=ignore_index)
    raise ValueError(f"no metrics for loss {loss!r}")


def classification_metrics(predicted: np.ndarray, labels: np.ndarray, *, classes: int | None = None) -> dict[str, float]:
    """Accuracy and macro F1 (over the classes present in labels or predictions).

    Example:
        >>> import numpy as np
        >>> classification_metrics(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]))
        {'accuracy': 0.75, 'macro_f1': 0.7333333333333334}
    """
    predicted, labels = np.asarray(predicted).ravel(), np.asarray(labels).ravel()
    if labels.size == 0:
        return {}
    return {"accuracy": float((predicted == labels).mean()), "macro_f1": _macro_f1(predicted, labels)}


def regression_metrics(outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Mean absolute error and root mean squared error over every output value.

    Example:
        >>> import numpy as np
        >>> regression_metrics(np.array([0.0, 2.0]), np.array([1.0, 2.0]))
        {'mae': 0.5, 'rmse': 0.7071067811865476}
    """
    diff = np.asarray(outputs, np.float64).reshape(len(targets), -1) - np.asarray(targets, np.float64).reshape(len(targets), -1)
    if diff.size == 0:
        return {}
    return {"mae": float(np.abs(diff).mean()), "rmse": float(math.sqrt((diff ** 2).mean()))}


def multilabel_metrics(predicted: np.ndarray, truth: np.ndarray, *, label_names: Sequence[str] | None = None) -> dict[str, float]:
    """Subset and per-label accuracy, micro/macro F1 and F1 per label, from boolean matrices.

    Example:
        >>> import numpy as np
        >>> m = multilabel_metrics(np.array([[1, 0], [1, 1]], bool), np.array([[1, 0], [0, 1]], bool), label_names=["x", "y"])
        >>> m["subset_accuracy"], m["f1/x"], m["f1/y"]
        (0.5, 0.6666666666666666, 1.0)
    """
    predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
    if truth.size == 0:
        return {}
    predicted, truth = predicted.reshape(len(truth), -1), truth.reshape(len(truth), -1)
    tp = (predicted & truth).sum(0)
    fp = (predicted & ~truth).sum(0)
    fn = (~predicted & truth).sum(0)
    per_label = [_f1(int(a), int(b), int(c)) for a, b, c in zip(tp, fp, fn)]
    out = {
        "subset_accuracy": float((predicted == truth).all(axis=1).mean()),
        "label_accuracy": float((predicted == truth).mean()),
        "micro_f1": _f1(int(tp.sum()), int(fp.sum()), int(fn.sum())),
        "macro_f1": float(np.mean(per_label)),
    }
    names = list(label_names) if label_names and len(label_names) == len(per_label) else [str(i) for i in range(len(per_label))]
    out.update({f"f1/{name}": value for name, value in zip(names, per_label)})
    return out


def token_metrics(predicted: np.ndarray, labels: np.ndarray, *, classes: int | None = None,
                  ignore_index: int | None = -100) -> dict[str, float]:
    """Token accuracy and macro F1 over the positions whose label is not ``ignore_index``.

    Example:
        >>> import numpy as np
        >>> token_metrics(np.array([[1, 2, 0]]), np.array([[1, 0, -100]]))
        {'token_accuracy': 0.5, 'macro_f1': 0.3333333333333333, 'tokens': 2.0}
    """
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    keep = labels != ignore_index if ignore_index is not None else np.ones(labels.shape, bool)
    if not keep.any():
        return {"tokens": 0.0}
    p, t = predicted[keep], labels[keep]
    return {"token_accuracy": float((p == t).mean()), "macro_f1": _macro_f1(p, t), "tokens": float(keep.sum())}


def perplexity(mean_token_loss: float) -> float:
    """exp(mean token cross-entropy), inf where that overflows.

    Example:
        >>> round(perplexity(2.0), 4)
        7.3891
    """
    return math.exp(mean_token_loss) if mean_token_loss < 700 else math.inf


def primary_metric(task: Task) -> str:
    """The metric a result leads with for ``task`` (``PRIMARY_METRIC``).

    Example:
        >>> primary_metric("regression")
        'mae'
    """
    return PRIMARY_METRIC[task]


def better(metric: str, new: float, old: float) -> bool:
    """Whether ``new`` is strictly better than ``old`` for ``metric``.

    Example:
        >>> better("accuracy", 0.8, 0.7), better("mae", 0.8, 0.7)
        (True, False)
    """
    return new < old if metric in LOWER_IS_BETTER else new > old


def _f1(tp: int, fp: int, fn: int) -> float:
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 1.0  # nothing to find and nothing found: perfect


def _macro_f1(predicted: np.ndarray, labels: np.ndarray) -> float:
    classes = np.union1d(np.unique(labels), np.unique(predicted))
    scores = [_f1(int(((predicted == c) & (labels == c)).sum()), int(((predicted == c) & (labels != c)).sum()),
                  int(((predicted != c) & (labels == c)).sum())) for c in classes]
    return float(np.mean(scores))


def merge_batches(parts: list[tuple[np.ndarray, np.ndarray]], *, ignore_index: int = -100) -> tuple[np.ndarray, np.ndarray]:
    """Outputs and labels of several batches as one pair (token outputs padded to one length).

    Example:
        >>> import numpy as np
        >>> out, lab = merge_batches([(np.zeros((1, 2, 3)), np.zeros((1, 2))), (np.zeros((1, 4, 3)), np.ones((1, 4)))])
        >>> out.shape, lab.shape, lab[0].tolist()
        ((2, 4, 3), (2, 4), [0.0, 0.0, -100.0, -100.0])
    """
    outputs = [o for o, _ in parts]
    labels = [lab for _, lab in parts]
    if outputs[0].ndim >= 3 and labels[0].ndim == 2:  # token outputs: pad the sequence axis
        longest = max(o.shape[1] for o in outputs)
        outputs = [np.pad(o, [(0, 0), (0, longest - o.shape[1])] + [(0, 0)] * (o.ndim - 2)) for o in outputs]
        labels = [np.pad(lab, [(0, 0), (0, longest - lab.shape[1])], constant_values=ignore_index) for lab in labels]
    return np.concatenate(outputs), np.concatenate(labels)


__all__ = ["PRIMARY_METRIC", "LOWER_IS_BETTER", "task_metrics", "mean_loss", "classification_metrics", "regression_metrics",
           "multilabel_metrics", "token_metrics", "perplexity", "primary_metric", "better", "merge_batches"]


def mean_loss(loss: LossName, outputs: np.ndarray, labels: np.ndarray, *, ignore_index: int | None = -100) -> float:
    """The bundle's training loss computed in numpy (for outputs that came from inference).

    Example:
        >>> import numpy as np
        >>> round(mean_loss("cross-entropy", np.array([[0.0, 0.0]]), np.array([1])), 4)
        0.6931
        >>> mean_loss("mse", np.array([[1.0], [3.0]]), np.array([0.0, 3.0]))
        0.5
    """
    outputs = np.asarray(outputs, np.float64)
    labels = np.asarray(labels)
    if loss == "mse":
        return float(((outputs.reshape(len(labels), -1) - labels.reshape(len(labels), -1)) ** 2).mean())
    if loss == "bce-with-logits":
        x, y = outputs.reshape(labels.shape), labels.astype(np.float64)
        return float((np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))).mean())
    if loss in ("cross-entropy", "token-cross-entropy"):
        flat = outputs.reshape(-1, outputs.shape[-1])
        target = labels.reshape(-1).astype(np.int64)
        keep = target != ignore_index if ignore_index is not None else np.ones(target.shape, bool)
        if not keep.any():
            return 0.0
        flat, target = flat[keep], target[keep]
        shifted = flat - flat.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        return float(-log_probs[np.arange(len(target)), target].mean())
    raise ValueError(f"no loss {loss!r}")
