"""ONNX Runtime profiles (``SessionOptions.enable_profiling``) summarized per op type, and a
profile of the portable training step: the bundle's portable gradient model, its optimizer
model and its inference model on one batch. numpy and ``bitfit.sdk`` only, so the
torch-free device worker (``benchmarks.device_worker``) profiles the newest onnxruntime
with the same code as the main process.

Example:
    >>> from benchmarks.profiles import part_of, portable_part_of
    >>> part_of("/encoder/layer.0/output/dense/MatMul_Grad/FusedMatMul_0", "FusedMatMul")
    'backward'
    >>> portable_part_of("bitfit.grad/MatMul.17", "MatMul"), portable_part_of("/encoder/Gelu", "Gelu")
    ('backward', 'forward')
"""

from __future__ import annotations

import collections
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .sessions import session_options
from .timing import summary


def part_of(node_name: str, op_type: str) -> str:
    """ORT training graph: ``backward`` for gradient nodes, ``optimizer`` for accumulators, else ``forward``."""
    if node_name.startswith("GradientAccumulator") or op_type.startswith("InPlaceAccumulator"):
        return "optimizer"
    if "_Grad/" in node_name or op_type.endswith("Grad") or "Grad_" in op_type:
        return "backward"
    return "forward"


def portable_part_of(node_name: str, op_type: str) -> str:
    """Portable gradient graph: ``backward`` for the nodes ``export.gradient_graph`` added (the
    loss and the gradients, named ``bitfit.grad/...``; ORT's fused nodes keep their first
    node's name), else ``forward``."""
    return "backward" if node_name.startswith("bitfit.grad/") else "forward"


