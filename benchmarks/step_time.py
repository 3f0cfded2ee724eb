"""Train-step time, side by side in one process: the SDK's ``TrainingSession.train_step``,
the SDK's forward pass (an ORT inference session of the bundle, the floor a train step
is compared with), PyTorch BitFit, PyTorch full fine-tuning and PyTorch head-only.

Every method gets the same batch (``seq`` real positions, no padding), the same thread
count, and is timed interleaved with the others (see ``benchmarks.timing``).

Example:
    >>> from benchmarks.step_time import METHODS
    >>> METHODS
    ('sdk', 'sdk-forward', 'torch-bitfit', 'torch-full', 'torch-head')
"""

from __future__ import annotations

from typing import Any

from bitfit.sdk.runtime import ort
from bitfit.sdk.trainer import TrainingSession

from .sessions import session_options
from .timing import interleaved, summary
from .torch_recipes import TorchTrainer
from .workspace import Workspace

METHODS = ("sdk", "sdk-forward", "torch-bitfit", "torch-full", "torch-head")
# Tiny learning rates: the weights' values do not change the time of a step.
_LR = 1e-6


def train_step_times(
    ws: Workspace, shapes: list[tuple[int, int]], *, repeats: int, warmup: int = 1, pause: float = 0.05,
) -> list[dict[str, Any]]:
    """Seconds per step of every method at each (batch, seq), as summary rows."""
    trainable = [t.name for t in ws.bundle.manifest.trainable]
    sdk = TrainingSession(ws.bundle, threads=ws.threads, learning_rate=_LR)
    forward = ort.InferenceSession(str(ws.bundle.file("inference_model")), session_options(ws.threads),
                                   providers=["CPUExecutionProvider"])
    torch_side = {
        "torch-bitfit": TorchTrainer(ws.fresh_model(), "bitfit", _LR, trainable),
        "torch-full": TorchTrainer(ws.fresh_model(), "full", _LR),
        "torch-head": TorchTrainer(ws.fresh_model(), "head", _LR),
    }
    rows = []
    for batch, seq in shapes:
        feeds, labels = ws.random_batch(batch, seq, seed=batch * 1000 + seq)
        fns = {
            "sdk": lambda: sdk.train_step(feeds, labels),
            "sdk-forward": lambda: forward.run(None, feeds),
            **{name: (lambda t=trainer: t.step(feeds, labels)) for name, trainer in torch_side.items()},
        }
        samples = interleaved(fns, repeats=repeats, warmup=warmup, pause=pause)
        for method in METHODS:
            rows.append({"batch": batch, "seq": seq, "method": method, **summary(samples[method])})
    return rows


def step_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per shape: SDK / torch BitFit, SDK / torch full, SDK / its forward pass."""
    table: dict[tuple[int, int], dict[str, float]] = {}
    for r in rows:
        table.setdefault((r["batch"], r["seq"]), {})[r["method"]] = r["median"]
    out = []
    for (batch, seq), m in table.items():
        out.append({
            "batch": batch, "seq": seq,
            "sdk_vs_torch_bitfit": m["sdk"] / m["torch-bitfit"],
            "sdk_vs_torch_full": m["sdk"] / m["torch-full"],
            "sdk_vs_torch_head": m["sdk"] / m["torch-head"],
            "sdk_vs_forward": m["sdk"] / m["sdk-forward"],
            "torch_bitfit_vs_full": m["torch-bitfit"] / m["torch-full"],
        })
    return out
