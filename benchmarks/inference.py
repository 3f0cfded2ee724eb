"""Inference with a user's delta vs the plain model, and what serving many users costs.

- latency: a plain ONNX export of the same torch model (biases as constants) vs the SDK's
  ``Predictor`` serving the base (``sdk-base``) and a user's delta (``sdk-user``), at each
  graph optimization level and batch size, interleaved.
- user switch: ``Predictor.user_tensors`` for a cached user, and a batch-1 predict call
  alternating between two users vs always the same one.
- per-row: one batch whose rows belong to different users vs the same batch for one user.
- overridable (optional): the plain model with its bias constants turned into overridable
  graph inputs and fed a user's 1-D biases every call (what ONNX Runtime's constant folding
  loses when initializers become overridable).
- rebuild: what a per-user session costs instead (a new ``InferenceSession`` with the
  user's tensors as ``SessionOptions.add_initializer`` + one run) vs switching in the SDK.

The deltas are random (N(0, 0.02) per value): their values do not change any timing. The
functions need only ``bitfit.sdk`` and numpy (plus a workspace-like object: ``bundle``,
``threads``, ``plain_onnx``, ``random_batch``), so the torch-free device worker runs them
on the newest onnxruntime.

Example:
    >>> from benchmarks.inference import LEVELS
    >>> LEVELS
    ('disabled', 'basic', 'extended', 'all')
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bitfit.sdk.delta import Delta
from bitfit.sdk.predictor import Predictor
from bitfit.sdk.runtime import ort
from bitfit.sdk.store import DeltaStore

from .sessions import LEVELS, session_options
from .timing import interleaved, per_call, summary

if TYPE_CHECKING:  # torch-free at run time: the device worker calls these functions too
    from .workspace import Workspace


def random_user_store(ws: Workspace, root: Path, users: int, seed: int = 0) -> list[str]:
    """Save a random fp32 delta for ``users`` users in a store at ``root``; return their ids."""
    store = DeltaStore(root)
    base = ws.bundle.trainable_base()
    rng = np.random.default_rng(seed)
    names = []
    for i in range(users):
        trained = {k: v + rng.normal(0, 0.02, v.shape).astype(np.float32) for k, v in base.items()}
        store.save(f"u{i}", Delta.from_params(trained, base, ws.bundle.manifest.base_fingerprint, encoding="fp32"))
        names.append(f"u{i}")
    return names


def latency(ws: Workspace, store: Path, *, levels: tuple[str, ...], batches: tuple[int, ...], seq: int,
            repeats: dict[int, int], pause: float = 0.02, plain_overridable: Path | None = None) -> list[dict[str, Any]]:
    """Plain vs SDK (base, user) per level and batch; with ``plain_overridable`` (see
    ``benchmarks.diagnostics.overridable_plain_model``) also that model fed a user's biases."""
    rows = []
    user_1d = {k: (v + 0.01).astype(np.float32) for k, v in ws.bundle.trainable_base().items()}
    for level in levels:
        options = session_options(ws.threads, level)
        plain = ort.InferenceSession(str(ws.plain_onnx), options, providers=["CPUExecutionProvider"])
        overridable = (ort.InferenceSession(str(plain_overridable), options, providers=["CPUExecutionProvider"])
                       if plain_overridable else None)
        predictor = Predictor(ws.bundle, store, graph_optimization=level, threads=ws.threads, providers="cpu")
        predictor.user_tensors("u0")
        for batch in batches:
            feeds, _ = ws.random_batch(batch, seq, seed=batch)
            fns = {
                "plain": lambda: plain.run(None, feeds),
                "sdk-base": lambda: predictor.logits(feeds, [None] * batch),
                "sdk-user": lambda: predictor.logits(feeds, ["u0"] * batch),
            }
            if overridable is not None:
                fns["plain-overridable+fed"] = lambda: overridable.run(None, {**feeds, **user_1d})
            samples = interleaved(fns, repeats=repeats.get(batch, 10), warmup=2, pause=pause)
            for method, s in samples.items():
                rows.append({"level": level, "batch": batch, "seq": seq, "method": method, **summary(s)})
        del plain, predictor, overridable
    return rows


def user_switch(ws: Workspace, store: Path, users: list[str], *, seq: int, repeats: int, block: int = 10,
                pause: float = 0.02) -> dict[str, Any]:
    """Cached-user lookup cost and the cost of alternating users between predict calls."""
    predictor = Predictor(ws.bundle, store, threads=ws.threads, providers="cpu")
    a, b = users[0], users[1]
    predictor.user_tensors(a), predictor.user_tensors(b)
    same = per_call(lambda: predictor.user_tensors(a), number=1000, repeats=repeats)
    cycle = itertools.cycle([a, b])
    alternate = per_call(lambda: predictor.user_tensors(next(cycle)), number=1000, repeats=repeats)
    feeds, _ = ws.random_batch(1, seq, seed=1)

    def same_user_block() -> None:
        for _ in range(block):
            predictor.logits(feeds, [a])

    def alternating_block() -> None:
        for i in range(block):
            predictor.logits(feeds, [a if i % 2 == 0 else b])

    samples = interleaved({"same": same_user_block, "alternating": alternating_block}, repeats=repeats, warmup=1,
                          pause=pause)
    same_call = summary([s / block for s in samples["same"]])
    alt_call = summary([s / block for s in samples["alternating"]])
    return {
        "user_tensors_cached_same": summary(same),
        "user_tensors_cached_alternating": summary(alternate),
        "predict_same_user": same_call,
        "predict_alternating_users": alt_call,
        "switch_overhead_seconds": alt_call["median"] - same_call["median"],
        "seq": seq,
        "block": block,
    }


