"""The ``portable`` training backend: a bias-only training step with the inference API of
any onnxruntime, through the bundle's portable models (docs/portable-training.md).

One step is two ordinary ``InferenceSession`` runs: the gradient model (inputs, labels and
the current trainable values -> loss, output, one gradient per trainable tensor), then the
optimizer model (values, gradients, AdamW moments, step -> new values and moments). The
trainable values and the optimizer state live here, in numpy, fresh for every session, so
one user's moments never leak into another's; the frozen weights are initializers of the
graphs (stored once in ``weights.safetensors``), never copied into Python.

Example:
    >>> from bitfit.sdk.bundle import Bundle
    >>> from bitfit.sdk.portable_trainer import PortableTrainingSession
    >>> session = PortableTrainingSession(Bundle.open("bundles/tiny"))            # doctest: +SKIP
    >>> loss = session.train_step({"x": x}, labels)                                 # doctest: +SKIP
    >>> session.trainable_values()["0.bias"].shape                                  # doctest: +SKIP
    (16,)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .bundle import Bundle
from .errors import (
    BackendUnavailableError, BitfitError, BundleInvalidError, InvalidUserDataError, ProviderUnavailableError,
    ResourceExhaustedError,
)
from .options import session_threads, set_threads
from .runtime import cuda_available, is_out_of_memory, ort, resolve_providers
from .training_checks import check_training_feeds, checked_learning_rate, checked_trainable_values, label_classes
from .training_plan import is_small_model

Device = Literal["cpu", "cuda"]

GRADIENT_MODEL, EVAL_MODEL, OPTIMIZER_MODEL = "portable_gradient_model", "portable_eval_model", "portable_optimizer_model"
LOSS_OUTPUT = "loss"
# What ORT's training API starts from when no learning rate is set (its optimizer state's
# default); the same here, so both backends train alike with learning_rate=None.
DEFAULT_LEARNING_RATE = 1e-3

# onnxruntime's error classes (pybind11 exceptions, not RuntimeError subclasses).
_ORT_ERRORS = ort.capi.onnxruntime_pybind11_state

# onnxruntime's input type strings -> numpy dtypes, for checking feeds before a run.
_ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint64)": np.uint64, "tensor(uint32)": np.uint32, "tensor(uint16)": np.uint16, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


class PortableTrainingSession:
    """Trains a bundle's trainable tensors with plain onnxruntime, from base + an optional delta.

    The same interface as :class:`bitfit.sdk.trainer.OrtTrainingSession`; open either with
    :func:`bitfit.sdk.trainer.open_training_session`.

    Args:
        bundle: an opened bundle with the portable models (bundle format 2).
        start: trainable name -> the value to start from (base + the user's delta); names
            not given start from the base.
        device: ``"cpu"``, or ``"cuda"`` (CUDA, then CPU for any op CUDA lacks; refused with
            ProviderUnavailableError when this onnxruntime build has no CUDA).
        threads: intra-op threads (0: onnxruntime's default; None: one for a model under 1 M
            values, else onnxruntime's default: ``bitfit.sdk.options.session_threads``).
        learning_rate: the optimizer's learning rate (None = 1e-3, ORT's default).
        session_options: an ``onnxruntime.SessionOptions`` used as is for the three sessions.
        providers: execution providers instead of ``device`` (names or ``(name, options)``
            pairs, CPU always appended), as :func:`bitfit.sdk.runtime.resolve_providers`
            takes them.

    Raises:
        BackendUnavailableError: the bundle has no portable models (e.g. bundle format 1), or
            this onnxruntime cannot run them (too old for their opset, an op it lacks).
        BundleInvalidError: a model or the weights file is missing or damaged.
        ProviderUnavailableError: the execution provider asked for is missing or fails.

    Example:
        >>> session = PortableTrainingSession(Bundle.open("bundles/tiny"), learning_rate=1e-2)   # doctest: +SKIP
        >>> session.backend, session.input_names                                                 # doctest: +SKIP
        ('portable', ['x', 'labels'])
    """

    backend = "portable"

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
        manifest = bundle.manifest
        if not manifest.backend_available("portable"):
            raise BackendUnavailableError(
                f"this bundle cannot train with the portable backend: {manifest.backend_reason('portable')}"
            )
        self.bundle = bundle
        self.providers = _providers(device, providers)
        options = session_options if session_options is not None else default_session_options(manifest.total_values)
        # Given session_options keep their threads unless threads is given too.
        set_threads(options, session_threads(threads, manifest.total_values, options_given=session_options is not None))
        self._gradient = self._load(GRADIENT_MODEL, options)
        self._eval = self._load(EVAL_MODEL, options)
        self._optimizer = self._load(OPTIMIZER_MODEL, options)
        self.trainable = [t.name for t in manifest.trainable]
        self._shapes = {t.name: tuple(t.shape) for t in manifest.trainable}
        self._check_models()
        self.input_names = [i.name for i in self._gradient.get_inputs() if i.name not in self._shapes]
        self._input_specs = {i.name: (_ORT_DTYPES.get(i.type), list(i.shape)) for i in self._gradient.get_inputs()
                             if i.name not in self._shapes}
        self._gradient_outputs = [LOSS_OUTPUT, manifest.logits_output, *(f"{n}_grad" for n in self.trainable)]
        self._eval_outputs = [LOSS_OUTPUT, manifest.logits_output]
        self._optimizer_outputs = [o.name for o in self._optimizer.get_outputs()]
        self._adamw = manifest.optimizer == "adamw"
        self._classes = label_classes(manifest)  # labels beyond them are refused before a run

        self.restart(start=start, learning_rate=learning_rate)

    def restart(self, *, start: Mapping[str, np.ndarray] | None = None, learning_rate: float | None = None) -> None:
        """Start over as a new session would: values from the base (+ ``start``), AdamW's
        moments and step at zero, the learning rate ``learning_rate`` (None: 1e-3).

        The sessions stay loaded: a second run (a retry, another user) skips building them.
        The same as opening a new session, because the trainable values and the optimizer
        state live here, not in onnxruntime.

        Example:
            >>> session.restart(start=None, learning_rate=2e-3)                    # doctest: +SKIP
            >>> np.array_equal(session.trainable_values()["0.bias"], bundle.trainable_base()["0.bias"])   # doctest: +SKIP
            True
        """
        base = self.bundle.trainable_base()
        values = {name: np.ascontiguousarray(base[name], np.float32).reshape(self._shapes[name]) for name in self.trainable}
        if start:
            values.update(checked_trainable_values(start, self._shapes))
        learning_rate = np.array(checked_learning_rate(learning_rate) if learning_rate is not None else DEFAULT_LEARNING_RATE,
                                 np.float32)
        # Checked before anything changes: a refused argument leaves the session as it was.
        self._values = values
        # AdamW's moments and step: per run, so a new run (a new user) starts from zero.
        self._exp_avg = {name: np.zeros(shape, np.float32) for name, shape in self._shapes.items()}
        self._exp_avg_sq = {name: np.zeros(shape, np.float32) for name, shape in self._shapes.items()}
        self._step = 0
        self._learning_rate = learning_rate

    # -- loading ------------------------------------------------------------------------
    def _load(self, key: str, options: "ort.SessionOptions") -> "ort.InferenceSession":
        """One portable model as an InferenceSession; a failure is typed by what caused it."""
        path = self.bundle.file(key)
        if not path.is_file():
            raise BundleInvalidError(f"bundle file {path.name!r} ({key}) is missing; copy the whole bundle directory again")
        try:
            return ort.InferenceSession(str(path), options, providers=self.providers)
        except Exception as err:  # onnxruntime's Fail / InvalidProtobuf / RuntimeException / EPFail / ...
            raise self._load_error(key, path, options, err) from err

    def _load_error(self, key: str, path: Path, options: "ort.SessionOptions", err: Exception) -> BitfitError:
        """Why onnxruntime could not load a model, found by checking each cause in turn.

        Damaged files first (their sha256 against the manifest: what ORT's messages cannot
        tell apart), then the provider (the same model loads on CPU alone), then an
        onnxruntime too old or too small for the model's opset and ops.
        """
        detail = f"{type(err).__name__}: {str(err).strip()[:400]}"
        if is_out_of_memory(err):
            return ResourceExhaustedError(f"onnxruntime ran out of memory loading the bundle's {key} ({detail}); free memory and retry")
        damaged = self._damaged_files(path)
        if damaged:
            return BundleInvalidError(
                f"cannot load the bundle's {key} ({path.name}): {'; '.join(damaged)}. The bundle is incomplete or "
                f"was altered: copy it again (onnxruntime said {detail})"
            )
        if isinstance(err, _ORT_ERRORS.EPFail) or (self.providers != ["CPUExecutionProvider"] and _loads_on_cpu(path, options)):
            return ProviderUnavailableError(
                f"execution provider(s) {self.providers[:-1]} could not load the bundle's {key} ({detail}); "
                "use device='cpu', or another provider"
            )
        message = str(err)
        if any(s in message for s in ("ValidateOpsetForDomain", "opset", "IR version", "is not a registered function/op",
                                      "Could not find an implementation")) or isinstance(err, _ORT_ERRORS.NotImplemented):
            return BackendUnavailableError(
                f"onnxruntime {ort.__version__} cannot run the bundle's {key} (opset {self.bundle.manifest.opset}): "
                f"{detail}. Install a newer full build of onnxruntime (`pip install -U onnxruntime`)"
            )
        return BundleInvalidError(
            f"onnxruntime {ort.__version__} refuses the bundle's {key} although its files match the manifest "
            f"({detail}); re-export the bundle with this bitfit"
        )

    def _damaged_files(self, model: Path) -> list[str]:
        """Problems with the model file or the bundle files it reads (missing, size, sha256)."""
        from .onnx_refs import external_data_locations

        files = [model]
        try:
            files += [model.parent / loc for loc in dict.fromkeys(external_data_locations(model)) if loc]
        except (BundleInvalidError, OSError):
            files.append(self.bundle.file("weights"))  # the model's protobuf is unreadable: its hash says so
        return self.bundle.path_problems(files)

    def _check_models(self) -> None:
        """The three models take and give what the spec and the manifest say (else: altered)."""
        manifest = self.bundle.manifest
        expected_inputs = {i.name for i in manifest.inputs} | {manifest.label_input} | set(self.trainable)
        problems = []
        for key, session, outputs in ((GRADIENT_MODEL, self._gradient, [f"{n}_grad" for n in self.trainable]),
                                      (EVAL_MODEL, self._eval, [])):
            inputs = {i.name: i for i in session.get_inputs()}
            have = [o.name for o in session.get_outputs()]
            if set(inputs) != expected_inputs:
                problems.append(f"{key} takes {sorted(inputs)}, the manifest names {sorted(expected_inputs)}")
            if have[:2] != [LOSS_OUTPUT, manifest.logits_output] or not set(outputs) <= set(have):
                problems.append(f"{key} gives {have[:4]}..., expected loss, {manifest.logits_output} and the gradients")
            for name, shape in self._shapes.items():
                if name in inputs and list(inputs[name].shape) != list(shape):
                    problems.append(f"{key} takes {name} as {inputs[name].shape}, the manifest says {list(shape)}")
        wanted = {"learning_rate", *(["step"] if manifest.optimizer == "adamw" else [])}
        for name in self.trainable:
            wanted |= {name, f"{name}_grad"} | ({f"{name}_exp_avg", f"{name}_exp_avg_sq"} if manifest.optimizer == "adamw" else set())
        have_inputs = {i.name for i in self._optimizer.get_inputs()}
        if have_inputs != wanted:
            problems.append(f"{OPTIMIZER_MODEL} is not the {manifest.optimizer} update of the manifest's trainable tensors "
                            f"(differs in {sorted(have_inputs ^ wanted)[:3]})")
        if problems:
            raise BundleInvalidError(f"the bundle's portable models do not match manifest.json: {'; '.join(problems[:3])}. "
                                     "The bundle was altered or mixed with another: copy or re-export it")

    # -- training -----------------------------------------------------------------------
    def set_learning_rate(self, value: float) -> None:
        """Set the learning rate of the following steps.

        Example:
            >>> session.set_learning_rate(5e-3)          # doctest: +SKIP
        """
        self._learning_rate = np.array(checked_learning_rate(value), np.float32)

    def _feeds(self, feeds: Mapping[str, np.ndarray], labels: np.ndarray) -> dict[str, Any]:
        """Model inputs + labels, checked against the gradient model, + the current values."""
        manifest = self.bundle.manifest
        out: dict[str, Any] = check_training_feeds(
            self._input_specs, {**feeds, manifest.label_input: labels}, label_input=manifest.label_input,
            classes=self._classes, ignore_index=manifest.ignore_index)
        out.update(self._values)
        return out

    def _run(self, session: "ort.InferenceSession", outputs: list[str], feeds: dict[str, Any]) -> list[np.ndarray]:
        try:
            return session.run(outputs, feeds)
        except Exception as err:
            if is_out_of_memory(err):
                raise ResourceExhaustedError(
                    f"onnxruntime ran out of memory running a training step ({str(err).strip()[-200:]}); use a smaller "
                    "batch or shorter inputs, or free memory"
                ) from err
            if not isinstance(err, _ORT_ERRORS.InvalidArgument):
                raise  # not the arrays' fault (a provider error, a kernel failure): onnxruntime's own error
            # Arrays of the right types and shapes whose values the graph refuses (a token id
            # beyond the embeddings, a sequence longer than the position table).
            raise InvalidUserDataError(
                f"onnxruntime refused the input arrays (...{str(err).strip()[-300:]}); check that every value is one "
                "the model accepts (e.g. ids within its embeddings, sequences within its maximum length)"
            ) from err

    def train_step(self, feeds: Mapping[str, np.ndarray], labels: np.ndarray) -> float:
        """One forward + backward + optimizer step; returns the batch loss (before the update).

        Example:
            >>> loss = session.train_step({"x": x}, np.array([0, 2], np.int64))     # doctest: +SKIP
        """
        loss, grads = self.gradients(feeds, labels)
        state: dict[str, Any] = {"learning_rate": self._learning_rate}
        if self._adamw:
            state["step"] = np.array(self._step + 1, np.int64)  # 1 for the first update (bias correction)
        for name, grad in grads.items():
            state[name] = self._values[name]
            state[f"{name}_grad"] = grad
            if self._adamw:
                state[f"{name}_exp_avg"] = self._exp_avg[name]
                state[f"{name}_exp_avg_sq"] = self._exp_avg_sq[name]
        new = dict(zip(self._optimizer_outputs, self._optimizer.run(self._optimizer_outputs, state)))
        self._step += 1
        for name in self.trainable:
            self._values[name] = new[f"{name}_out"]
            if self._adamw:
                self._exp_avg[name] = new[f"{name}_exp_avg_out"]
                self._exp_avg_sq[name] = new[f"{name}_exp_avg_sq_out"]
        return float(loss)

    def gradients(self, feeds: Mapping[str, np.ndarray], labels: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """The batch loss and the gradient of every trainable tensor at the current values, no update.

        Example:
            >>> loss, grads = session.gradients({"x": x}, np.array([0, 2], np.int64))  # doctest: +SKIP
            >>> {name: g.shape for name, g in grads.items()}                          # doctest: +SKIP
            {'0.bias': (16,), '2.bias': (3,)}
        """
        loss, _, *grads = self._run(self._gradient, self._gradient_outputs, self._feeds(feeds, labels))
        return float(loss), dict(zip(self.trainable, grads))

    def evaluate(self, feeds: Mapping[str, np.ndarray], labels: np.ndarray) -> tuple[float, np.ndarray]:
        """Loss and model output on a batch with the current (trained) tensors, no update.

        Example:
            >>> loss, logits = session.evaluate({"x": x}, np.array([0, 2], np.int64))  # doctest: +SKIP
        """
        loss, output = self._run(self._eval, self._eval_outputs, self._feeds(feeds, labels))
        return float(loss), output

    # -- values -------------------------------------------------------------------------
    def trainable_values(self) -> dict[str, np.ndarray]:
        """Current values of the trainable tensors (copies, training shapes).

        Example:
            >>> {k: v.shape for k, v in session.trainable_values().items()}          # doctest: +SKIP
            {'0.bias': (16,), '2.bias': (3,)}
        """
        return {name: value.copy() for name, value in self._values.items()}

    def set_trainable_values(self, values: Mapping[str, np.ndarray]) -> None:
        """Replace some or all trainable values (each reshaped to its training shape).

        Example:
            >>> session.set_trainable_values({"0.bias": np.zeros(16, np.float32)})     # doctest: +SKIP
        """
        self._values.update(checked_trainable_values(values, self._shapes))

    def parameter_values(self, names: list[str]) -> dict[str, np.ndarray]:
        """Any parameters' current values (copies): trainable from the session, frozen from the bundle.

        Example:
            >>> session.parameter_values(["0.weight", "0.bias"])["0.weight"].shape     # doctest: +SKIP
            (16, 4)
        """
        frozen = [n for n in names if n not in self._values]
        values = self.bundle.base_weights(frozen) if frozen else {}
        return {name: self._values[name].copy() if name in self._values else values[name] for name in names}


def _providers(device: str, providers: str | Sequence[Any] | None) -> list[Any]:
    """The providers for ``device`` or an explicit ``providers`` (which wins when given)."""
    if providers is not None:
        return resolve_providers(providers)
    if device not in ("cpu", "cuda"):
        raise ProviderUnavailableError(f"unknown training device {device!r}: use 'cpu' or 'cuda'")
    if device == "cuda" and not cuda_available():
        raise ProviderUnavailableError(
            f"device='cuda' was asked for but this onnxruntime build has no CUDA provider (it has "
            f"{ort.get_available_providers()}); use device='cpu' or install onnxruntime-gpu instead of onnxruntime"
        )
    return resolve_providers(device)


def default_session_options(total_values: int | None = None) -> "ort.SessionOptions":
    """Session options for the portable models of a model with ``total_values`` values when
    the caller gives none.

    Why no memory pattern: onnxruntime plans one block for every intermediate of a run from
    the shapes it has seen; for a gradient graph (forward activations kept alive for the
    backward pass) that plan held far more than the live tensors. Measured for MiniLM at
    16x64 on onnxruntime 1.32.0: peak RSS 663 MB with the pattern, 443 MB without it, step
    time unchanged within noise (``benchmarks.memory``).

    Why no graph optimizations for a small model (``training_plan.is_small_model``): building
    the three sessions is most of what opening them costs, and optimizing graphs of a few
    small ops gains the steps nothing. ``tools/thread_study.py --repeats 15`` (onnxruntime
    1.19.2, 2 cores, one thread, open + 30 steps of 16 + close, fastest run), off vs on: MLPs
    of 17 k values 8.7 vs 9.0 ms (the smallest alone, twice: 6.3 vs 7.6 and 6.5 vs 7.8 ms),
    131 k 8.9 vs 10.7 ms, 1 M 22.1 vs 23.1 ms; the steps themselves take the same time, the
    sessions build ~1.4 ms faster. Larger models keep onnxruntime's optimizations: MiniLM's
    sessions built no faster at lower levels (docs/personalize.md).

    Example:
        >>> default_session_options().enable_mem_pattern
        False
        >>> default_session_options(17_000).graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        True
    """
    options = ort.SessionOptions()
    options.enable_mem_pattern = False
    if is_small_model(total_values):
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


def _loads_on_cpu(path: Path, options: "ort.SessionOptions") -> bool:
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - any failure means: not the provider's fault
        return False
    return True


__all__ = ["PortableTrainingSession", "Device", "DEFAULT_LEARNING_RATE"]