def summarize_profile(path: str | os.PathLike, skip: int = 1,
                      classify: Callable[[str, str], str] = part_of) -> dict[str, Any]:
    """Per-run milliseconds by part and by (part, op type) from an ORT profile JSON,
    counting only the node events inside the ``model_run`` windows after the first
    ``skip`` runs (the first run allocates and prepacks). ``overhead_ms_per_run`` is the
    run's wall time not spent inside kernels: the executor's per-node cost.

    Example:
        >>> summarize_profile(session.end_profiling())["top_ops"][0]["op"]       # doctest: +SKIP
        'MatMul'
    """
    events = json.loads(Path(path).read_text(encoding="utf-8"))
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")[skip:]
    if not runs:
        return {"runs": 0}
    starts = np.array([a for a, _ in runs])
    ends = np.array([b for _, b in runs])

    def inside(ts: float) -> bool:
        i = int(np.searchsorted(starts, ts, side="right")) - 1
        return i >= 0 and ts <= ends[i]

    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and inside(e["ts"])]
    by_op: dict[tuple[str, str], float] = collections.defaultdict(float)
    counts: collections.Counter = collections.Counter()
    for e in nodes:
        op = e["args"].get("op_name", "?")
        part = classify(e["name"][: -len("_kernel_time")], op)
        by_op[(part, op)] += e["dur"] / 1e3
        counts[(part, op)] += 1
    n = len(runs)
    by_part: dict[str, float] = collections.defaultdict(float)
    for (part, _), ms in by_op.items():
        by_part[part] += ms / n
    run_ms = float(np.median(ends - starts)) / 1e3
    kernel_ms = sum(by_op.values()) / n
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:12]
    return {
        "runs": n,
        "nodes_per_run": len(nodes) // n,
        "kernel_ms_per_run": kernel_ms,
        "model_run_ms": run_ms,
        "overhead_ms_per_run": max(0.0, run_ms - kernel_ms),
        "by_part_ms": dict(by_part),
        "top_ops": [{"part": p, "op": o, "ms_per_run": ms / n, "nodes": counts[(p, o)] // n} for (p, o), ms in top],
        "op_ms": {f"{p}/{o}": ms / n for (p, o), ms in by_op.items()},
    }


def profiled_session(model: str | os.PathLike, threads: int, prefix: Path, level: str = "all") -> Any:
    """An ``InferenceSession`` of ``model`` on CPU writing its profile under ``prefix``.

    Example:
        >>> session = profiled_session("inference.onnx", 2, Path("profiles/fwd"))       # doctest: +SKIP
        >>> profile_runs(session, feeds, runs=3)["runs"]                                # doctest: +SKIP
        3
    """
    from bitfit.sdk.runtime import ort

    options = session_options(threads, level)
    options.enable_profiling = True
    options.profile_file_prefix = str(prefix)
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def profile_runs(session: Any, feeds: Mapping[str, Any], runs: int,
                 classify: Callable[[str, str], str] = portable_part_of) -> dict[str, Any]:
    """``runs + 1`` profiled runs of ``session`` (the first one skipped) summarized."""
    for _ in range(runs + 1):
        session.run(None, dict(feeds))
    return summarize_profile(session.end_profiling(), classify=classify)


def profile_portable_step(bundle_dir: str | os.PathLike, feeds: Mapping[str, np.ndarray], labels: np.ndarray, *,
                          threads: int, out_dir: str | os.PathLike, steps: int = 3) -> dict[str, Any]:
    """Profiles of one portable step's two runs (the gradient model, then the optimizer
    model) and of the inference model on the same batch, each in its own session with the
    options the SDK uses (ORT_ENABLE_ALL, ``threads`` intra-op threads).

    Example:
        >>> p = profile_portable_step("bundle", feeds, labels, threads=2, out_dir="profiles")  # doctest: +SKIP
        >>> p["gradient"]["by_part_ms"]["backward"] > 0                                       # doctest: +SKIP
        True
    """
    from bitfit.sdk.bundle import Bundle
    from bitfit.sdk.runtime import ort

    bundle = Bundle.open(bundle_dir, verify="none")
    m = bundle.manifest
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{len(labels)}x{next(iter(feeds.values())).shape[-1]}-{time.time_ns()}"
    values = {t.name: np.ascontiguousarray(v, np.float32).reshape(t.shape) for t, v in
              ((t, bundle.trainable_base()[t.name]) for t in m.trainable)}
    gradient = profiled_session(bundle.file("portable_gradient_model"), threads, out / f"portable-gradient-{tag}")
    grad_feeds = {**feeds, m.label_input: labels, **values}
    grad_out = ["loss", m.logits_output, *(f"{t.name}_grad" for t in m.trainable)]
    grads = gradient.run(grad_out, grad_feeds)[2:]
    optimizer = profiled_session(bundle.file("portable_optimizer_model"), threads, out / f"portable-optimizer-{tag}")
    state: dict[str, Any] = {"learning_rate": np.array(1e-6, np.float32)}
    if m.optimizer == "adamw":
        state["step"] = np.array(1, np.int64)
    for t, g in zip(m.trainable, grads):
        state[t.name], state[f"{t.name}_grad"] = values[t.name], g
        if m.optimizer == "adamw":
            state[f"{t.name}_exp_avg"] = np.zeros_like(g)
            state[f"{t.name}_exp_avg_sq"] = np.zeros_like(g)
    grad_seconds, opt_seconds = [], []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        gradient.run(grad_out, grad_feeds)
        t1 = time.perf_counter()
        optimizer.run(None, state)
        grad_seconds.append(t1 - t0)
        opt_seconds.append(time.perf_counter() - t1)
    gradient_profile = summarize_profile(gradient.end_profiling(), skip=2, classify=portable_part_of)
    optimizer_profile = summarize_profile(optimizer.end_profiling(), skip=1, classify=lambda n, o: "optimizer")
    forward = profiled_session(bundle.file("inference_model"), threads, out / f"forward-{tag}")
    forward_profile = profile_runs(forward, feeds, steps, classify=lambda n, o: "forward")
    return {
        "batch": int(len(labels)), "seq": int(next(iter(feeds.values())).shape[-1]), "steps": steps,
        "onnxruntime": ort.__version__,
        "gradient_run_seconds": summary(grad_seconds[1:]), "optimizer_run_seconds": summary(opt_seconds[1:]),
        "gradient": gradient_profile, "optimizer": optimizer_profile, "forward": forward_profile,
    }
