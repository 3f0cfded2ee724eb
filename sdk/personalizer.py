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

import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import numpy as np

from .bundle import Bundle
from .data import DEFAULT_MAX_EXAMPLES, Examples, TextEncoder, batches, load_examples, split_holdout
from .delta import Delta, Encoding, check_delta_fits
from .errors import (
    BitfitError, BundleInvalidError, DeltaCorruptError, DeltaMismatchError, DeltaNotFoundError, InvalidArgumentError,
    InvalidUserDataError, ResourceExhaustedError, TrainingDivergedError,
)
from .options import (
    DEFAULT_PROVIDERS, DEFAULT_VERIFY, Providers, Verify, check_choice, open_store, providers_from_device,
)
from .runtime import cuda_available, is_out_of_memory
from .predictor import GraphOptimization, Prediction, Predictor
from .store import DeltaStore
from .trainer import BackendChoice, Device, OrtTrainingSession, PortableTrainingSession, open_training_session

log = logging.getLogger("bitfit.sdk")

StopReason = Literal["epochs", "max_steps", "max_seconds", "early_stopping"]
DEFAULT_LEARNING_RATE = 2e-3
"""The learning rate for a bundle whose manifest has no ``training_defaults.learning_rate``
(bundles exported before that field): the value tuned for the built-in MiniLM."""
ProgressCallback = Callable[["Progress"], None]


@dataclass(frozen=True)
class Progress:
    """What a progress callback receives after each training step."""

    user: str
    step: int
    total_steps: int
    epoch: int
    loss: float
    seconds: float


