"""The facade a device app calls: ``personalize(user_data, user=...)`` trains the user's
biases locally and saves a delta; ``predict(inputs, user=...)`` applies it.

Example:
    >>> from bitfit.sdk import Personalizer
    >>> p = Personalizer("bundles/minilm-sentiment", store="~/.local/share/bitfit")        # doctest: +SKIP
    >>> result = p.personalize([("great flight!", "positive"), ("lost my bag", "negative")], user="alice")  # doctest: +SKIP
    >>> p.predict(["great flight!"], user="alice").labels                                   # doctest: +SKIP
    ['positive']
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

import numpy as np

from .bundle import Bundle
from .data import DEFAULT_MAX_EXAMPLES, Examples, TextEncoder, load_examples, scoring_batches, split_holdout
from .data_checks import data_warnings
from .delta import Delta, Encoding, check_delta_fits
from .errors import (
    BitfitError, BundleInvalidError, DeltaCorruptError, DeltaMismatchError, DeltaNotFoundError, InvalidArgumentError,
    InvalidUserDataError, ResourceExhaustedError, TrainingDivergedError,
)
from .population import INFO_KEY as POPULATION_INFO_KEY
from .population import check_population_name, load_population
from .population import offsets as population_offsets
from .options import (
    DEFAULT_PROVIDERS, DEFAULT_VERIFY, Providers, Verify, check_choice, check_threads, open_store, providers_from_device,
)
from .metrics import merge_batches, mean_loss, perplexity, task_metrics
from .runtime import cuda_available, is_out_of_memory
from .predictor import GraphOptimization, Prediction, Predictor
from .store import DeltaStore
from .trainer import BackendChoice, Device, IdleSession, open_training_session
from .training_loop import LoopOutcome, StopReason, run_training
from .training_plan import Schedule, TrainingPlan, is_small_model, learning_rate_for_size, plan_training

log = logging.getLogger("bitfit.sdk")

RETRY_FACTOR = 0.25
"""The learning rate of the second run, relative to the first, when the first did not help."""
DEFAULT_LEARNING_RATE = 2e-3
"""The learning rate for a bundle whose manifest has neither ``training_defaults.learning_rate``
nor the model's size (``policy.total_values``): the value tuned for the built-in MiniLM."""
ProgressCallback = Callable[["Progress"], None]


@dataclass(frozen=True)
class Progress:
    """What a progress callback receives after each training step.

    Example:
        >>> seen = []
        >>> p.personalize(data, user="alice", progress=seen.append)          # doctest: +SKIP
        >>> seen[-1].step == seen[-1].total_steps                             # doctest: +SKIP
        True
    """

    user: str
    step: int
    total_steps: int
    epoch: int
    loss: float
    seconds: float


@dataclass(frozen=True)
class PersonalizeResult:
    """What one ``personalize`` call did, with holdout metrics before and after.

    ``metrics_before``/``metrics_after`` hold the task's metrics on the holdout (accuracy and
    macro F1 for classifiers, MAE/RMSE for regression, F1 per label for multi-label, token
    accuracy for token classification, perplexity for causal LMs) and its ``loss``;
    ``accuracy_before``/``accuracy_after`` repeat a classifier's accuracy. ``warnings`` says
    when the data cannot teach what the user expects (``bitfit.sdk.data_checks``). ``plan``
    is what the SDK chose (steps, learning rate, holdout, ...) and why.

    Example:
        >>> r = Personalizer("bundles/tiny", store="/tmp/deltas").personalize(data, user="alice")   # doctest: +SKIP
        >>> r.saved, r.metrics_before["accuracy"], r.metrics_after["accuracy"], r.plan["steps"]      # doctest: +SKIP
        (True, 0.55, 0.8, 45)
    """

    user: str
    version: int
    """The user's current version after the call (0: no delta, the base model)."""
    saved: bool
    """False when nothing was saved: the holdout said no checkpoint beat where the user started."""
    delta_bytes: int
    encoding: str
    steps: int
    epochs_run: int
    seconds: float
    examples_used: int
    holdout_examples: int
    duplicates_removed: int
    loss_before: float | None
    loss_after: float | None
    accuracy_before: float | None
    accuracy_after: float | None
    stopped_by: StopReason
    started_from: Literal["base", "population", "previous-delta"]
    kept_step: int = 0
    """The step whose biases were kept: the holdout's best checkpoint; 0 = the starting biases."""
    backend: str = ""
    """The training backend that ran: ``portable`` or ``ort-training``."""
    learning_rate: float = 0.0
    """The peak learning rate of the run that was kept."""
    metrics_before: dict[str, float] = field(default_factory=dict)
    metrics_after: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    plan: dict[str, Any] = field(default_factory=dict)
    retried: bool = False
    """Whether a second run at a lower learning rate was made because the first did not help."""

    def as_dict(self) -> dict[str, Any]:
        """The result as plain values (JSON-able).

        Example:
            >>> r.as_dict()["saved"]                                    # doctest: +SKIP
            True
        """
        return asdict(self)


