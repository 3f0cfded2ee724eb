"""Why the numbers are what they are: ONNX Runtime profiles of both training backends' train
steps (the portable gradient + optimizer models, and the ORT training API's step) and of the
forward pass, the op mix of the optimized inference graphs (plain vs bundle), and the
cost of the bundle's per-row rewrite separated from the cost of feeding biases.

``TrainingSession`` does not take SessionOptions, so :func:`profile_train_step` builds
the same session itself (checkpoint, parameter buffer, optimizer, as
``bitfit.sdk.trainer`` does) with ``enable_profiling`` on; the profile JSON is written
when the training session is destroyed.

Example:
    >>> from benchmarks.diagnostics import part_of
    >>> part_of("/encoder/layer.0/output/dense/MatMul_Grad/FusedMatMul_0", "FusedMatMul")
    'backward'
"""

from __future__ import annotations

import collections
import gc
import glob
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from bitfit.sdk.ort_training import OrtValue, ort, training_api

from .profiles import part_of, profile_portable_step, summarize_profile
from .sessions import session_options
from .timing import interleaved, summary
from .workspace import Workspace

__all__ = ["part_of", "summarize_profile", "profile_train_step", "profile_portable", "optimized_graph_ops",
           "overridable_plain_model", "rewrite_cost"]


def profile_portable(ws: Workspace, *, batch: int, seq: int, steps: int = 3) -> dict[str, Any]:
    """ORT op-type profiles of the portable step (gradient + optimizer models) and of the
    inference model on one batch, in this process's onnxruntime
    (:func:`benchmarks.profiles.profile_portable_step`; the device worker runs the same)."""
    feeds, labels = ws.random_batch(batch, seq, seed=11)
    return profile_portable_step(ws.bundle.path, feeds, labels, threads=ws.threads, out_dir=ws.work_dir / "profiles",
                                 steps=steps)


def profile_train_step(ws: Workspace, *, batch: int, seq: int, steps: int = 3) -> dict[str, Any]:
    """ORT profiles of the ort-training backend's train step and the forward pass on the same batch."""
    bundle = ws.bundle
    out_dir = ws.work_dir / "profiles"
    out_dir.mkdir(exist_ok=True)
    for old in out_dir.glob(f"*-{batch}x{seq}_*.json"):
        old.unlink()
    feeds, labels = ws.random_batch(batch, seq, seed=11)

    options = session_options(ws.threads)
    options.enable_profiling = True
    options.profile_file_prefix = str(out_dir / f"train-{batch}x{seq}")
    state = training_api.CheckpointState.load_checkpoint(str(bundle.file("checkpoint")))
    module = training_api.Module(str(bundle.file("training_model")), state, str(bundle.file("eval_model")),
                                 device="cpu", session_options=options)
    order = bundle.manifest.source["parameter_order"]
    weights = bundle.base_weights(order)
    buffer = np.concatenate([weights[name].ravel() for name in order]).astype(np.float32)
    value = OrtValue.ortvalue_from_numpy(buffer)  # keep alive: ORT reads the numpy memory
    module.copy_buffer_to_parameters(value._ortvalue, trainable_only=False)
    optimizer = training_api.Optimizer(str(bundle.file("optimizer_model")), module)
    optimizer.set_learning_rate(1e-6)
    args = [{**feeds, bundle.manifest.label_input: labels}[n] for n in module.input_names()]
    module.train()
    module(*args)  # warm-up (its events are in the profile too: runs counts it)
    optimizer.step()
    module.lazy_reset_grad()

    def module_call() -> None:
        module(*args)

    def optimizer_step() -> None:
        optimizer.step()
        module.lazy_reset_grad()

    call_samples, opt_samples = [], []
    for _ in range(steps):
        s = interleaved({"call": module_call}, repeats=1, warmup=0, pause=0.02)
        o = interleaved({"opt": optimizer_step}, repeats=1, warmup=0, pause=0)
        call_samples += s["call"]
        opt_samples += o["opt"]
    del optimizer, module, state, value, buffer, weights
    gc.collect()
    # The optimizer's session shares the options and writes its own (small) profile file.
    train_files = sorted(glob.glob(str(out_dir / f"train-{batch}x{seq}_*.json")), key=os.path.getsize)
    training = summarize_profile(train_files[-1]) if train_files else None

    inf_options = session_options(ws.threads)
    inf_options.enable_profiling = True
    inf_options.profile_file_prefix = str(out_dir / f"forward-{batch}x{seq}")
    session = ort.InferenceSession(str(bundle.file("inference_model")), inf_options, providers=["CPUExecutionProvider"])
    for _ in range(steps + 1):
        session.run(None, feeds)
    forward = summarize_profile(session.end_profiling())
    return {
        "batch": batch, "seq": seq, "steps": steps,
        "module_call_seconds": summary(call_samples), "optimizer_step_seconds": summary(opt_samples),
        "training": training, "forward": forward,
    }