def per_row(ws: Workspace, store: Path, users: list[str], *, batch: int, seq: int, repeats: int,
            pause: float = 0.05) -> dict[str, Any]:
    """A batch of ``batch`` rows for one user vs the same rows spread over all users."""
    predictor = Predictor(ws.bundle, store, threads=ws.threads, providers="cpu")
    mixed = [users[i % len(users)] for i in range(batch)]
    for u in users:
        predictor.user_tensors(u)
    feeds, _ = ws.random_batch(batch, seq, seed=7)
    single = [users[0]] * batch
    one = predictor.logits(feeds, single)
    rows_out = predictor.logits(feeds, mixed)
    check = np.concatenate([predictor.logits({k: v[i:i + 1] for k, v in feeds.items()}, [mixed[i]]) for i in range(batch)])
    samples = interleaved({"single-user": lambda: predictor.logits(feeds, single),
                           "per-row": lambda: predictor.logits(feeds, mixed)}, repeats=repeats, warmup=1, pause=pause)
    s_single, s_rows = summary(samples["single-user"]), summary(samples["per-row"])
    return {
        "batch": batch, "seq": seq, "users_in_batch": len(set(mixed)), "per_row_bundle": ws.bundle.manifest.per_row,
        "single_user": s_single, "per_row": s_rows, "ratio": s_rows["median"] / s_single["median"],
        "per_row_vs_row_by_row_max_abs_diff": float(np.abs(rows_out - check).max()),
        "single_vs_mixed_row0_max_abs_diff": float(np.abs(one[0] - rows_out[0]).max()),
    }


def rebuild_per_user(ws: Workspace, store: Path, users: list[str], *, seq: int, repeats: int) -> dict[str, Any]:
    """New session per user (biases baked in via add_initializer) vs the SDK's switch."""
    predictor = Predictor(ws.bundle, store, threads=ws.threads, providers="cpu")
    feeds, _ = ws.random_batch(1, seq, seed=3)
    tensors = {u: predictor.user_tensors(u) for u in users}
    cycle = itertools.cycle(users)
    model_path = str(ws.bundle.file("inference_model"))

    def rebuild() -> None:
        user = next(cycle)
        options = session_options(ws.threads)
        values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for v in tensors[user].values()]
        for name, value in zip(tensors[user], values):
            options.add_initializer(name, value)
        session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
        session.run(None, feeds)

    def switch() -> None:
        predictor.logits(feeds, [next(cycle)])

    samples = interleaved({"rebuild": rebuild, "switch": switch}, repeats=repeats, warmup=1, pause=0.05)
    r, s = summary(samples["rebuild"]), summary(samples["switch"])
    return {"seq": seq, "rebuild_and_run": r, "switch_and_run": s, "ratio": r["median"] / s["median"]}


def inference_benchmarks(
    ws: Workspace, *, levels: tuple[str, ...] = LEVELS, batches: tuple[int, ...] = (1, 32), seq: int = 64,
    repeats: dict[int, int] | None = None, switch_repeats: int = 7, per_row_repeats: int = 7,
    rebuild_repeats: int = 4, users: int = 8, device: Any = None,
) -> dict[str, Any]:
    """All inference measurements, with one store of random user deltas; ``device`` (a
    :class:`benchmarks.device_worker.DeviceWorker`) repeats the latency (with the
    overridable-initializer variant) and per-row measurements on the device venv's
    onnxruntime, under ``"device"``."""
    store = ws.work_dir / "inference-store"
    if store.exists():
        import shutil

        shutil.rmtree(store)
    names = random_user_store(ws, store, users)
    repeats = repeats or {1: 30, 32: 8}
    out = {
        "seq": seq,
        "onnxruntime": ort.__version__,
        "latency": latency(ws, store, levels=levels, batches=batches, seq=seq, repeats=repeats),
        "switch": user_switch(ws, store, names, seq=seq, repeats=switch_repeats),
        "per_row": per_row(ws, store, names, batch=max(batches), seq=seq, repeats=per_row_repeats),
        "rebuild": rebuild_per_user(ws, store, names, seq=seq, repeats=rebuild_repeats),
    }
    if device is not None:
        from .diagnostics import overridable_plain_model  # onnx: main process only

        variant = overridable_plain_model(ws)
        out["device"] = {"onnxruntime": device.info["onnxruntime"], **device.call(
            "inference", store=str(store), users=names, plain=str(ws.plain_onnx),
            overridable=str(variant) if variant else None, levels=list(levels), batches=list(batches), seq=seq,
            repeats={str(k): v for k, v in repeats.items()}, per_row_repeats=per_row_repeats,
            vocab=ws.vocab_size, classes=len(ws.labels))}
    return out


def latency_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per level and batch: sdk-user / plain and sdk-base / plain."""
    table: dict[tuple[str, int], dict[str, float]] = {}
    for r in rows:
        table.setdefault((r["level"], r["batch"]), {})[r["method"]] = r["median"]
    return [{"level": level, "batch": batch, "plain_seconds": m["plain"], "sdk_user_seconds": m["sdk-user"],
             "sdk_user_vs_plain": m["sdk-user"] / m["plain"], "sdk_base_vs_plain": m["sdk-base"] / m["plain"],
             "overridable_vs_plain": m["plain-overridable+fed"] / m["plain"] if "plain-overridable+fed" in m else None}
            for (level, batch), m in table.items()]