@dataclass(frozen=True)
class PersonalizeResult:
    """What one ``personalize`` call did, with holdout metrics before and after."""

    user: str
    version: int
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
    started_from: Literal["base", "previous-delta"]
    kept_epoch: int = -1
    """The epoch whose biases were saved: the best on the holdout; 0 means no epoch beat the
    starting point, so the starting biases were kept (the new version equals the previous one)."""
    backend: str = ""
    """The training backend that ran: ``portable`` or ``ort-training``."""
    learning_rate: float = 0.0
    """The learning rate used: the argument, else the bundle's ``training_defaults``, else 2e-3."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Personalizer:
    """Local training and per-user inference over one bundle and one delta store.

    The options have the same names, values and defaults in :class:`~bitfit.sdk.predictor.Predictor`
    and the ``bitfit`` command (``bitfit.sdk.options``); a wrong value is an InvalidArgumentError.

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
        threads: intra-op threads for training and inference (None = ORT's default).
        key: AES key to encrypt deltas at rest (see docs/security.md).
        on_bad_delta: "fallback" serves the base model for a user whose delta is corrupt or
            for another base (reported in ``Prediction.fallbacks``); "raise" raises.
        verify: how the bundle's files are checked on opening: "hashes" (default), "sizes"
            or "none" (``Bundle.open``).
        device: deprecated alias of ``providers`` ("cpu" or "cuda"); warns.

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
    ) -> None:
        providers = providers_from_device(providers, device)
        check_choice("backend", backend, get_args(BackendChoice))
        check_choice("verify", verify, ("hashes", "sizes", "none"))
        check_choice("on_bad_delta", on_bad_delta, ("fallback", "raise"))
        if graph_optimization is not None:
            check_choice("graph_optimization", graph_optimization, get_args(GraphOptimization))
        if threads is not None and (type(threads) is not int or threads < 0):
            raise InvalidArgumentError(f"threads must be an int >= 0 or None (onnxruntime's default), got {threads!r}")
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle, verify=verify)
        self.store = open_store(store, key, allow_none=False)
        self.providers = providers
        self.backend = backend
        self.threads = threads
        self._predictor_options = {"providers": providers, "threads": threads, "on_bad_delta": on_bad_delta}
        if graph_optimization:
            self._predictor_options["graph_optimization"] = graph_optimization
        self._predictor: Predictor | None = None
        self._encoder = TextEncoder(self.bundle) if self.bundle.manifest.text else None
        self._base: dict[str, np.ndarray] | None = None

    @property
    def predictor(self) -> Predictor:
        """The shared inference session (built on first use)."""
        if self._predictor is None:
            self._predictor = Predictor(self.bundle, self.store, **self._predictor_options)
        return self._predictor

    @property
    def base_trainable(self) -> dict[str, np.ndarray]:
        if self._base is None:
            self._base = self.bundle.trainable_base()
        return self._base

    def current_delta(self, user: str) -> Delta | None:
        """The user's current delta, checked against this bundle; None if there is none."""
        try:
            delta = self.store.load(user)
        except DeltaNotFoundError:
            return None
        check_delta_fits(delta, base_fingerprint=self.bundle.manifest.base_fingerprint,
                         shapes=self.bundle.manifest.trainable_shapes)
        return delta

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
        epochs: int = 3,
        learning_rate: float | None = None,
        batch_size: int = 16,
        holdout: float = 0.15,
        max_steps: int | None = None,
        max_seconds: float | None = None,
        seed: int = 0,
        progress: ProgressCallback | None = None,
        progress_bar: bool | None = None,
        reset: bool = False,
        encoding: Encoding = "fp16",
        patience: int | None = 2,
        max_examples: int = DEFAULT_MAX_EXAMPLES,
    ) -> PersonalizeResult:
        """Train ``user``'s biases on ``user_data`` and save the result as a new delta version.

        Continues from the user's current delta unless ``reset``. A small holdout (if there
        are >= 4 examples) gives before/after metrics and early stopping (``patience``
        epochs without holdout improvement; the best epoch's biases are kept). Stops at
        ``max_steps`` or ``max_seconds`` (a device's time budget) if given. If the loss
        becomes NaN/inf, nothing is saved and the previous delta stays current.

        ``learning_rate=None`` takes the bundle's ``training_defaults.learning_rate`` (chosen
        at export for the model's size: docs/bundle-format.md), or 2e-3 for a bundle without
        one. The rate used is in the result and in the delta's info.

        Example:
            >>> r = p.personalize("alice.jsonl", user="alice", max_seconds=30)      # doctest: +SKIP
            >>> r.accuracy_before, r.accuracy_after, r.delta_bytes                   # doctest: +SKIP
            (0.61, 0.78, 51812)
        """
        manifest = self.bundle.manifest
        learning_rate, rate_from = _learning_rate(learning_rate, manifest.training_defaults)
        _check_options(user, epochs, learning_rate, batch_size, max_steps, max_seconds, patience, encoding, holdout)
        started = time.perf_counter()
        examples = load_examples(user_data, self.bundle, self._encoder, max_examples=max_examples)
        rng = np.random.default_rng(seed)
        train_index, holdout_index = split_holdout(len(examples), holdout, rng)
        train, held = examples.subset(train_index), examples.subset(holdout_index)
        start = None if reset else self._start_delta(user)
        start_values = start.apply_to(self.base_trainable) if start is not None else None
        session = open_training_session(self.bundle, backend=self.backend, start=start_values,
                                        providers=_training_providers(self.providers), threads=self.threads,
                                        learning_rate=learning_rate)
        expected_inputs = {i.name for i in manifest.inputs} | {manifest.label_input}
        if set(session.input_names) != expected_inputs:  # a damaged manifest would fail inside ORT
            raise BundleInvalidError(
                f"manifest.json names training inputs {sorted(expected_inputs)}, the training model takes "
                f"{sorted(session.input_names)}: the bundle was altered; copy or re-export it"
            )
        steps_per_epoch = -(-len(train) // batch_size)
        total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
        ignore = manifest.ignore_index
        bar = _progress_bar(total, user, progress_bar)
        step, stop, stale, epoch = 0, "epochs", 0, 0
        try:
            loss_before, acc_before = self._evaluate(session, held)
            best = (loss_before, session.trainable_values()) if loss_before is not None else None
            kept_epoch = 0 if best is not None else -1
            for epoch in range(1, epochs + 1):
                for feeds, labels in batches(train, self._encoder, batch_size, rng, ignore_index=ignore):
                    loss = session.train_step(feeds, labels)
                    step += 1
                    if not np.isfinite(loss):
                        raise TrainingDivergedError(
                            f"the loss became {loss} at step {step} (learning_rate={learning_rate}); nothing was saved and "
                            f"{user!r}'s previous delta is still current. Lower the learning rate."
                        )
                    elapsed = time.perf_counter() - started
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss:.4f}")
                    if progress is not None:
                        progress(Progress(user, step, total, epoch, loss, elapsed))
                    if max_steps is not None and step >= max_steps:
                        stop = "max_steps"
                        break
                    if max_seconds is not None and elapsed >= max_seconds:
                        stop = "max_seconds"
                        break
                if best is not None:
                    held_loss, _ = self._evaluate(session, held)
                    if held_loss is not None and held_loss < best[0]:
                        best, stale, kept_epoch = (held_loss, session.trainable_values()), 0, epoch
                    else:
                        stale += 1
                if stop != "epochs":
                    break
                if patience is not None and best is not None and stale >= patience:
                    stop = "early_stopping"
                    break
        except RuntimeError as err:  # what onnxruntime's training API raises
            if is_out_of_memory(err):
                raise ResourceExhaustedError(
                    f"onnxruntime ran out of memory during training ({str(err).strip()[-200:]}); use a smaller "
                    f"batch_size (now {batch_size}) or shorter inputs. Nothing was saved."
                ) from err
            if examples.features is None or "INVALID_ARGUMENT" not in str(err):
                raise  # text we tokenized ourselves, or not a refused input: not the caller's data at fault
            # Arrays passed in directly can hold values the graph refuses (a token type id its
            # embedding lacks): the caller's data, reported as such. Nothing was saved.
            raise InvalidUserDataError(
                f"onnxruntime refused the input arrays (...{str(err).strip()[-300:]}); check that every "
                "value is one the model accepts (e.g. ids within its embeddings). Nothing was saved."
            ) from err
        finally:
            if bar is not None:
                bar.close()
        if best is not None:
            session.set_trainable_values(best[1])  # keep the epoch with the best holdout loss
            if kept_epoch == 0:
                log.warning("user %r: no epoch improved the holdout loss (%d holdout examples); the starting "
                            "biases are kept. Give more examples or a larger holdout.", user, len(held))
        else:
            kept_epoch = epoch
        trained = session.trainable_values()
        if not all(np.all(np.isfinite(v)) for v in trained.values()):
            raise TrainingDivergedError(f"training produced non-finite biases; nothing was saved for {user!r}. Lower the learning rate.")
        loss_after, acc_after = self._evaluate(session, held)
        seconds = time.perf_counter() - started
        info = {
            "steps": step, "epochs_run": epoch, "examples": len(train), "holdout_examples": len(held),
            "seconds": round(seconds, 3), "learning_rate": learning_rate, "learning_rate_from": rate_from,
            "batch_size": batch_size, "seed": seed,
            "stopped_by": stop, "metrics": {"loss_before": loss_before, "loss_after": loss_after,
                                            "accuracy_before": acc_before, "accuracy_after": acc_after},
            "started_from": "previous-delta" if start is not None else "base", "kept_epoch": kept_epoch,
            "backend": session.backend,
        }
        delta = Delta.from_params(trained, self.base_trainable, manifest.base_fingerprint, encoding=encoding, info=info)
        version = self.store.save(user, delta)
        if self._predictor is not None:
            self._predictor.invalidate(user)
        return PersonalizeResult(
            user=user, version=version, delta_bytes=_delta_file_bytes(self.store, user, version), encoding=encoding,
            steps=step, epochs_run=epoch, seconds=seconds, examples_used=len(train), holdout_examples=len(held),
            duplicates_removed=examples.duplicates_removed, loss_before=loss_before, loss_after=loss_after,
            accuracy_before=acc_before, accuracy_after=acc_after, stopped_by=stop,  # type: ignore[arg-type]
            started_from=info["started_from"],  # type: ignore[arg-type]
            kept_epoch=kept_epoch, backend=session.backend, learning_rate=learning_rate,
        )

    def _evaluate(self, session: PortableTrainingSession | OrtTrainingSession, held: Examples) -> tuple[float | None, float | None]:
        """Mean loss and accuracy (classification) over the holdout, through the eval model."""
        if len(held) == 0:
            return None, None
        total_loss, correct, counted, rows = 0.0, 0, 0, 0
        for feeds, labels in batches(held, self._encoder, 64, None):
            loss, logits = session.evaluate(feeds, labels)
            total_loss += loss * len(labels)
            rows += len(labels)
            if self.bundle.manifest.loss == "cross-entropy":
                correct += int((logits.argmax(-1) == labels).sum())
                counted += len(labels)
            elif self.bundle.manifest.loss == "bce-with-logits":
                correct += int(((logits > 0) == (labels > 0.5)).all(axis=-1).sum())
                counted += len(labels)
        return total_loss / rows, (correct / counted if counted else None)

    def predict(self, inputs: Any, user: str | None | Sequence[str | None] = None) -> Prediction:
        """Predict with ``user``'s delta (None = the base model, a list = one user per row)."""
        return self.predictor.predict(inputs, user=user)

    def evaluate(self, user_data: Any, user: str | None = None) -> dict[str, float]:
        """Accuracy (classifiers) of ``user``'s model on labelled data, through the predictor."""
        examples = load_examples(user_data, self.bundle, self._encoder)
        correct = 0
        for feeds, labels in batches(examples, self._encoder, 64, None):
            logits = self.predictor.logits(feeds, [user] * len(labels))
            correct += int((logits.argmax(-1) == labels).sum())
        return {"accuracy": correct / len(examples), "examples": float(len(examples))}