def _op_counts(path: Path, threads: int, level: str, optimized: Path) -> dict[str, int]:
    options = session_options(threads, level)
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    model = onnx.load(str(optimized), load_external_data=False)
    return dict(collections.Counter(n.op_type for n in model.graph.node))


def optimized_graph_ops(ws: Workspace, level: str = "all") -> dict[str, Any]:
    """Op counts of the plain and the bundle inference graphs after ORT's optimizations."""
    out_dir = ws.work_dir / "optimized"
    out_dir.mkdir(exist_ok=True)
    plain = _op_counts(ws.plain_onnx, ws.threads, level, out_dir / "plain.onnx")
    bundle = _op_counts(ws.bundle.file("inference_model"), ws.threads, level, out_dir / "bundle.onnx")
    ops = sorted(set(plain) | set(bundle))
    differ = [{"op": op, "plain": plain.get(op, 0), "bundle": bundle.get(op, 0)} for op in ops
              if plain.get(op, 0) != bundle.get(op, 0)]
    return {"level": level, "plain_nodes": sum(plain.values()), "bundle_nodes": sum(bundle.values()), "differ": differ}


def overridable_plain_model(ws: Workspace) -> Path | None:
    """The plain model with its bias constants exposed as overridable 1-D inputs (no
    per-row rewrite): what a single-user inference graph of the bundle could be."""
    names = {t.name for t in ws.bundle.manifest.trainable}
    model = onnx.load(str(ws.plain_onnx))
    inits = [i for i in model.graph.initializer if i.name in names]
    if len(inits) != len(names):
        return None  # the exporter folded some bias away under another name
    model.graph.input.extend(helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in inits)
    path = ws.work_dir / "plain-overridable.onnx"
    onnx.save(model, str(path))
    return path


def rewrite_cost(ws: Workspace, *, batches: tuple[int, ...], seq: int, repeats: dict[int, int], level: str = "all",
                 pause: float = 0.02) -> dict[str, Any]:
    """Plain vs plain with overridable 1-D biases (fed) vs the bundle's per-row graph (fed)."""
    (ws.work_dir / "optimized").mkdir(exist_ok=True)
    variant = overridable_plain_model(ws)
    if variant is None:
        return {"available": False}
    base = ws.bundle.trainable_base()
    user_1d = {k: (v + 0.01).astype(np.float32) for k, v in base.items()}
    user_rows = {t.name: user_1d[t.name].reshape(t.inference_shape) for t in ws.bundle.manifest.trainable}
    sessions = {name: ort.InferenceSession(str(path), session_options(ws.threads, level), providers=["CPUExecutionProvider"])
                for name, path in (("plain", ws.plain_onnx), ("plain-overridable", variant),
                                   ("bundle", ws.bundle.file("inference_model")))}
    rows = []
    for batch in batches:
        feeds, _ = ws.random_batch(batch, seq, seed=batch + 5)
        fns = {
            "plain": lambda: sessions["plain"].run(None, feeds),
            "plain-overridable+fed": lambda: sessions["plain-overridable"].run(None, {**feeds, **user_1d}),
            "bundle-per-row+fed": lambda: sessions["bundle"].run(None, {**feeds, **user_rows}),
        }
        samples = interleaved(fns, repeats=repeats.get(batch, 10), warmup=2, pause=pause)
        plain_median = summary(samples["plain"])["median"]
        for method, s in samples.items():
            rows.append({"batch": batch, "seq": seq, "method": method, **summary(s),
                         "vs_plain": summary(s)["median"] / plain_median})
    return {"available": True, "level": level, "rows": rows,
            "variant_ops": _op_counts(variant, ws.threads, level, ws.work_dir / "optimized" / "variant.onnx")}
