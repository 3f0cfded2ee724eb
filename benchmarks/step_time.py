"""Train-step time, side by side in one run: both SDK training backends, their "own
forward" (one run of the bundle's inference model: the floor a train step is compared
with), PyTorch BitFit, full fine-tuning and head-only tuning.

- ``portable``: ``open_training_session(bundle, backend="portable").train_step`` (the
  portable gradient model + the optimizer model, plain ``InferenceSession`` runs), on this
  process's onnxruntime (the main venv: the 1.19.2 training build);
- ``ort-training``: the same call with ``backend="ort-training"`` (ORT's training API);
- ``forward``: the inference model's ``InferenceSession.run`` on the same batch;
- ``device-portable`` / ``device-forward``: the same two portable measurements made by the
  torch-free device worker (``benchmarks.device_worker``) on the newest plain onnxruntime,
  timed inside that process and interleaved call by call with this process's methods, so
  their ratios to the torch step measured here compare calls made in the same rounds.

Every method gets the same batch (``seq`` real positions, no padding), the same thread
count, and is timed interleaved with the others (see ``benchmarks.timing``).

Example:
    >>> from benchmarks.step_time import METHODS, DEVICE_METHODS, step_ratios
    >>> METHODS[:3], DEVICE_METHODS
    (('portable', 'ort-training', 'forward'), ('device-portable', 'device-forward'))
    >>> rows = [{"batch": 1, "seq": 32, "method": m, "median": t} for m, t in
    ...         [("portable", 2.0), ("ort-training", 4.0), ("forward", 1.0), ("torch-bitfit", 5.0)]]
    >>> r = step_ratios(rows)[0]
    >>> r["portable_vs_torch_bitfit"], r["portable_vs_forward"], r["portable_vs_ort_training"]
    (0.4, 2.0, 0.5)
"""

from __future__ import annotations

from typing import Any

from bitfit.sdk.runtime import ort
from bitfit.sdk.trainer import open_training_session

from .sessions import session_options
from .timing import interleaved, summary
from .torch_recipes import TorchTrainer
from .workspace import Workspace

METHODS = ("portable", "ort-training", "forward", "torch-bitfit", "torch-full", "torch-head")
DEVICE_METHODS = ("device-portable", "device-forward")
# Tiny learning rates: the weights' values do not change the time of a step.
_LR = 1e-6


def train_step_times(
    ws: Workspace, shapes: list[tuple[int, int]], *, repeats: int, warmup: int = 1, pause: float = 0.05,
    device: Any = None,
) -> list[dict[str, Any]]:
    """Seconds per step of every method at each (batch, seq), as summary rows (each with
    the ``onnxruntime`` version that ran it); ``device`` (a
    :class:`benchmarks.device_worker.DeviceWorker`) adds the device methods."""
    trainable = [t.name for t in ws.bundle.manifest.trainable]
    portable = open_training_session(ws.bundle, backend="portable", threads=ws.threads, learning_rate=_LR)
    ort_training = open_training_session(ws.bundle, backend="ort-training", threads=ws.threads, learning_rate=_LR)
    forward = ort.InferenceSession(str(ws.bundle.file("inference_model")), session_options(ws.threads),
                                   providers=["CPUExecutionProvider"])
    torch_side = {
        "torch-bitfit": TorchTrainer(ws.fresh_model(), "bitfit", _LR, trainable),
        "torch-full": TorchTrainer(ws.fresh_model(), "full", _LR),
        "torch-head": TorchTrainer(ws.fresh_model(), "head", _LR),
    }
    versions = {m: ort.__version__ for m in ("portable", "ort-training", "forward")}
    if device is not None:
        versions.update({m: device.info["onnxruntime"] for m in DEVICE_METHODS})
    rows = []
    for batch, seq in shapes:
        seed = batch * 1000 + seq
        feeds, labels = ws.random_batch(batch, seq, seed=seed)
        fns = {
            "portable": lambda: portable.train_step(feeds, labels),
            "ort-training": lambda: ort_training.train_step(feeds, labels),
            "forward": lambda: forward.run(None, feeds),
            **{name: (lambda t=trainer: t.step(feeds, labels)) for name, trainer in torch_side.items()},
        }
        methods = list(METHODS)
        if device is not None:
            device.call("shape", batch=batch, seq=seq, seed=seed, vocab=ws.vocab_size, classes=len(ws.labels))
            fns["device-portable"] = lambda: device.call("time", method="portable")
            fns["device-forward"] = lambda: device.call("time", method="forward")
            methods += DEVICE_METHODS
        samples = interleaved(fns, repeats=repeats, warmup=warmup, pause=pause, self_timed=DEVICE_METHODS)
        for method in methods:
            rows.append({"batch": batch, "seq": seq, "method": method, "onnxruntime": versions.get(method),
                         **summary(samples[method])})
    return rows


def step_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per shape, the ratios of medians the report and its targets use (None where a method
    was not measured): each backend / torch BitFit, / its own forward, / the other backend."""
    table: dict[tuple[int, int], dict[str, float]] = {}
    for r in rows:
        table.setdefault((r["batch"], r["seq"]), {})[r["method"]] = r["median"]

    def ratio(m: dict[str, float], a: str, b: str) -> float | None:
        return m[a] / m[b] if a in m and b in m and m[b] else None

    out = []
    for (batch, seq), m in table.items():
        out.append({
            "batch": batch, "seq": seq,
            "portable_vs_torch_bitfit": ratio(m, "portable", "torch-bitfit"),
            "ort_training_vs_torch_bitfit": ratio(m, "ort-training", "torch-bitfit"),
            "device_portable_vs_torch_bitfit": ratio(m, "device-portable", "torch-bitfit"),
            "portable_vs_forward": ratio(m, "portable", "forward"),
            "ort_training_vs_forward": ratio(m, "ort-training", "forward"),
            "device_portable_vs_forward": ratio(m, "device-portable", "device-forward"),
            "portable_vs_ort_training": ratio(m, "portable", "ort-training"),
            "device_portable_vs_ort_training": ratio(m, "device-portable", "ort-training"),
            "device_forward_vs_forward": ratio(m, "device-forward", "forward"),
            "portable_vs_torch_full": ratio(m, "portable", "torch-full"),
            "portable_vs_torch_head": ratio(m, "portable", "torch-head"),
            "torch_bitfit_vs_full": ratio(m, "torch-bitfit", "torch-full"),
        })
    return out
