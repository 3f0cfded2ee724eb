"""The training loop ``personalize`` runs: steps under a plan, holdout checkpoints, budgets.

It knows nothing about stores or deltas: it moves a training session's trainable values
from where they start to the best checkpoint the holdout saw, and reports what happened.
The session is either backend's (``bitfit.sdk.trainer``); both have ``train_step``,
``evaluate``, ``set_learning_rate`` and ``trainable_values``/``set_trainable_values``.

Example:
    >>> from bitfit.sdk.training_loop import run_training                   # doctest: +SKIP
    >>> outcome = run_training(session, plan, train, held, encoder=None, rng=rng, score=score)  # doctest: +SKIP
    >>> outcome.kept_step, outcome.stopped_by                                # doctest: +SKIP
    (40, 'steps')
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .data import Examples, TextEncoder, batches
from .errors import TrainingDivergedError
from .training_plan import TrainingPlan

StopReason = Literal["steps", "max_seconds", "early_stopping"]
"""``steps``: the plan's step budget (or ``epochs``/``max_steps``) ran out; ``max_seconds``:
the time budget; ``early_stopping``: ``patience`` holdout checks in a row without improvement."""

DIVERGENCE_FACTOR = 1e3
"""A step loss over this many times the first step's (or over this number, when the first loss
is below 1: a well-fit model's loss can jump from 0.01 to 10 on one batch) is divergence, finite
or not: AdamW at an absurd learning rate runs the loss up to 1e37 without an overflow."""

Score = Callable[[Any, Examples], "tuple[float, Any]"]
"""The holdout loss of a session's current values on some examples, and whatever else the
caller wants kept from that pass (e.g. the outputs its metrics are computed from): the loop
keeps it for the start and for the kept checkpoint, so nobody scores them a second time."""


@dataclass
class LoopOutcome:
    """What a training run did.

    Example:
        >>> LoopOutcome(steps=3, epochs_run=1, stopped_by="steps").kept_step
        0
    """

    steps: int
    epochs_run: int
    stopped_by: StopReason
    start_loss: float | None = None
    kept_step: int = 0
    """The step whose values the session holds at the end: the holdout's best checkpoint; 0 =
    the starting values (nothing beat them); without a holdout, the last step."""
    kept_loss: float | None = None
    history: list[tuple[int, float]] = field(default_factory=list)
    """(step, holdout loss) at every check, step 0 first."""
    seconds: float = 0.0
    start_scored: Any = field(default=None, repr=False, compare=False)
    """What ``score`` returned beside the loss for the starting values (None without a holdout)."""
    kept_scored: Any = field(default=None, repr=False, compare=False)
    """The same for the kept checkpoint."""

    @property
    def improved(self) -> bool:
        """Whether the kept values beat the start on the holdout (True without a holdout).

        Example:
            >>> LoopOutcome(steps=3, epochs_run=1, stopped_by="steps", start_loss=0.9, kept_step=3, kept_loss=0.7).improved
            True
        """
        if self.start_loss is None:
            return self.kept_step > 0
        return self.kept_step > 0 and self.kept_loss is not None and self.kept_loss < self.start_loss


def run_training(
    session: Any,
    plan: TrainingPlan,
    train: Examples,
    held: Examples,
    *,
    encoder: TextEncoder | None,
    rng: np.random.Generator,
    score: Score,
    ignore_index: int | None = None,
    patience: int | None = None,
    max_seconds: float | None = None,
    started: float | None = None,
    on_step: Callable[[int, int, float, float], None] | None = None,
) -> LoopOutcome:
    """Train ``session`` on ``train`` for ``plan.steps`` steps, keeping the holdout's best checkpoint.

    ``score(session, held)`` (loss, anything to keep) is called at step 0 and every ``plan.evaluate_every`` steps (and
    at the last step); the values with the lowest holdout loss are restored at the end, so a
    run that only got worse leaves the session where it started (``kept_step == 0``).
    ``on_step(step, epoch, loss, seconds)`` is called after every step. A non-finite loss
    raises TrainingDivergedError (the caller saves nothing).

    Example:
        >>> outcome = run_training(session, plan, train, held, encoder=enc, rng=rng, score=score)   # doctest: +SKIP
    """
    started = time.perf_counter() if started is None else started
    outcome = LoopOutcome(steps=0, epochs_run=0, stopped_by="steps")
    best: tuple[float, int, dict[str, np.ndarray], Any] | None = None
    if len(held):
        loss, scored = score(session, held)
        outcome.start_loss, outcome.start_scored = loss, scored
        outcome.history.append((0, loss))
        best = (loss, 0, session.trainable_values(), scored)
    stale = 0
    step = 0
    first_loss: float | None = None
    while step < plan.steps and outcome.stopped_by == "steps":
        outcome.epochs_run += 1
        for feeds, labels in batches(train, encoder, plan.batch_size, rng, ignore_index=ignore_index, by_length=True):
            session.set_learning_rate(plan.learning_rate_at(step))
            loss = session.train_step(feeds, labels)
            step += 1
            first_loss = float(loss) if first_loss is None else first_loss
            if not np.isfinite(loss) or loss > DIVERGENCE_FACTOR * max(first_loss, 1.0):
                what = (f"the loss became {loss}" if not np.isfinite(loss) else
                        f"the loss grew from {first_loss:.3g} to {loss:.3g}")
                raise TrainingDivergedError(
                    f"{what} at step {step} (learning rate {plan.learning_rate_at(step - 1):g}); lower the learning rate"
                )
            elapsed = time.perf_counter() - started
            if on_step is not None:
                on_step(step, outcome.epochs_run, float(loss), elapsed)
            last = step >= plan.steps or (max_seconds is not None and elapsed >= max_seconds)
            if best is not None and (step % plan.evaluate_every == 0 or last):
                held_loss, scored = score(session, held)
                outcome.history.append((step, held_loss))
                if held_loss < best[0]:
                    best, stale = (held_loss, step, session.trainable_values(), scored), 0
                else:
                    stale += 1
                    if patience is not None and stale >= patience and not last:
                        outcome.stopped_by = "early_stopping"
                        break
            if max_seconds is not None and elapsed >= max_seconds:
                outcome.stopped_by = "max_seconds"
                break
            if step >= plan.steps:
                break
    outcome.steps = step
    if best is not None:
        session.set_trainable_values(best[2])
        outcome.kept_loss, outcome.kept_step, outcome.kept_scored = best[0], best[1], best[3]
    else:
        outcome.kept_step = step
    outcome.seconds = time.perf_counter() - started
    return outcome


__all__ = ["StopReason", "Score", "LoopOutcome", "run_training", "DIVERGENCE_FACTOR"]
