"""Warnings about user data that cannot teach what the user expects.

``personalize`` trains on whatever it is given; these checks say, in the result, the log and
the ``bitfit`` command, when the outcome will not mean what it seems to: every example of
one class (the model learns to say that class to everything), classes with too few examples
to learn, a holdout too small for its before/after numbers to mean anything, no holdout at
all (no do-no-harm check), constant regression targets, a multi-label label never set.

Example:
    >>> import numpy as np
    >>> from bitfit.sdk.data import Examples
    >>> ex = Examples(labels=np.zeros(80, np.int64))
    >>> data_warnings("classification", ex, ex.subset(range(8)), label_names=["negative", "positive"])[0]
    "every example is labelled 'negative': the model can only learn to answer 'negative' to everything; give examples of the other labels too"
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .bundle import Task
from .data import Examples
from .training_plan import MIN_HOLDOUT_DATA

MIN_PER_CLASS = 3
"""Fewer examples than this of a class the data has: that class is barely learnable."""
MIN_MEANINGFUL_HOLDOUT = 20
"""A holdout smaller than this moves in steps of more than 5 points of accuracy."""



def data_warnings(task: Task, examples: Examples, held: Examples, *, label_names: Sequence[str] | None = None,
                  holdout_asked: bool = False) -> list[str]:
    """Plain-language warnings about ``examples`` (all of them) and the ``held`` holdout.

    Example:
        >>> import numpy as np
        >>> from bitfit.sdk.data import Examples
        >>> ex = Examples(labels=np.array([0] * 30 + [1] * 2))
        >>> data_warnings("classification", ex, ex.subset(range(0, 32, 4)))[0]
        'class 1 has only 2 example(s) (fewer than 3): it can barely be learned; give more examples of it'
    """
    found: list[str] = []
    name = (lambda i: repr(label_names[i]) if label_names and 0 <= i < len(label_names) else str(i))
    if task == "classification":
        counts = examples.class_counts()
        if len(counts) == 1:
            only = name(next(iter(counts)))
            found.append(f"every example is labelled {only}: the model can only learn to answer {only} to everything; "
                         "give examples of the other labels too")
        else:
            for label, count in sorted(counts.items()):
                if count < MIN_PER_CLASS:
                    found.append(f"class {name(label)} has only {count} example(s) (fewer than {MIN_PER_CLASS}): "
                                 "it can barely be learned; give more examples of it")
    elif task == "regression" and len(examples) > 1 and np.ptp(examples.labels.astype(np.float64)) == 0:
        found.append("every regression target is the same value: the model can only learn to predict that constant")
    elif task == "multilabel" and len(examples):
        never = np.flatnonzero(examples.labels.reshape(len(examples), -1).max(axis=0) <= 0.5)
        if len(never):
            found.append(f"label(s) {', '.join(name(int(i)) for i in never[:5])} are never set in the data: "
                         "the model learns to never predict them")
    if len(held) == 0 and not holdout_asked:  # holdout=0 given: the caller's informed choice, not news
        found.append(f"no holdout ({len(examples)} examples are too few to hold any out; give {MIN_HOLDOUT_DATA} or "
                     "more): nothing checks that the new delta is better than where the user started, and training "
                     "runs its full length")
    elif 0 < len(held) < MIN_MEANINGFUL_HOLDOUT and not examples.causal_lm:
        steps = (f"its before/after accuracy moves in steps of {100 / len(held):.0f} points"
                 if task == "classification" else "its before/after scores are noisy")
        found.append(f"the holdout has {len(held)} examples: {steps}, so read them as rough")
    return found


__all__ = ["data_warnings", "MIN_PER_CLASS", "MIN_MEANINGFUL_HOLDOUT"]