@dataclass(frozen=True)
class FitResult:
    """What ``Personalizer.fit`` trained, before anything is saved.

    ``improved``: the holdout says the values beat the start (True without a holdout), the
    condition under which ``personalize`` saves them.

    Example:
        >>> fit = p.fit(data)                                                 # doctest: +SKIP
        >>> fit.improved, fit.metrics_after["accuracy"]                       # doctest: +SKIP
        (True, 0.82)
    """

    values: dict[str, np.ndarray]
    plan: TrainingPlan
    outcome: LoopOutcome
    metrics_before: dict[str, float]
    metrics_after: dict[str, float]
    warnings: list[str]
    retried: bool
    backend: str
    learning_rate_from: str
    train_examples: int
    holdout_examples: int
    duplicates_removed: int
    seconds: float

    @property
    def improved(self) -> bool:
        """Whether the holdout says the trained values beat the start (True without a holdout).

        Example:
            >>> fit.improved                                                  # doctest: +SKIP
            True
        """
        return not self.holdout_examples or self.outcome.improved

    def info(self) -> dict[str, Any]:
        """What a delta's info records about this training run (JSON-able).

        Example:
            >>> fit.info()["plan"]["steps"]                                   # doctest: +SKIP
            30
        """
        o = self.outcome
        return {
            "steps": o.steps, "epochs_run": o.epochs_run, "examples": self.train_examples,
            "holdout_examples": self.holdout_examples, "seconds": round(self.seconds, 3),
            "learning_rate": self.plan.learning_rate, "learning_rate_from": self.learning_rate_from,
            "batch_size": self.plan.batch_size, "stopped_by": o.stopped_by,
            "metrics": {"before": self.metrics_before, "after": self.metrics_after}, "holdout_losses": o.history,
            "kept_step": o.kept_step, "backend": self.backend, "plan": self.plan.as_dict(), "retried": self.retried,
            "warnings": self.warnings,
        }