def _delta_file_bytes(store: DeltaStore, user: str, version: int) -> int:
    for row in store.info(user):
        if row.get("version") == version:
            return int(row.get("bytes", 0))
    return 0


def _progress_bar(total: int, user: str, wanted: bool | None):
    if wanted is False or (wanted is None and not sys.stderr.isatty()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"personalize {user}", unit="step", leave=False)


def _learning_rate(given: Any, defaults: dict[str, Any]) -> tuple[Any, str]:
    """The learning rate to train with and where it came from: the argument, the bundle, or the default."""
    if given is not None:
        return given, "argument"
    if "learning_rate" in defaults:
        return defaults["learning_rate"], "bundle"
    return DEFAULT_LEARNING_RATE, "default"


def _training_providers(providers: Any) -> Any:
    # "auto" is decided here: the ort-training backend takes a device (CPU or CUDA), not "auto".
    if providers == "auto":
        return "cuda" if cuda_available() else "cpu"
    return providers


def _check_options(user: Any, epochs: Any, lr: Any, batch_size: Any, max_steps: Any, max_seconds: Any,
                   patience: Any, encoding: Any, holdout: Any = 0.0) -> None:
    problems = []
    if not isinstance(user, str) or not user:
        problems.append(f"user must be a non-empty string, got {user!r}")
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        problems.append(f"epochs must be an int >= 1, got {epochs!r}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not np.isfinite(lr) or lr <= 0:
        problems.append(f"learning_rate must be a positive number, got {lr!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        problems.append(f"batch_size must be an int >= 1, got {batch_size!r}")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        problems.append(f"max_steps must be an int >= 1 or None, got {max_steps!r}")
    if max_seconds is not None and (not isinstance(max_seconds, (int, float)) or not max_seconds > 0):
        problems.append(f"max_seconds must be a positive number or None, got {max_seconds!r}")
    if patience is not None and (not isinstance(patience, int) or patience < 1):
        problems.append(f"patience must be an int >= 1 or None, got {patience!r}")
    if encoding not in ("fp32", "fp16", "int8"):
        problems.append(f"encoding must be fp32, fp16 or int8, got {encoding!r}")
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 <= holdout < 1:
        problems.append(f"holdout must be in [0, 1), got {holdout!r}")
    if problems:
        raise InvalidArgumentError("; ".join(problems))


__all__ = ["Personalizer", "PersonalizeResult", "Progress", "BitfitError"]
