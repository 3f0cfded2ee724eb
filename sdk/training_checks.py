"""Checks both training sessions apply before onnxruntime sees anything: the step's arrays,
the learning rate, trainable values. One place, so both backends refuse the same input with
the same message.

Example:
    >>> import numpy as np
    >>> check_training_feeds({"x": (np.float32, ["batch", 2])}, {"x": np.zeros((1, 2), np.float32)}, label_input="y")["x"].shape
    (1, 2)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .errors import InvalidArgumentError, InvalidUserDataError


def check_training_feeds(
    specs: Mapping[str, tuple[Any, Sequence[Any]]],
    given: Mapping[str, Any],
    *,
    label_input: str,
    classes: int | None = None,
    ignore_index: int | None = None,
) -> dict[str, np.ndarray]:
    """A training step's inputs and labels as arrays, each checked before onnxruntime sees it.

    Both training backends call this, so both refuse the same arrays with the same message.

    Args:
        specs: input name -> (numpy dtype or None, shape or None); a shape entry is a size,
            an axis name (inputs sharing a name must agree on it) or None/0 (any size).
        given: the caller's feeds, labels included under ``label_input``.
        label_input: the labels' input name.
        classes: the number of classes when the labels are class indices (else None).
        ignore_index: a label value that is skipped (token classification).

    Raises:
        InvalidUserDataError: an input is missing or has another dtype or shape, the inputs
            disagree on the number of examples, or a class index is out of range.

    Example:
        >>> specs = {"x": (np.float32, ["batch", 4]), "labels": (np.int64, ["batch"])}
        >>> feeds = check_training_feeds(specs, {"x": np.zeros((2, 4), np.float32), "labels": [0, 2]},
        ...                              label_input="labels", classes=3)
        >>> feeds["labels"].dtype
        dtype('int64')
        >>> check_training_feeds(specs, {"x": np.zeros((2, 4), np.float32), "labels": [0, 3]}, label_input="labels", classes=3)
        Traceback (most recent call last):
        ...
        bitfit.sdk.errors.InvalidUserDataError: input 'labels' holds class indices 0..3; the model has 3 classes: use 0..2
    """
    out: dict[str, np.ndarray] = {}
    sizes: dict[str, tuple[int, str]] = {}  # symbolic axis -> (size, the input that set it)
    for name, (dtype, shape) in specs.items():
        if name not in given:
            raise InvalidUserDataError(f"input {name!r} is missing: the training step takes {list(specs)}")
        value = given[name]
        if not isinstance(value, np.ndarray):
            try:
                value = np.asarray(value, dtype=dtype)
            except (TypeError, ValueError, OverflowError) as err:
                raise InvalidUserDataError(f"input {name!r} is not an array of {np.dtype(dtype)} ({err})") from err
        if dtype is not None and value.dtype != dtype:
            raise InvalidUserDataError(
                f"input {name!r} has dtype {value.dtype}, the training model takes {np.dtype(dtype)}: convert it "
                f"with .astype(np.{np.dtype(dtype).name})"
            )
        if shape is None:  # a shape the bundle does not record
            out[name] = value
            continue
        shape = list(shape)
        if value.ndim != len(shape):
            raise InvalidUserDataError(f"input {name!r} has shape {value.shape}, the training model takes {shape}")
        for axis, (have, dim) in enumerate(zip(value.shape, shape)):
            if isinstance(dim, int) and dim > 0 and have != dim:
                raise InvalidUserDataError(f"input {name!r} has size {have} on axis {axis}, the training model takes {shape}")
            if isinstance(dim, str) and dim:
                seen = sizes.setdefault(dim, (have, name))
                if seen[0] != have:
                    raise InvalidUserDataError(
                        f"input {name!r} has {have} on its {dim!r} axis but {seen[1]!r} has {seen[0]}: every input "
                        "and the labels must hold the same examples"
                    )
        out[name] = value
    labels = out.get(label_input)
    if classes is not None and labels is not None and labels.size and labels.dtype.kind in "iu":
        # Beyond the classes is no error inside the graph (OneHot gives zeros, ORT's loss
        # kernel does not check): a wrong loss, silently. So it is refused here.
        valid = labels[labels != ignore_index] if ignore_index is not None else labels
        if valid.size and (int(valid.min()) < 0 or int(valid.max()) >= classes):
            allowed = f"0..{classes - 1}" + (f" or {ignore_index} (ignored)" if ignore_index is not None else "")
            raise InvalidUserDataError(
                f"input {label_input!r} holds class indices {int(valid.min())}..{int(valid.max())}; "
                f"the model has {classes} classes: use {allowed}"
            )
    return out


def checked_learning_rate(value: Any) -> float:
    """A learning rate as a float, or InvalidArgumentError: finite and >= 0 (0 freezes the step).

    Example:
        >>> checked_learning_rate(1e-3), checked_learning_rate(0)
        (0.001, 0.0)
        >>> checked_learning_rate(float("nan"))
        Traceback (most recent call last):
        ...
        bitfit.sdk.errors.InvalidArgumentError: learning_rate must be a finite number >= 0, got nan
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not math.isfinite(value) or value < 0:
        raise InvalidArgumentError(f"learning_rate must be a finite number >= 0, got {value!r}")
    return float(value)


def checked_trainable_values(values: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """``values`` as float32 copies in their training shapes, or InvalidArgumentError naming the problem.

    Example:
        >>> checked_trainable_values({"b": [1, 2, 3]}, {"b": (3,)})["b"].dtype
        dtype('float32')
        >>> checked_trainable_values({"b": [1, 2]}, {"b": (3,)})
        Traceback (most recent call last):
        ...
        bitfit.sdk.errors.InvalidArgumentError: value for 'b' has 2 elements, the tensor has shape [3]
    """
    unknown = sorted(set(values) - set(shapes))
    if unknown:
        raise InvalidArgumentError(f"{unknown[:3]} are not trainable tensors of this bundle: it trains {list(shapes)[:5]}...")
    out = {}
    for name, value in values.items():
        array = np.asarray(value, np.float32)
        shape = tuple(shapes[name])
        if array.size != math.prod(shape):
            raise InvalidArgumentError(f"value for {name!r} has {array.size} elements, the tensor has shape {list(shape)}")
        out[name] = np.array(array.reshape(shape), np.float32, order="C")  # a copy: the caller keeps theirs
    return out


def label_classes(manifest: Any) -> int | None:
    """The number of classes when the labels are class indices, else None.

    Example:
        >>> from types import SimpleNamespace as NS
        >>> m = NS(outputs=[NS(name="logits", shape=["batch", 3])], logits_output="logits", loss="cross-entropy")
        >>> label_classes(m), label_classes(NS(**{**vars(m), "loss": "mse"}))
        (3, None)
    """
    logits = next((o for o in manifest.outputs if o.name == manifest.logits_output), manifest.outputs[0])
    classes = logits.shape[-1] if logits.shape else None
    return classes if manifest.loss in ("cross-entropy", "token-cross-entropy") and isinstance(classes, int) else None


__all__ = ["check_training_feeds", "checked_learning_rate", "checked_trainable_values", "label_classes"]