class Personalizer:
    """Local training and per-user inference over one bundle and one delta store.

    The options have the same names, values and defaults in :class:`~bitfit.sdk.predictor.Predictor`
    and the ``bitfit`` command (``bitfit.sdk.options``); a wrong value is an InvalidArgumentError.

    One Personalizer serves many users: for a model under 1 M values it keeps its training
    session between calls and restarts it for the next one (fresh values, optimizer moments
    and rate: each delta is what a new Personalizer would train); concurrent calls never
    share a session. A larger model's sessions are built per call (MiniLM's hold hundreds of
    MB) unless ``keep_training_session=True``.

    Args:
        bundle: a bundle directory (or an opened Bundle).
        store: where deltas live: a path, a DeltaStore, or None (default) for the platform's
            data directory (``platformdirs.user_data_dir("bitfit")/deltas``); Predictor's
            ``store=None`` is the same directory, so it serves what this class saves.
        providers: where training *and* inference run: "cpu" (default), "cuda" (refused with
            ProviderUnavailableError where this onnxruntime has no CUDA), "auto" (CUDA where
            this build has it, else CPU) or a list of execution providers (CPU appended as
            the fallback; the ort-training backend takes CPU and CUDA only).
        backend: the training backend: "auto" (default: ``portable`` where the bundle has its
            models, else ``ort-training``), "portable" (plain onnxruntime) or "ort-training"
            (onnxruntime-training 1.19.2); see ``bitfit.sdk.trainer.open_training_session``.
        threads: onnxruntime's intra-op threads for training and inference: an int (0: onnxruntime's
            default, one per core), or None: the SDK's choice, onnxruntime's default except for
            training a model under 1 M values, on one thread (``bitfit.sdk.options.session_threads``).
        key: AES key to encrypt deltas at rest (see docs/security.md).
        on_bad_delta: "fallback" serves the base model for a user whose delta is corrupt or
            for another base (reported in ``Prediction.fallbacks``); "raise" raises.
        verify: how the bundle's files are checked on opening: "hashes" (default), "sizes"
            or "none" (``Bundle.open``).
        population: the name of a population delta in the store (a fleet's shared delta,
            ``bitfit.sdk.population``): personalize starts from base + population (+ the user's
            delta) and saves the user's delta relative to base + the current population,
            recording its version; predict applies it. None (default): no population.
        device: deprecated alias of ``providers`` ("cpu" or "cuda"); warns.
        keep_training_session: keep the training session between calls and restart it for the
            next one: None (default) for a model under 1 M values only; True for any model (a
            server personalizing MiniLM users one after another skips building its sessions on
            every call after the first, and holds their hundreds of MB while idle); False never.

    Example:
        >>> Personalizer("bundles/tiny", store=False)            # doctest: +SKIP
        Traceback (most recent call last):
        ...
        bitfit.sdk.errors.InvalidArgumentError: store must be a path, a DeltaStore, None (the platform's data directory), got False
    """

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike,
        store: DeltaStore | str | os.PathLike | None = None,
        *,
        providers: Providers = DEFAULT_PROVIDERS,
        backend: BackendChoice = "auto",
        threads: int | None = None,
        key: bytes | None = None,
        on_bad_delta: Literal["fallback", "raise"] = "fallback",
        graph_optimization: GraphOptimization | None = None,
        verify: Verify = DEFAULT_VERIFY,
        device: Device | None = None,
        population: str | None = None,
        keep_training_session: bool | None = None,
    ) -> None:
        providers = providers_from_device(providers, device)
        if keep_training_session is not None and type(keep_training_session) is not bool:
            raise InvalidArgumentError(f"keep_training_session must be None, True or False, got {keep_training_session!r}")
        check_choice("backend", backend, get_args(BackendChoice))
        check_choice("verify", verify, ("hashes", "sizes", "none"))
        check_choice("on_bad_delta", on_bad_delta, ("fallback", "raise"))
        if graph_optimization is not None:
            check_choice("graph_optimization", graph_optimization, get_args(GraphOptimization))
        check_threads(threads)
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle, verify=verify)
        self.store = open_store(store, key, allow_none=False)
        self.providers = providers
        self.backend = backend
        self.threads = threads
        self.population = check_population_name(population)
        self._predictor_options = {"providers": providers, "threads": threads, "on_bad_delta": on_bad_delta,
                                   "population": self.population}
        if graph_optimization:
            self._predictor_options["graph_optimization"] = graph_optimization
        self._predictor: Predictor | None = None
        self._encoder = TextEncoder(self.bundle) if self.bundle.manifest.text else None
        self._base: dict[str, np.ndarray] | None = None
        # A small model's training session is kept between calls and restarted for the next
        # user (a few MB); a large model's only when asked (MiniLM's hold hundreds of MB).
        small = is_small_model(self.bundle.manifest.total_values)
        self._idle_session = IdleSession(keep=small if keep_training_session is None else keep_training_session)

    @property
    def predictor(self) -> Predictor:
        """The shared inference session (built on first use).

        Example:
            >>> p.predictor.predict(["great flight!"]).labels                  # doctest: +SKIP
            ['positive']
        """
        if self._predictor is None:
            self._predictor = Predictor(self.bundle, self.store, **self._predictor_options)
        return self._predictor

    @property
    def base_trainable(self) -> dict[str, np.ndarray]:
        """The bundle's trainable tensors at their base values (what a delta is relative to).

        Example:
            >>> len(p.base_trainable), p.base_trainable["classifier.bias"].shape    # doctest: +SKIP
            (50, (3,))
        """
        if self._base is None:
            self._base = self.bundle.trainable_base()
        return self._base

    def current_delta(self, user: str) -> Delta | None:
        """The user's current delta, checked against this bundle; None if there is none.

        Example:
            >>> p.current_delta("nobody") is None                             # doctest: +SKIP
            True
        """
        try:
            delta = self.store.load(user)
        except DeltaNotFoundError:
            return None
        check_delta_fits(delta, base_fingerprint=self.bundle.manifest.base_fingerprint,
                         shapes=self.bundle.manifest.trainable_shapes)
        return delta

    def _start_values(self, user: str, reset: bool, reference: dict[str, np.ndarray], population: dict[str, Any] | None
                      ) -> tuple[dict[str, np.ndarray] | None, bool]:
        """The values training starts from (None: the base) and whether they are the user's own.

        The user's current model: base + their delta (+ the population version it was trained
        on); without one (or with ``reset``), ``reference``: base + the current population
        (``_reference``), or None where there is no population.
        """
        delta = None if reset else self._start_delta(user)
        if delta is not None:
            try:
                added = population_offsets(delta, self.store, self.bundle.manifest)
            except DeltaMismatchError as err:
                raise DeltaMismatchError(f"{err}. Or pass reset=True to start from base + the current population") from err
            return {n: self.base_trainable[n] + added[n].reshape(self.base_trainable[n].shape) for n in self.base_trainable}, True
        return (reference if population is not None else None), False

    def _reference(self) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
        """What a new user delta is relative to: base + the current population, and its info record."""
        if self.population is None:
            return self.base_trainable, None
        try:
            delta, ref = load_population(self.store, self.population, self.bundle.manifest)
        except DeltaNotFoundError:
            return self.base_trainable, None
        return delta.apply_to(self.base_trainable), ref.as_info()

    def _start_delta(self, user: str) -> Delta | None:
        """The delta to continue from; an unusable one is refused with the way out (reset)."""
        try:
            return self.current_delta(user)
        except (DeltaCorruptError, DeltaMismatchError) as err:
            # Personalizing again without reset would hit the same delta: say how to start over.
            raise type(err)(
                f"{err}. {user!r}'s current delta cannot be continued: pass reset=True (bitfit personalize "
                "--reset) to train from the base model; nothing was saved"
            ) from err

    def personalize(
        self,
        user_data: Any,
        user: str,
        *,
        epochs: int | None = None,
        learning_rate: float | None = None,
        batch_size: int | None = None,
        holdout: float | None = None,
        schedule: Schedule = "warmup-linear",
        max_steps: int | None = None,
        max_seconds: float | None = None,
        seed: int = 0,
        progress: ProgressCallback | None = None,
        progress_bar: bool | None = None,
        reset: bool = False,
        encoding: Encoding = "fp16",
        patience: int | None = None,
        max_examples: int = DEFAULT_MAX_EXAMPLES,
    ) -> PersonalizeResult:
        """Train ``user``'s biases on ``user_data`` and save the result as a new delta version.

        With no options, the SDK decides (``bitfit.sdk.training_plan``): a holdout of ~10% of
        the data (none below 20 examples), stratified by class; a step budget of 2 epochs in
        batches of 8 (5 epochs in batches of 16 for a model under 1 M values), at least 30 and at
        most 400 steps; the bundle's learning rate as the peak of a warm-up + linear-decay
        schedule. The holdout is scored at the start and ~3 times more; the best checkpoint is kept,
        and if none beats where the user started, one more run at a quarter of the learning
        rate is tried (when the rate was not given); if that does not help either, **nothing
        is saved** (``saved=False``: the user keeps the delta they had). What was chosen and
        why is in ``result.plan`` and the delta's info; ``result.warnings`` says when the data
        cannot teach what the user expects (one class only, a tiny holdout, ...).

        Continues from the user's current delta unless ``reset``. Any choice can be given:
        ``epochs`` (instead of the step budget), ``learning_rate`` (the peak), ``batch_size``,
        ``holdout`` (a fraction in [0, 1)), ``schedule`` ("warmup-linear" or "constant"),
        ``patience`` (stop after that many holdout checks without improvement; None = run the
        whole budget). ``max_steps`` and ``max_seconds`` cap the run (a device's budget). If the
        loss becomes NaN/inf, nothing is saved and the previous delta stays current.

        Example:
            >>> r = p.personalize("alice.jsonl", user="alice", max_seconds=30)      # doctest: +SKIP
            >>> r.saved, r.accuracy_before, r.accuracy_after, r.delta_bytes          # doctest: +SKIP
            (True, 0.61, 0.78, 51812)
        """
        _check_user(user)
        if encoding not in get_args(Encoding):
            raise InvalidArgumentError(f"encoding must be fp32, fp16 or int8, got {encoding!r}")
        # One read of the current population: the start and the saved delta's reference agree
        # even if the fleet publishes a new version meanwhile.
        reference, population = self._reference()
        start_values, own = self._start_values(user, reset, reference, population)
        fit = self.fit(user_data, start=start_values, user=user,
                       epochs=epochs, learning_rate=learning_rate, batch_size=batch_size, holdout=holdout,
                       schedule=schedule, max_steps=max_steps, max_seconds=max_seconds, seed=seed, progress=progress,
                       progress_bar=progress_bar, patience=patience, max_examples=max_examples)
        started_from = "previous-delta" if own else ("population" if start_values is not None else "base")
        info = {**fit.info(), "seed": seed, "started_from": started_from}
        if population is not None:
            info[POPULATION_INFO_KEY] = population
        if fit.improved:
            delta = Delta.from_params(fit.values, reference, self.bundle.manifest.base_fingerprint,
                                      encoding=encoding, info=info)
            version = self.store.save(user, delta)
            if self._predictor is not None:
                self._predictor.invalidate(user)
            size = self.store.version_bytes(user, version)
        else:
            log.warning("user %r: no checkpoint beat the starting biases on the holdout (%d examples); nothing was "
                        "saved. Give more or more varied examples.", user, fit.holdout_examples)
            version, size = self._current_version(user), 0
        o = fit.outcome
        return PersonalizeResult(
            user=user, version=version, saved=fit.improved, delta_bytes=size, encoding=encoding, steps=o.steps,
            epochs_run=o.epochs_run, seconds=fit.seconds, examples_used=fit.train_examples,
            holdout_examples=fit.holdout_examples, duplicates_removed=fit.duplicates_removed,
            loss_before=fit.metrics_before.get("loss"), loss_after=fit.metrics_after.get("loss"),
            accuracy_before=fit.metrics_before.get("accuracy"), accuracy_after=fit.metrics_after.get("accuracy"),
            stopped_by=o.stopped_by, started_from=started_from,  # type: ignore[arg-type]
            kept_step=o.kept_step, backend=fit.backend, learning_rate=fit.plan.learning_rate,
            metrics_before=fit.metrics_before, metrics_after=fit.metrics_after, warnings=fit.warnings,
            plan=fit.plan.as_dict(), retried=fit.retried,
        )

    def fit(
        self,
        user_data: Any,
        *,
        start: dict[str, np.ndarray] | None = None,
        user: str = "-",
        epochs: int | None = None,
        learning_rate: float | None = None,
        batch_size: int | None = None,
        holdout: float | None = None,
        schedule: Schedule = "warmup-linear",
        max_steps: int | None = None,
        max_seconds: float | None = None,
        seed: int = 0,
        progress: ProgressCallback | None = None,
        progress_bar: bool | None = False,
        patience: int | None = None,
        max_examples: int = DEFAULT_MAX_EXAMPLES,
    ) -> "FitResult":
        """Train the trainable tensors from ``start`` (None: the base) on ``user_data`` and return
        them, saving nothing: what ``personalize`` does before it stores a delta, for callers
        that keep the values themselves (a federated client sending an update, an experiment).

        The options mean what they mean in ``personalize``; ``user`` only names the run in logs.

        Example:
            >>> fit = p.fit(data, start=None, max_steps=20)                   # doctest: +SKIP
            >>> fit.improved, fit.outcome.steps, sorted(fit.values)[:1]        # doctest: +SKIP
            (True, 20, ['classifier.bias'])
        """
        manifest = self.bundle.manifest
        rate, rate_from = _learning_rate(learning_rate, manifest)
        _check_options(epochs, rate, batch_size, max_steps, max_seconds, patience, holdout, schedule)
        started = time.perf_counter()
        examples = load_examples(user_data, self.bundle, self._encoder, max_examples=max_examples)
        plan = plan_training(len(examples), learning_rate=rate, learning_rate_from=rate_from, epochs=epochs,
                             batch_size=batch_size, holdout=holdout, schedule=schedule, max_steps=max_steps,
                             model_values=manifest.total_values)
        rng = np.random.default_rng(seed)
        classes = examples.labels if manifest.loss == "cross-entropy" else None
        train_index, holdout_index = split_holdout(len(examples), plan.holdout, rng, labels=classes)
        train, held = examples.subset(train_index), examples.subset(holdout_index)
        warnings = data_warnings(manifest.task, examples, held, label_names=manifest.labels,
                                 holdout_asked=holdout is not None and len(held) == 0)
        for text in warnings:
            log.warning("user %r: %s", user, text)
        start_values = dict(start) if start is not None else None

        bar = _progress_bar(plan.steps, user, progress_bar)
        try:
            retried = False
            session = self._open_session(start_values, plan.learning_rate)
            try:
                outcome = self._train(session, plan, train, held, rng, started, user, patience, max_seconds, bar, progress,
                                      examples)
            except TrainingDivergedError as err:
                if rate_from == "argument":
                    raise
                log.info("user %r: %s; retrying at %g", user, err, plan.learning_rate * RETRY_FACTOR)
                outcome = None
            if outcome is None or (len(held) and not outcome.improved and rate_from != "argument"
                                   and outcome.stopped_by != "max_seconds"):
                # The first run diverged or the holdout says it did not help: one more at a lower rate.
                why = "diverged" if outcome is None else "did not beat the start on the holdout"
                log.info("user %r: the run at learning rate %g %s; retrying at %g", user, plan.learning_rate, why,
                         plan.learning_rate * RETRY_FACTOR)
                plan = dataclasses.replace(plan, learning_rate=plan.learning_rate * RETRY_FACTOR, reasons={
                    **plan.reasons, "learning_rate": plan.reasons["learning_rate"] + f"; x{RETRY_FACTOR:g} after a first "
                    f"run that {why}"})
                # The same sessions, started over (built models are reused; values and moments are not).
                session.restart(start=start_values, learning_rate=plan.learning_rate)
                outcome = self._train(session, plan, train, held, np.random.default_rng(seed + 1), started, user, patience,
                                      max_seconds, bar, progress, examples)
                retried = True
        finally:
            if bar is not None:
                bar.close()
        trained = session.trainable_values()
        self._idle_session.give_back(session)  # after a run that ended normally only
        if not all(np.all(np.isfinite(v)) for v in trained.values()):
            raise TrainingDivergedError(f"training produced non-finite biases; nothing was saved for {user!r}. Lower the learning rate.")
        # The loop scored the start and the kept checkpoint on the holdout: their metrics come from those passes.
        before = self._metrics(outcome.start_loss, outcome.start_scored) if len(held) else {}
        after = self._metrics(outcome.kept_loss, outcome.kept_scored) if len(held) else {}
        return FitResult(
            values=trained, plan=plan, outcome=outcome, metrics_before=before, metrics_after=after, warnings=warnings,
            retried=retried, backend=session.backend, learning_rate_from=rate_from, train_examples=len(train),
            holdout_examples=len(held), duplicates_removed=examples.duplicates_removed,
            seconds=time.perf_counter() - started,
        )

    def _open_session(self, start_values: dict[str, np.ndarray] | None, learning_rate: float) -> Any:
        """A training session from ``start_values`` whose inputs are the ones the manifest names:
        the kept one restarted, or a new one."""
        session = self._idle_session.take()
        if session is not None:
            session.restart(start=start_values, learning_rate=learning_rate)
            return session
        session = open_training_session(self.bundle, backend=self.backend, start=start_values,
                                        providers=_training_providers(self.providers), threads=self.threads,
                                        learning_rate=learning_rate)
        manifest = self.bundle.manifest
        expected_inputs = {i.name for i in manifest.inputs} | {manifest.label_input}
        if set(session.input_names) != expected_inputs:  # a damaged manifest would fail inside ORT
            raise BundleInvalidError(
                f"manifest.json names training inputs {sorted(expected_inputs)}, the training model takes "
                f"{sorted(session.input_names)}: the bundle was altered; copy or re-export it"
            )
        return session

    def _train(self, session: Any, plan: TrainingPlan, train: Examples, held: Examples, rng: np.random.Generator,
               started: float, user: str, patience: int | None, max_seconds: float | None, bar: Any,
               progress: ProgressCallback | None, examples: Examples) -> LoopOutcome:
        """One training run of ``session``; onnxruntime failures become the error of their cause."""
        manifest = self.bundle.manifest

        def on_step(step: int, epoch: int, loss: float, seconds: float) -> None:
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
            if progress is not None:
                progress(Progress(user, step, plan.steps, epoch, loss, seconds))

        try:
            outcome = run_training(session, plan, train, held, encoder=self._encoder, rng=rng, score=self._score,
                                   ignore_index=manifest.ignore_index, patience=patience, max_seconds=max_seconds,
                                   started=started, on_step=on_step)
        except TrainingDivergedError as err:
            raise TrainingDivergedError(f"{err}; nothing was saved and {user!r}'s previous delta is still current") from err
        except RuntimeError as err:  # what onnxruntime raises
            raise _training_error(err, plan.batch_size, examples) from err
        return outcome

    def _score(self, session: Any, held: Examples) -> tuple[float, list[tuple[np.ndarray, np.ndarray]]]:
        """Mean loss over ``held`` through the eval model, and the (outputs, labels) per batch."""
        return self._run_batches(held, session.evaluate)

    def _run_batches(self, examples: Examples, run: Callable[[dict[str, np.ndarray], np.ndarray], tuple[float, np.ndarray]]
                     ) -> tuple[float, list[tuple[np.ndarray, np.ndarray]]]:
        """Mean loss over ``examples`` and the (outputs, labels) per batch; ``run(feeds, labels)``
        gives a batch's mean loss and outputs (the eval model, or the predictor)."""
        ignore = self.bundle.manifest.ignore_index
        total, rows, parts = 0.0, 0, []
        for feeds, labels in scoring_batches(examples, self._encoder, ignore_index=ignore):
            loss, outputs = run(feeds, labels)
            weight = _loss_weight(labels, self.bundle.manifest.loss, ignore)
            total += loss * weight
            rows += weight
            parts.append((outputs, labels))
        return (total / rows if rows else 0.0), parts

    def _metrics(self, loss: float, parts: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
        manifest = self.bundle.manifest
        outputs, labels = merge_batches(parts, ignore_index=manifest.ignore_index if manifest.ignore_index is not None else -100)
        metrics = {"loss": float(loss), **task_metrics(manifest.loss, outputs, labels, label_names=manifest.labels,
                                                       ignore_index=manifest.ignore_index)}
        if manifest.task == "causal-lm":
            metrics["perplexity"] = perplexity(loss)
        return metrics

    def _current_version(self, user: str) -> int:
        return int(self.store.current_version(user) or 0)

    def predict(self, inputs: Any, user: str | None | Sequence[str | None] = None) -> Prediction:
        """Predict with ``user``'s delta (None = the base model, a list = one user per row).

        Example:
            >>> p.predict(["great", "awful"], user=["alice", None]).labels     # doctest: +SKIP
            ['positive', 'negative']
        """
        return self.predictor.predict(inputs, user=user)

    def evaluate(self, user_data: Any, user: str | None = None) -> dict[str, float]:
        """The task's metrics (and loss) of ``user``'s model on labelled data, through the predictor.

        Classifiers: accuracy and macro F1; regression: MAE and RMSE; multi-label: subset
        accuracy and F1 per label; token classification: token accuracy; causal LM: loss and
        perplexity (``bitfit.sdk.metrics``). Always ``loss`` and ``examples``.

        Example:
            >>> p.evaluate("alice-test.jsonl", user="alice")          # doctest: +SKIP
            {'loss': 0.52, 'accuracy': 0.81, 'macro_f1': 0.78, 'examples': 300.0}
        """
        manifest = self.bundle.manifest
        examples = load_examples(user_data, self.bundle, self._encoder)

        def through_predictor(feeds: dict[str, np.ndarray], labels: np.ndarray) -> tuple[float, np.ndarray]:
            outputs = self.predictor.logits(feeds, [user] * len(labels))
            return mean_loss(manifest.loss, outputs, labels, ignore_index=manifest.ignore_index), outputs

        metrics = self._metrics(*self._run_batches(examples, through_predictor))
        metrics["examples"] = float(len(examples))
        return metrics


def _loss_weight(labels: np.ndarray, loss: str, ignore_index: int | None) -> int:
    """How many terms a batch's mean loss averages: rows, or counted tokens for token losses."""
    if loss == "token-cross-entropy" and ignore_index is not None:
        return int((labels != ignore_index).sum())
    return len(labels)


def _training_error(err: RuntimeError, batch_size: int, examples: Examples) -> BitfitError | RuntimeError:
    """The error that names an onnxruntime failure's real cause during training."""
    if is_out_of_memory(err):
        return ResourceExhaustedError(
            f"onnxruntime ran out of memory during training ({str(err).strip()[-200:]}); use a smaller "
            f"batch_size (now {batch_size}) or shorter inputs. Nothing was saved."
        )
    if examples.features is not None and "INVALID_ARGUMENT" in str(err):
        # Arrays passed in directly can hold values the graph refuses (a token type id its
        # embedding lacks): the caller's data, reported as such.
        return InvalidUserDataError(
            f"onnxruntime refused the input arrays (...{str(err).strip()[-300:]}); check that every "
            "value is one the model accepts (e.g. ids within its embeddings). Nothing was saved."
        )
    return err  # text we tokenized ourselves, or not a refused input: not the caller's data at fault


def _progress_bar(total: int, user: str, wanted: bool | None):
    if wanted is False or (wanted is None and not sys.stderr.isatty()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"personalize {user}", unit="step", leave=False)


def _learning_rate(given: Any, manifest: Any) -> tuple[Any, str]:
    """The peak learning rate and where it came from: the argument, the bundle, or the model's size."""
    if given is not None:
        return given, "argument"
    if "learning_rate" in manifest.training_defaults:
        return manifest.training_defaults["learning_rate"], "bundle"
    if manifest.total_values is not None:
        return learning_rate_for_size(manifest.total_values), "model size"
    return DEFAULT_LEARNING_RATE, "default"


def _training_providers(providers: Any) -> Any:
    # "auto" is decided here: the ort-training backend takes a device (CPU or CUDA), not "auto".
    if providers == "auto":
        return "cuda" if cuda_available() else "cpu"
    return providers


def _check_user(user: Any) -> None:
    if not isinstance(user, str) or not user:
        raise InvalidArgumentError(f"user must be a non-empty string, got {user!r}")


def _check_options(epochs: Any, lr: Any, batch_size: Any, max_steps: Any, max_seconds: Any,
                   patience: Any, holdout: Any = None, schedule: Any = "warmup-linear") -> None:
    problems = []
    if epochs is not None and (not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1):
        problems.append(f"epochs must be an int >= 1 or None (the SDK's step budget), got {epochs!r}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not np.isfinite(lr) or lr <= 0:
        problems.append(f"learning_rate must be a positive number, got {lr!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        problems.append(f"batch_size must be an int >= 1 or None, got {batch_size!r}")
    if max_steps is not None and (not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1):
        problems.append(f"max_steps must be an int >= 1 or None, got {max_steps!r}")
    if max_seconds is not None and (not isinstance(max_seconds, (int, float)) or not max_seconds > 0):
        problems.append(f"max_seconds must be a positive number or None, got {max_seconds!r}")
    if patience is not None and (not isinstance(patience, int) or isinstance(patience, bool) or patience < 1):
        problems.append(f"patience must be an int >= 1 or None, got {patience!r}")
    if holdout is not None and (isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 <= holdout < 1):
        problems.append(f"holdout must be in [0, 1) or None (chosen from the data), got {holdout!r}")
    if schedule not in get_args(Schedule):
        problems.append(f"schedule must be one of {list(get_args(Schedule))}, got {schedule!r}")
    if problems:
        raise InvalidArgumentError("; ".join(problems))


__all__ = ["Personalizer", "PersonalizeResult", "FitResult", "Progress", "BitfitError"]
