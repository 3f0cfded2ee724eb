"""The local training loop's engine: one ONNX Runtime training session over a bundle's
artifacts, with a fresh checkpoint state every time.

Why fresh: AdamW's moments live in the CheckpointState, and re-creating the Optimizer
does not reset them, so reusing a state for user B after user A changes B's updates
(measured max diff 1.8e-3). A new state per session matched exactly.

Example:
    >>> from bitfit.sdk.bundle import Bundle
    >>> from bitfit.sdk.trainer import TrainingSession
    >>> session = TrainingSession(Bundle.open("bundles/tiny"))          # doctest: +SKIP
    >>> loss = session.train_step(feeds, labels)                          # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np

from .bundle import Bundle
from .errors import BundleInvalidError, ProviderUnavailableError
from .ort_training import OrtValue, ort, training_api

Device = Literal["cpu", "cuda"]


def cuda_available() -> bool:
    """Whether this onnxruntime build can run on CUDA here."""
    return "CUDAExecutionProvider" in ort.get_available_providers()


class TrainingSession:
    """Trains a bundle's trainable tensors, starting from base + an optional delta.

    ``start`` maps trainable names to the values to start from (base + the user's current
    delta); missing names start from the base. ``session_options`` (an
    ``onnxruntime.SessionOptions``) is passed to ORT as is, e.g. to profile a step.
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        start: Mapping[str, np.ndarray] | None = None,
        device: Device = "cpu",
        threads: int | None = None,
        learning_rate: float | None = None,
        session_options: "ort.SessionOptions | None" = None,
    ) -> None:
        if device == "cuda" and not cuda_available():
            raise ProviderUnavailableError(
                "device='cuda' was asked for but this onnxruntime build has no CUDA provider; "
                "use device='cpu' or install the CUDA build of onnxruntime-training"
            )
        if device not in ("cpu", "cuda"):
            raise ProviderUnavailableError(f"unknown training device {device!r}: use 'cpu' or 'cuda'")
        self.bundle = bundle
        manifest = bundle.manifest
        # Caller's options (e.g. enable_profiling for a profile of the train step) or defaults.
        options = session_options if session_options is not None else ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        try:
            self.state = training_api.CheckpointState.load_checkpoint(str(bundle.file("checkpoint")))
            self.module = training_api.Module(
                str(bundle.file("training_model")), self.state, str(bundle.file("eval_model")),
                device=device, session_options=options,
            )
        except BundleInvalidError:
            raise
        except Exception as err:  # ORT raises RuntimeError / Fail / InvalidGraph
            raise BundleInvalidError(f"onnxruntime cannot load the bundle's training artifacts ({err}); re-export the bundle") from err
        order = manifest.source.get("parameter_order")
        if not order:
            raise BundleInvalidError("manifest has no source.parameter_order; re-export the bundle with this bitfit")
        self._fill_parameters(order, dict(start or {}))
        # The optimizer must be created after the parameters hold data: built on a nominal
        # (shapes-only) state, its set_learning_rate segfaults in ORT 1.19.2.
        try:
            self.optimizer = training_api.Optimizer(str(bundle.file("optimizer_model")), self.module)
        except Exception as err:
            raise BundleInvalidError(f"onnxruntime cannot load the bundle's optimizer model ({err}); re-export the bundle") from err
        self.trainable = [t.name for t in manifest.trainable]
        self.input_names = list(self.module.input_names())
        if learning_rate is not None:
            self.set_learning_rate(learning_rate)

    def _fill_parameters(self, order: list[str], start: dict[str, np.ndarray]) -> None:
        """Copy every parameter into the nominal state through one preallocated buffer.

        Filled tensor by tensor straight from the (memory-mapped) weights file, so the base
        weights are held once on the way in, not three times (a dict of tensors, their
        concatenation and ORT's copy). Measured for MiniLM by ``benchmarks.memory``: 339 MB
        -> 250 MB resident after building the training session.
        """
        from safetensors import SafetensorError
        from safetensors.numpy import safe_open

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
        self.optimizer.set_learning_rate(float(value))

    def _args(self, feeds: Mapping[str, np.ndarray], labels: np.ndarray) -> list[np.ndarray]:
        values = dict(feeds)
        values[self.bundle.manifest.label_input] = labels
        return [values[name] for name in self.input_names]

    def train_step(self, feeds: Mapping[str, np.ndarray], labels: np.ndarray) -> float:
        """One forward + backward + optimizer step; returns the batch loss."""
        self.module.train()
        loss, _ = self.module(*self._args(feeds, labels))
        self.optimizer.step()
        self.module.lazy_reset_grad()
        return float(loss)

    def evaluate(self, feeds: Mapping[str, np.ndarray], labels: np.ndarray) -> tuple[float, np.ndarray]:
        """Loss and logits on a batch with the current (trained) tensors, no update."""
        self.module.eval()
        loss, logits = self.module(*self._args(feeds, labels))
        return float(loss), np.asarray(logits)

    def trainable_values(self) -> dict[str, np.ndarray]:
        """Current values of the trainable tensors (copies)."""
        return {name: np.array(self.state.parameters[name].data, np.float32) for name in self.trainable}

    def set_trainable_values(self, values: Mapping[str, np.ndarray]) -> None:
        for name, value in values.items():
            self.state.parameters[name].data = np.asarray(value, np.float32).reshape(self.state.parameters[name].data.shape)

    def parameter_values(self, names: list[str]) -> dict[str, np.ndarray]:
        """Any parameters' current values (copies), trainable or frozen."""
        return {name: np.array(self.state.parameters[name].data) for name in names}
