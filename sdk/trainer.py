"""The local training loop's engine: one training-session interface, two backends.

- ``portable`` (:class:`~bitfit.sdk.portable_trainer.PortableTrainingSession`): the bundle's
  portable gradient and optimizer models run by plain onnxruntime's inference API; any
  maintained onnxruntime, bundle format 2 (docs/portable-training.md).
- ``ort-training`` (:class:`OrtTrainingSession`): onnxruntime-training 1.19.2's on-device
  training API over the bundle's training artifacts. Its import stays inside the class, so
  this module (and the SDK) loads on plain onnxruntime.

:func:`open_training_session` picks one (``backend="auto"``: portable where the bundle has
it) and says why when neither can run. Every session starts fresh, and so does every
``restart`` of one: its optimizer state (AdamW's moments) belongs to that run alone.

Example:
    >>> from bitfit.sdk.bundle import Bundle
    >>> from bitfit.sdk.trainer import open_training_session
    >>> session = open_training_session(Bundle.open("bundles/tiny"))            # doctest: +SKIP
    >>> session.backend                                                           # doctest: +SKIP
    'portable'
    >>> loss = session.train_step(feeds, labels)                                  # doctest: +SKIP
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import numpy as np

from .bundle import BACKEND_FILES, Bundle
from .errors import (
    BackendUnavailableError, BitfitError, BundleInvalidError, InvalidArgumentError, ProviderUnavailableError,
    ResourceExhaustedError,
)
from .options import session_threads, set_threads
from .portable_trainer import Device, PortableTrainingSession
from .training_checks import check_training_feeds, checked_learning_rate, checked_trainable_values, label_classes
from .runtime import cuda_available, has_training_api, is_out_of_memory, ort

BackendChoice = Literal["auto", "portable", "ort-training"]
_ORT_TRAINING_HINT = (
    "the 'ort-training' backend needs onnxruntime-training-cpu==1.19.2 (`pip install 'bitfit[ort-training]'`, "
    "not beside plain onnxruntime)"
)


def open_training_session(
    bundle: Bundle | str | os.PathLike,
    *,
    backend: BackendChoice = "auto",
    start: Mapping[str, np.ndarray] | None = None,
    device: Device = "cpu",
    threads: int | None = None,
    learning_rate: float | None = None,
    session_options: "ort.SessionOptions | None" = None,
    providers: str | Sequence[Any] | None = None,
) -> "PortableTrainingSession | OrtTrainingSession":
    """A training session over ``bundle`` with the backend asked for, or the best one here.

    ``"auto"`` takes ``portable`` when the bundle has its models, else ``ort-training`` when
    the bundle has its artifacts and this onnxruntime is the training build. The session's
    ``backend`` attribute says which one runs. The other arguments are the sessions' own.

    Raises:
        BackendUnavailableError: the backend asked for (or, for "auto", every backend) cannot
            run: the message gives each reason and what to install or re-export.
        InvalidArgumentError: an unknown ``backend``.

    Example:
        >>> open_training_session("bundles/tiny", backend="tpu")
        Traceback (most recent call last):
        ...
        bitfit.sdk.errors.InvalidArgumentError: backend must be one of 'auto', 'portable', 'ort-training', got 'tpu'
        >>> open_training_session("bundles/tiny", backend="portable").backend            # doctest: +SKIP
        'portable'
    """
    if backend not in get_args(BackendChoice):
        raise InvalidArgumentError(f"backend must be one of {', '.join(map(repr, get_args(BackendChoice)))}, got {backend!r}")
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    manifest = bundle.manifest
    kwargs: dict[str, Any] = {"start": start, "device": device, "threads": threads, "learning_rate": learning_rate,
                              "session_options": session_options, "providers": providers}
    if backend == "portable" or (backend == "auto" and manifest.backend_available("portable")):
        return PortableTrainingSession(bundle, **kwargs)
    ort_training_reason = _ort_training_unavailable(bundle)
    if not ort_training_reason:
        return OrtTrainingSession(bundle, **kwargs)
    if backend == "ort-training":
        raise BackendUnavailableError(f"the 'ort-training' backend cannot run here: {ort_training_reason}")
    raise BackendUnavailableError(
        f"no training backend can run this bundle here. portable: {manifest.backend_reason('portable')}. "
        f"ort-training: {ort_training_reason}. Re-export the bundle with this bitfit (it writes the portable models), "
        "or train where onnxruntime-training is installed"
    )


def _ort_training_unavailable(bundle: Bundle) -> str:
    """Why the ort-training backend cannot run ``bundle`` here ('' when it can)."""
    if not bundle.manifest.backend_available("ort-training"):
        return (f"{bundle.manifest.backend_reason('ort-training')}; use backend='portable', or re-export the bundle "
                "with the ORT training artifacts")
    if not has_training_api():
        return f"onnxruntime {ort.__version__} has no on-device training API (onnxruntime.training): {_ORT_TRAINING_HINT}"
    return ""


class OrtTrainingSession:
    """Trains a bundle's trainable tensors with onnxruntime-training 1.19.2's training API,
    starting from base + an optional delta.

    Why a fresh checkpoint state every time: AdamW's moments live in the CheckpointState, and
    re-creating the Optimizer does not reset them, so reusing a state for user B after user A
    changes B's updates (measured max diff 1.8e-3). A new state per session matched exactly.

    ``start`` maps trainable names to the values to start from (base + the user's current
    delta); missing names start from the base. ``session_options`` (an
    ``onnxruntime.SessionOptions``) is passed to ORT as is, e.g. to profile a step.
    ``providers`` may only name CPU and CUDA here (the training API takes a device);
    other execution providers need the portable backend.

    Raises:
        BackendUnavailableError: the bundle has no ORT training artifacts, or this
            onnxruntime is not the training build.

    Example:
        >>> session = OrtTrainingSession(Bundle.open("bundles/tiny"))          # doctest: +SKIP
        >>> session.backend                                                     # doctest: +SKIP
        'ort-training'
    """

    backend = "ort-training"

    def __init__(
        self,
        bundle: Bundle,
        *,
        start: Mapping[str, np.ndarray] | None = None,
        device: Device = "cpu",
        threads: int | None = None,
        learning_rate: float | None = None,
        session_options: "ort.SessionOptions | None" = None,
        providers: str | Sequence[Any] | None = None,
    ) -> None:
        reason = _ort_training_unavailable(bundle)
        if reason:
            raise BackendUnavailableError(f"the 'ort-training' backend cannot run here: {reason}")
        device = _device_for_providers(device, providers)
        if device not in ("cpu", "cuda"):
            raise ProviderUnavailableError(f"unknown training device {device!r}: use 'cpu' or 'cuda'")
        if device == "cuda" and not cuda_available():
            raise ProviderUnavailableError(
                "device='cuda' was asked for but this onnxruntime build has no CUDA provider; "
                "use device='cpu' or install the CUDA build of onnxruntime-training"
            )
        self.bundle = bundle
        manifest = bundle.manifest
        # Caller's options (e.g. enable_profiling for a profile of the train step) or defaults.
        options = session_options if session_options is not None else ort.SessionOptions()
        # Given session_options keep their threads unless threads is given too.
        set_threads(options, session_threads(threads, manifest.total_values, options_given=session_options is not None))
        self._device, self._options = device, options
        order = manifest.source.get("parameter_order")
        if not order:
            raise BundleInvalidError("manifest has no source.parameter_order; re-export the bundle with this bitfit")
        self._order = list(order)
        self.trainable = [t.name for t in manifest.trainable]
        # The manifest's shapes: a start and set values are checked against them, and each load
        # checks that the checkpoint holds the same tensors (_check_checkpoint).
        self._shapes = {t.name: tuple(t.shape) for t in manifest.trainable}
        self._load(start=self._checked_start(start), learning_rate=learning_rate)
        self.input_names = list(self.module.input_names())
        specs = _recorded_input_specs(manifest)
        self._input_specs = {name: specs.get(name, (None, None)) for name in self.input_names}
        self._classes = label_classes(manifest)

    def _checked_start(self, start: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        # Checked before loading: a mis-sized start value would otherwise surface as "the weights
        # file does not match" (the bundle blamed for the caller's array), an unknown name be ignored.
        return checked_trainable_values(start or {}, self._shapes)

    def _load(self, *, start: dict[str, np.ndarray], learning_rate: float | None) -> None:
        """Load the checkpoint state, the module and the optimizer, the parameters from the
        base weights with ``start`` (already checked) over them."""
        from .ort_training import training_api  # here: plain onnxruntime has no training API

        bundle = self.bundle
        try:
            self.state = training_api.CheckpointState.load_checkpoint(str(bundle.file("checkpoint")))
            self.module = training_api.Module(
                str(bundle.file("training_model")), self.state, str(bundle.file("eval_model")),
                device=self._device, session_options=self._options,
            )
        except BundleInvalidError:
            raise
        except Exception as err:  # ORT raises RuntimeError / Fail / InvalidGraph
            raise _load_error(bundle, self._device, "training artifacts", err) from err
        self._fill_parameters(self._order, start)
        # The optimizer must be created after the parameters hold data: built on a nominal
        # (shapes-only) state, its set_learning_rate segfaults in ORT 1.19.2.
        try:
            self.optimizer = training_api.Optimizer(str(bundle.file("optimizer_model")), self.module)
        except Exception as err:
            raise _load_error(bundle, self._device, "optimizer model", err) from err
        _check_checkpoint(self.state, self._shapes)
        if learning_rate is not None:
            self.set_learning_rate(learning_rate)

    def restart(self, *, start: Mapping[str, np.ndarray] | None = None, learning_rate: float | None = None) -> None:
        """Start over as a new session would (values from the base + ``start``, fresh AdamW
        moments, ``learning_rate``): the training API keeps the moments in its checkpoint
        state, which cannot be reset, so this loads the artifacts again. The arguments are
        checked first: a refused one leaves the session as it was.

        Example:
            >>> session.restart(start=None, learning_rate=2e-3)                     # doctest: +SKIP
        """
        checked = self._checked_start(start)
        if learning_rate is not None:
            checked_learning_rate(learning_rate)
        self._load(start=checked, learning_rate=learning_rate)

    def _fill_parameters(self, order: list[str], start: dict[str, np.ndarray]) -> None:
        """Copy every parameter into the nominal state through one preallocated buffer.

        Filled tensor by tensor straight from the (memory-mapped) weights file, so the base
        weights are held once on the way in, not three times (a dict of tensors, their
        concatenation and ORT's copy). Measured for MiniLM by ``benchmarks.memory``: 339 MB
        -> 250 MB resident after building the training session.
        """
        from safetensors import SafetensorError
        from safetensors.numpy import safe_open

        from .ort_training import OrtValue

        buffer = np.empty(self.module.get_parameters_size(trainable_only=False), np.float32)
        offset = 0
        try:
            with safe_open(str(self.bundle.file("weights")), framework="numpy") as fh:
                for name in order:
                    tensor = np.asarray(start[name], np.float32) if name in start else fh.get_tensor(name)
                    if offset + tensor.size > buffer.size:
                        break
                    buffer[offset:offset + tensor.size] = tensor.ravel()
                    offset += tensor.size
        except (SafetensorError, OSError, KeyError) as err:
            raise BundleInvalidError(f"cannot read the bundle's weights ({err}); re-export the bundle") from err
        if offset != buffer.size:
            raise BundleInvalidError("the weights file does not match the training model's parameters; re-export the bundle")
        value = OrtValue.ortvalue_from_numpy(buffer)  # kept alive during the copy: ORT reads this memory
        self.module.copy_buffer_to_parameters(value._ortvalue, trainable_only=False)

    def set_learning_rate(self, value: float) -> None:
        """Set the learning rate of the following steps.

        Example:
            >>> session.set_learning_rate(5e-3)                                    # doctest: +SKIP
        """
        self.optimizer.set_learning_rate(checked_learning_rate(value))

    def _args(self, feeds: Mapping[str, np.ndarray], labels: np.ndarray) -> list[np.ndarray]:
        """The module's inputs in order, checked as the portable backend checks them."""
        manifest = self.bundle.manifest
        values = check_training_feeds(self._input_specs, {**feeds, manifest.label_input: labels},
                                      label_input=manifest.label_input, classes=self._classes,
                                      ignore_index=manifest.ignore_index)
        return [values[name] for name in self.input_names]

    def _run(self, args: list[np.ndarray]) -> tuple[Any, Any]:
        try:
            return self.module(*args)
        except Exception as err:  # the training API raises RuntimeError for everything
            if is_out_of_memory(err):
                raise ResourceExhaustedError(
                    f"onnxruntime ran out of memory running a training step ({str(err).strip()[-200:]}); use a smaller "
                    "batch or shorter inputs, or free memory"
                ) from err
            raise

    def train_step(self, feeds: Mapping[str, np.ndarray], labels: np.ndarray) -> float:
        """One forward + backward + optimizer step; returns the batch loss.

        Example:
            >>> session.train_step({"x": x}, np.array([0, 2], np.int64))           # doctest: +SKIP
            1.0986...
        """
        args = self._args(feeds, labels)
        self.module.train()
        loss, _ = self._run(args)
        self.optimizer.step()
        self.module.lazy_reset_grad()
        return float(loss)

    def gradients(self, feeds: Mapping[str, np.ndarray], labels: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """The batch loss and the gradient of every trainable tensor at the current values, no update.

        What export validation compares with torch autograd. The gradient buffers are reset
        before and after, so the next ``train_step`` is unaffected.

        Example:
            >>> loss, grads = session.gradients({"x": x}, np.array([0, 2], np.int64))  # doctest: +SKIP
            >>> {name: g.shape for name, g in grads.items()}                          # doctest: +SKIP
            {'0.bias': (16,), '2.bias': (3,)}
        """
        args = self._args(feeds, labels)
        self.module.train()
        self.module.lazy_reset_grad()
        loss, _ = self._run(args)
        grads = {name: np.array(self.state.parameters[name].grad, np.float32) for name in self.trainable}
        self.module.lazy_reset_grad()
        return float(loss), grads

    def evaluate(self, feeds: Mapping[str, np.ndarray], labels: np.ndarray) -> tuple[float, np.ndarray]:
        """Loss and logits on a batch with the current (trained) tensors, no update.

        Example:
            >>> loss, logits = session.evaluate({"x": x}, np.array([0, 2], np.int64))  # doctest: +SKIP
            >>> logits.shape                                                            # doctest: +SKIP
            (2, 3)
        """
        args = self._args(feeds, labels)
        self.module.eval()
        loss, logits = self._run(args)
        return float(loss), np.asarray(logits)

    def trainable_values(self) -> dict[str, np.ndarray]:
        """Current values of the trainable tensors (copies).

        Example:
            >>> {k: v.shape for k, v in session.trainable_values().items()}          # doctest: +SKIP
            {'0.bias': (16,), '2.bias': (3,)}
        """
        return {name: np.array(self.state.parameters[name].data, np.float32) for name in self.trainable}

    def set_trainable_values(self, values: Mapping[str, np.ndarray]) -> None:
        """Replace some or all trainable values (each reshaped to the tensor's shape).

        Example:
            >>> session.set_trainable_values({"0.bias": np.zeros(16, np.float32)})     # doctest: +SKIP
        """
        for name, value in checked_trainable_values(values, self._shapes).items():
            self.state.parameters[name].data = value

    def parameter_values(self, names: list[str]) -> dict[str, np.ndarray]:
        """Any parameters' current values (copies), trainable or frozen.

        Example:
            >>> session.parameter_values(["0.weight", "0.bias"])["0.weight"].shape     # doctest: +SKIP
            (16, 4)
        """
        return {name: np.array(self.state.parameters[name].data) for name in names}


def _check_checkpoint(state: Any, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse a checkpoint whose trainable tensors are not the manifest's (names and shapes):
    values checked against the manifest are written into it, so the two must agree."""
    problems = []
    for name, shape in shapes.items():
        try:
            held = tuple(state.parameters[name].data.shape)
        except Exception:  # the training API raises RuntimeError for a name it does not hold
            problems.append(f"{name!r} is missing")
            continue
        if held != tuple(shape):
            problems.append(f"{name!r} is {list(held)}, the manifest says {list(shape)}")
    if problems:
        raise BundleInvalidError(f"the bundle's checkpoint does not hold the manifest's trainable tensors "
                                 f"({'; '.join(problems[:3])}); re-export the bundle")


def _load_error(bundle: Bundle, device: str, what: str, err: Exception) -> BitfitError:
    """The real cause of an ORT-training load failure: memory, damaged files, the CUDA
    provider, or (files intact, CPU) a bundle this onnxruntime refuses."""
    detail = f"{type(err).__name__}: {str(err).strip()[:300]}"
    if is_out_of_memory(err):
        return ResourceExhaustedError(f"onnxruntime ran out of memory loading the bundle's {what} ({detail}); free memory and retry")
    problems = bundle.file_problems(list(BACKEND_FILES["ort-training"]) + ["weights"])
    if problems:
        return BundleInvalidError(f"cannot load the bundle's {what}: {'; '.join(problems)}; copy the bundle again ({detail})")
    if device == "cuda":
        return ProviderUnavailableError(f"CUDA could not load the bundle's {what} ({detail}); use device='cpu'")
    return BundleInvalidError(f"onnxruntime refuses the bundle's {what} although its files match the manifest ({detail}); "
                              "re-export the bundle with this bitfit")


def _recorded_input_specs(manifest: Any) -> dict[str, tuple[Any, list[Any]]]:
    """(dtype, shape) of the model inputs and the labels, from the manifest: the training API
    does not tell its input types. The labels follow the loss, as the exported graphs take them."""
    specs: dict[str, tuple[Any, list[Any]]] = {i.name: (np.dtype(i.dtype), list(i.shape)) for i in manifest.inputs}
    logits = next((o for o in manifest.outputs if o.name == manifest.logits_output), manifest.outputs[0])
    if manifest.loss == "cross-entropy":
        specs[manifest.label_input] = (np.dtype(np.int64), list(logits.shape[:1]))
    elif manifest.loss == "token-cross-entropy":
        specs[manifest.label_input] = (np.dtype(np.int64), list(logits.shape[:2]))
    else:  # mse, bce-with-logits: float targets shaped like the output
        specs[manifest.label_input] = (np.dtype(np.float32), list(logits.shape))
    return specs


TrainingSession = OrtTrainingSession
"""The old name of :class:`OrtTrainingSession`; new code calls :func:`open_training_session`."""


def _device_for_providers(device: str, providers: str | Sequence[Any] | None) -> str:
    """The training API's device for a ``providers`` choice: only CPU and CUDA exist there."""
    if providers is None:
        return device
    if isinstance(providers, str):
        names = [providers]
    else:
        names = [p[0] if isinstance(p, (tuple, list)) else p for p in providers]
    names = [{"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}.get(n, n) for n in names]
    other = [n for n in names if n not in ("CPUExecutionProvider", "CUDAExecutionProvider")]
    if other:
        raise ProviderUnavailableError(
            f"the 'ort-training' backend runs on CPU or CUDA only, not {other}; use backend='portable' for other "
            "execution providers"
        )
    return "cuda" if "CUDAExecutionProvider" in names else "cpu"


class IdleSession:
    """At most one portable training session kept between runs, to be restarted rather than
    built again (``PortableTrainingSession.restart``: fresh values, moments and rate).

    Thread-safe: a run takes the session out of the slot, so two concurrent runs never share
    one (the second builds its own); a finished run puts its session back if the slot is empty.
    ``keep=False`` keeps nothing (what a large model gets: its sessions hold hundreds of MB).

    Example:
        >>> slot = IdleSession(keep=True)
        >>> slot.take() is None
        True
    """

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self._session: PortableTrainingSession | None = None
        self._lock = threading.Lock()

    def take(self) -> "PortableTrainingSession | None":
        """The kept session (now the caller's alone), or None.

        Example:
            >>> IdleSession(keep=False).take() is None
            True
        """
        with self._lock:
            session, self._session = self._session, None
        return session

    def give_back(self, session: Any) -> None:
        """Keep ``session`` for the next run (a portable one, when keeping and none is kept yet).

        Example:
            >>> IdleSession(keep=False).give_back(object())
        """
        if not self.keep or not isinstance(session, PortableTrainingSession):
            return
        with self._lock:
            if self._session is None:
                self._session = session


__all__ = ["open_training_session", "OrtTrainingSession", "TrainingSession", "PortableTrainingSession", "BackendChoice",
           "Device", "cuda_available", "IdleSession"]
