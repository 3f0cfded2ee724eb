"""Peak memory (RSS) of each method while it trains, each in its own fresh subprocess,
and of the SDK at import and after loading a bundle (torch blocked in those processes).

SDK methods: ``sdk-import`` (``import bitfit.sdk`` with its trainer and predictor),
``sdk-predict`` (``Predictor`` + ``logits``), ``sdk-train-portable`` (the portable
backend's session + ``train_step``) and ``sdk-train-ort-training`` (the onnxruntime-training
1.19.2 backend's). The SDK methods can also run under the device venv's Python (the newest
plain onnxruntime): :func:`peak_memory` takes ``device_python`` and ``device_methods``.

The driver (:func:`peak_memory`) runs this module as a worker:

    python -m benchmarks.memory --method sdk-train-portable --model minilm --bundle DIR --batch 8 --seq 128

and reads one JSON line from its stdout. Peaks are the process's RSS high-water mark
(``VmHWM`` in /proc/self/status), read after each stage, so a stage's value includes
everything before it. Not ``getrusage(RUSAGE_SELF).ru_maxrss``: on Linux that value
survives fork + exec, so a worker started by a big parent would report the parent's peak
(seen here: every worker "peaked" at the driver's RSS). ``ru_maxrss`` is recorded too,
for reference, where /proc is missing it is the only source.

Example:
    >>> from benchmarks.memory import METHODS, SDK_METHODS
    >>> [m for m in METHODS if m in SDK_METHODS]
    ['sdk-import', 'sdk-predict', 'sdk-train-portable', 'sdk-train-ort-training']
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

METHODS = ("sdk-import", "sdk-predict", "sdk-train-portable", "sdk-train-ort-training", "torch-bitfit", "torch-full",
           "torch-head")
SDK_METHODS = ("sdk-import", "sdk-predict", "sdk-train-portable", "sdk-train-ort-training")
TRAIN_BACKENDS = {"sdk-train-portable": "portable", "sdk-train-ort-training": "ort-training"}
IMPORT_ONLY = ("sdk-import",)
REPO_ROOT = Path(__file__).resolve().parent.parent


def _peak_mb() -> float:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return _ru_maxrss_mb()


def _ru_maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_mb() -> float:
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _synthetic_batch(args: Any) -> tuple[dict[str, Any], Any]:
    """The same seeded text batch for every method, so their memory is comparable."""
    import numpy as np

    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(1000 % args.vocab, args.vocab, (args.batch, args.seq)).astype(np.int64),
        "attention_mask": np.ones((args.batch, args.seq), np.int64),
        "token_type_ids": np.zeros((args.batch, args.seq), np.int64),
    }
    return feeds, rng.integers(0, 3, args.batch).astype(np.int64)


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    stages: dict[str, float] = {}
    if args.method in SDK_METHODS:
        from .environment import block_torch

        block_torch()
        import numpy as np

        import bitfit.sdk  # noqa: F401  (the measured import)
        import bitfit.sdk.predictor  # noqa: F401
        import bitfit.sdk.trainer  # noqa: F401
        from bitfit.sdk.runtime import ort

        stages["after_import"] = _peak_mb()
        result: dict[str, Any] = {"torch_imported": "torch" in sys.modules, "onnxruntime": ort.__version__,
                                  "python": ".".join(map(str, sys.version_info[:3]))}
        if args.method == "sdk-import":
            return {**result, "stages": stages, "peak_mb": _peak_mb(), "current_mb": _current_mb(),
                "ru_maxrss_mb": _ru_maxrss_mb()}
        from bitfit.sdk.bundle import Bundle

        bundle = Bundle.open(args.bundle, verify="sizes")
        feeds, labels = _synthetic_batch(args)
        if args.method == "sdk-predict":
            from bitfit.sdk.predictor import Predictor

            predictor = Predictor(bundle, threads=args.threads, providers="cpu")
            stages["after_load"] = _peak_mb()
            for _ in range(args.steps):
                predictor.logits(feeds, [None] * args.batch)
        else:
            from bitfit.sdk.trainer import open_training_session

            session = open_training_session(bundle, backend=TRAIN_BACKENDS[args.method], threads=args.threads,  # type: ignore[arg-type]
                                            learning_rate=1e-6)
            stages["after_load"] = _peak_mb()
            for _ in range(args.steps):
                session.train_step(feeds, labels)
        result["torch_imported"] = "torch" in sys.modules
        return {**result, "stages": stages, "peak_mb": _peak_mb(), "current_mb": _current_mb(),
                "ru_maxrss_mb": _ru_maxrss_mb()}

    import numpy as np
    import torch

    from .environment import set_torch_threads
    from .torch_recipes import TorchTrainer
    from .workspace import build_model

    set_torch_threads(args.threads)
    stages["after_import"] = _peak_mb()
    model = build_model(args.model)
    bias_names = None
    if args.bundle:
        manifest = json.loads((Path(args.bundle) / "manifest.json").read_text(encoding="utf-8"))
        bias_names = [t["name"] for t in manifest["trainable"]]
    trainer = TorchTrainer(model, args.method.removeprefix("torch-"), 1e-6, bias_names)  # type: ignore[arg-type]
    stages["after_load"] = _peak_mb()
    feeds, labels = _synthetic_batch(args)
    for _ in range(args.steps):
        trainer.step(feeds, labels)
    from bitfit.sdk.runtime import ort

    return {"torch_imported": True, "torch": torch.__version__, "onnxruntime": ort.__version__,
            "python": ".".join(map(str, sys.version_info[:3])), "stages": stages, "peak_mb": _peak_mb(),
            "current_mb": _current_mb(), "ru_maxrss_mb": _ru_maxrss_mb()}


def run_worker(method: str, *, model: str, bundle: str | os.PathLike, batch: int, seq: int, steps: int, threads: int,
               vocab: int, timeout: float = 900, python: str | os.PathLike | None = None,
               venv: str = "main") -> dict[str, Any]:
    """Run one measurement in a fresh interpreter (``python``, default this one) and return
    its JSON result, labelled with ``venv``."""
    cmd = [str(python or sys.executable), "-m", "benchmarks.memory", "--method", method, "--model", model, "--bundle", str(bundle),
           "--batch", str(batch), "--seq", str(seq), "--steps", str(steps), "--threads", str(threads),
           "--vocab", str(vocab)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker {method} ({venv} venv) failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    return {**json.loads(line), "method": method, "venv": venv, "batch": batch, "seq": seq, "steps": steps,
            "wall_seconds": time.perf_counter() - started}


def peak_memory(ws: Any, shapes: list[tuple[int, int]], *, steps: int, methods: tuple[str, ...] = METHODS,
                device_python: str | os.PathLike | None = None,
                device_methods: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Peak RSS of each method at each shape (import-only methods once), then of each
    ``device_methods`` entry under ``device_python`` (rows with ``venv`` "device")."""
    runs = [(m, None, "main") for m in methods]
    if device_python is not None:
        runs += [(m, device_python, "device") for m in device_methods]
    rows = []
    for method, python, venv in runs:
        for batch, seq in (shapes[:1] if method in IMPORT_ONLY else shapes):
            rows.append(run_worker(method, model=ws.model_name, bundle=ws.bundle.path, batch=batch, seq=seq,
                                   steps=steps, threads=ws.threads, vocab=ws.vocab_size, python=python, venv=venv))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--bundle", default="")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=30522)
    args = parser.parse_args(argv)
    print(json.dumps(_worker(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
