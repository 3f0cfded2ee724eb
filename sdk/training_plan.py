"""How long, how fast and on what ``personalize`` trains, decided from the data it is given.

An app calls ``personalize(user_data)`` for thousands of users and cannot tune anything per
user, so the SDK chooses, and says why (the plan goes into the result and the delta's info):

- **holdout**: none below ``MIN_HOLDOUT_DATA`` examples (a handful of held-out examples
  judge nothing and cost a large share of the data); else ``HOLDOUT_FRACTION`` of the data,
  between ``MIN_HOLDOUT`` and ``MAX_HOLDOUT`` examples, stratified by class. It picks the
  checkpoint to keep and guards against harm: a delta the holdout scores worse than the
  starting point is never saved.
- **length**: a step budget, not a fixed epoch count: ``EPOCHS`` passes over the training
  examples (``SMALL_MODEL_EPOCHS`` for a model under ``SMALL_MODEL_VALUES`` values, whose
  steps are cheap), but at least ``MIN_STEPS`` steps (tiny data sets need many passes) and at
  most ``MAX_STEPS`` (large ones need fewer).
- **learning rate**: the bundle's (``training_defaults``, chosen at export for the model's
  size) as the peak of a schedule: linear warm-up over ``WARMUP_FRACTION`` of the steps, then
  linear decay to zero, which makes the result far less sensitive to the peak's exact value.
- **batch size**: ``BATCH_SIZE`` (``SMALL_MODEL_BATCH_SIZE`` for a small model), or the whole
  training set when it is smaller. A pretrained-size model's step costs in proportion to its
  examples, and on the tuning users 2 passes in batches of 8 reached the accuracy of 3 passes
  in batches of 16 (the same number of updates) at under half the compute.

Every choice can be overridden by the caller; a given value is used as given.

Example:
    >>> plan = plan_training(150, learning_rate=4e-3)
    >>> plan.holdout, plan.batch_size, plan.steps, plan.warmup_steps
    (15, 8, 34, 3)
    >>> round(plan.learning_rate_at(0), 6), round(plan.learning_rate_at(3), 6), plan.learning_rate_at(34)
    (0.001, 0.004, 0.0)
    >>> plan_training(12, learning_rate=1e-2).holdout                  # too few to hold any out
    0
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Schedule = Literal["warmup-linear", "constant"]
"""``warmup-linear``: linear warm-up, then linear decay to zero (the default); ``constant``."""

BATCH_SIZE = 8
"""Examples per step for a pretrained-size model (>= ``SMALL_MODEL_VALUES`` values). Measured with
``make quality``'s four tweet tuning users x 3 seeds on MiniLM (the closing note of issue 11):
mean test accuracy 0.747 in batches of 8 for 2 passes vs 0.750 in batches of 16 for 3 passes,
in 6.5 s vs 10.7 s a user (``tools/tune_defaults.py --users quality-tuning --seeds 3``)."""
SMALL_MODEL_BATCH_SIZE = 16
"""Examples per step for a small model, whose steps cost little next to their fixed overhead."""
EPOCHS = 2
"""Passes over the training examples for a pretrained-size model (>= ``SMALL_MODEL_VALUES``)."""
SMALL_MODEL_EPOCHS = 5
"""Passes for a small model: its steps cost little, and 3 passes left a 3 k-value text model
16 points short of 5 (tools/tune_defaults.py, the device suite's tiny bundles)."""
SMALL_MODEL_VALUES = 1_000_000
MIN_STEPS = 30
MAX_STEPS = 400
WARMUP_FRACTION = 0.1
HOLDOUT_FRACTION = 0.1
MIN_HOLDOUT_DATA = 20
MIN_HOLDOUT = 8
MAX_HOLDOUT = 40
EVALUATIONS = 3
"""About how many times the holdout is scored during training (checkpoints to choose from), after
the start. Each costs a forward pass over the holdout; 6 changed no tuning user's result."""


SMALL_MODEL = (3_000, 0.1)
"""(total parameter values, peak learning rate) measured best for small models (tools/tune_defaults.py)."""
LARGE_MODEL = (22_566_531, 4e-3)
"""The same for MiniLM-L6 (22.6 M values) on the per-domain tweet users."""
MIN_LEARNING_RATE = 5e-4


def is_small_model(total_values: int | None) -> bool:
    """Whether a model of ``total_values`` values is small (under ``SMALL_MODEL_VALUES``); an
    unknown size counts as pretrained-size. Its steps are cheap next to their fixed costs: it
    trains longer in larger batches, on one thread, without graph optimizations, and a
    Personalizer keeps its session.

    Example:
        >>> is_small_model(20_000), is_small_model(22_600_000), is_small_model(None)
        (True, False, False)
    """
    return total_values is not None and total_values < SMALL_MODEL_VALUES


def learning_rate_for_size(total_values: int) -> float:
    """The peak learning rate for a model of ``total_values`` parameter values: geometric
    interpolation between the two measured anchors (``SMALL_MODEL``, ``LARGE_MODEL``), held at
    the small anchor below it and following the same slope above the large one (down to
    ``MIN_LEARNING_RATE``). Bias-only training of a small model needs far larger steps: the
    best peak measured for a 3 k-value model was 25x MiniLM's.

    Example:
        >>> learning_rate_for_size(1_443), learning_rate_for_size(22_566_531)
        (0.1, 0.004)
        >>> learning_rate_for_size(260_000)
        0.02
    """
    (small_n, small_lr), (large_n, large_lr) = SMALL_MODEL, LARGE_MODEL
    if total_values <= small_n:
        return small_lr
    slope = math.log(large_lr / small_lr) / math.log(large_n / small_n)
    value = small_lr * (total_values / small_n) ** slope
    return float(max(MIN_LEARNING_RATE, round(value, 2 - int(math.floor(math.log10(value))))))  # 3 significant digits


@dataclass(frozen=True)
class TrainingPlan:
    """What one ``personalize`` call will do; ``reasons`` says where each value came from.

    Example:
        >>> plan = plan_training(40, learning_rate=1e-3, epochs=2)
        >>> plan.steps, plan.reasons["steps"]
        (8, 'epochs=2 given: 2 x 4 steps')
    """

    examples: int
    holdout: int
    batch_size: int
    steps: int
    steps_per_epoch: int
    learning_rate: float
    schedule: Schedule
    warmup_steps: int
    evaluate_every: int
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def train_examples(self) -> int:
        """Examples left for training once the holdout is set aside.

        Example:
            >>> plan_training(100, learning_rate=1e-3).train_examples
            90
        """
        return self.examples - self.holdout

    def learning_rate_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based) under the schedule.

        Example:
            >>> plan = plan_training(150, learning_rate=1e-3, schedule="constant")
            >>> plan.learning_rate_at(0) == plan.learning_rate_at(40) == 1e-3
            True
        """
        if self.schedule == "constant":
            return self.learning_rate
        if step < self.warmup_steps:
            return self.learning_rate * (step + 1) / (self.warmup_steps + 1)
        remaining = self.steps - self.warmup_steps
        return self.learning_rate * max(0.0, (self.steps - step) / remaining) if remaining > 0 else self.learning_rate

    def as_dict(self) -> dict[str, Any]:
        """The plan as plain JSON-able values (what the delta's info records).

        Example:
            >>> sorted(plan_training(30, learning_rate=1e-3).as_dict())[:4]
            ['batch_size', 'evaluate_every', 'examples', 'holdout']
        """
        return asdict(self)


def plan_training(
    examples: int,
    *,
    learning_rate: float,
    learning_rate_from: str = "argument",
    epochs: int | None = None,
    batch_size: int | None = None,
    holdout: float | None = None,
    schedule: Schedule = "warmup-linear",
    max_steps: int | None = None,
    model_values: int | None = None,
) -> TrainingPlan:
    """The plan for ``examples`` (after de-duplication), with the caller's overrides applied.

    ``holdout`` is a fraction in [0, 1) (None: chosen as described in the module docstring);
    ``epochs`` fixes the length (None: the step budget); ``max_steps`` caps it either way.
    ``model_values`` (the model's parameter count, from the manifest) picks the passes.

    Example:
        >>> plan_training(5000, learning_rate=2e-3).steps                 # capped for large data
        400
        >>> plan_training(150, learning_rate=0.1, model_values=3_203).steps  # a small model: 5 passes
        45
        >>> plan_training(8, learning_rate=2e-3).steps                    # many passes for tiny data
        30
    """
    reasons: dict[str, str] = {}
    if holdout is None:
        if examples < MIN_HOLDOUT_DATA:
            held = 0
            reasons["holdout"] = f"none: {examples} examples are fewer than {MIN_HOLDOUT_DATA}, too few to spare any"
        else:
            held = min(MAX_HOLDOUT, max(MIN_HOLDOUT, round(HOLDOUT_FRACTION * examples)))
            reasons["holdout"] = f"{HOLDOUT_FRACTION:g} of {examples} examples, within [{MIN_HOLDOUT}, {MAX_HOLDOUT}]"
    else:
        held = math.floor(examples * holdout)
        if holdout > 0 and examples >= 4:
            held = max(held, 1)
        if examples - held < 1:
            held = 0
        reasons["holdout"] = f"holdout={holdout:g} given"
    train = examples - held
    small = is_small_model(model_values)
    if batch_size is None:
        size = SMALL_MODEL_BATCH_SIZE if small else BATCH_SIZE
        batch_size = max(1, min(size, train))
        reasons["batch_size"] = f"{size}, or every training example when fewer" + (" (a small model)" if small else "")
    else:
        reasons["batch_size"] = "given"
    per_epoch = -(-train // batch_size)
    if epochs is None:
        passes = SMALL_MODEL_EPOCHS if small else EPOCHS
        steps = min(MAX_STEPS, max(MIN_STEPS, passes * per_epoch))
        reasons["steps"] = (f"{passes} epochs of {per_epoch} steps, within [{MIN_STEPS}, {MAX_STEPS}]"
                            + (" (a small model)" if small else ""))
    else:
        steps = epochs * per_epoch
        reasons["steps"] = f"epochs={epochs} given: {epochs} x {per_epoch} steps"
    if max_steps is not None and max_steps < steps:
        steps = max_steps
        reasons["steps"] += f", capped by max_steps={max_steps}"
    warmup = int(WARMUP_FRACTION * steps) if schedule == "warmup-linear" else 0
    reasons["learning_rate"] = (f"{learning_rate:g} from the {learning_rate_from}"
                                + (f", peak of a {schedule} schedule" if schedule == "warmup-linear" else ", constant"))
    every = max(1, min(per_epoch, -(-steps // EVALUATIONS))) if held else steps
    return TrainingPlan(
        examples=examples, holdout=held, batch_size=batch_size, steps=steps, steps_per_epoch=per_epoch,
        learning_rate=float(learning_rate), schedule=schedule, warmup_steps=warmup, evaluate_every=every, reasons=reasons,
    )


__all__ = ["Schedule", "TrainingPlan", "plan_training", "is_small_model", "learning_rate_for_size", "SMALL_MODEL", "LARGE_MODEL", "BATCH_SIZE", "EPOCHS", "MIN_STEPS", "MAX_STEPS",
           "SMALL_MODEL_EPOCHS", "SMALL_MODEL_BATCH_SIZE", "SMALL_MODEL_VALUES", "WARMUP_FRACTION", "HOLDOUT_FRACTION", "MIN_HOLDOUT_DATA", "MIN_HOLDOUT", "MAX_HOLDOUT", "EVALUATIONS"]
