"""The CUDA path: personalize with ``device="cuda"`` and predict with the CUDA provider.

Device side: bitfit.sdk only (no torch). It needs the CUDA build of ONNX Runtime training
(``onnxruntime-training`` 1.19.2: CUDA 11.8, cuDNN 8, Linux cp310/cp311), which replaces
``onnxruntime-training-cpu`` (both install the ``onnxruntime`` module). Without it, or
without a usable GPU, the script prints ``skipped: no CUDA ...`` and exits 0, so it can
run in every CI job; ``--require`` makes that exit 1 instead (for the GPU job).

When CUDA is there it trains one user on the GPU, checks the inference session really
runs on ``CUDAExecutionProvider``, and compares the GPU predictions with a CPU session
fed the same delta (they agree to ~1e-5, not bit-exactly: different kernels).

Usage:
    python device_examples/cuda_path.py BUNDLE [--store DIR] [--user U] [--require] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from typing import Any

import numpy as np

from bitfit.sdk import BitfitError, Bundle, Personalizer, Predictor
from bitfit.sdk.runtime import ort
from bitfit.sdk.trainer import cuda_available

from example_data import HABITS, probe_inputs, user_examples

EXIT_SKIPPED_REQUIRED = 1


def cuda_status() -> tuple[bool, str]:
    """(usable, why not): this build has the CUDA provider and a session can be created on it."""
    providers = ort.get_available_providers()
    if not cuda_available():
        return False, (f"this onnxruntime build ({ort.__version__}, providers {providers}) has no CUDAExecutionProvider; "
                       "install onnxruntime-training==1.19.2 (CUDA 11.8) instead of onnxruntime-training-cpu")
    return True, ""


def run(bundle: Bundle, store: str, user: str, *, habit: str, count: int, learning_rate: float) -> dict[str, Any]:
    """Train on the GPU, serve on the GPU, compare with the CPU."""
    gpu = Personalizer(bundle, store=store, device="cuda", providers=["CUDAExecutionProvider"])
    data = user_examples(gpu.bundle.manifest, habit, count, seed=1)
    r = gpu.personalize(data, user=user, learning_rate=learning_rate, progress_bar=False)
    predictor = Predictor(gpu.bundle, gpu.store, providers=["CUDAExecutionProvider"], strict_providers=True)
    active = predictor.session.get_providers()
    if "CUDAExecutionProvider" not in active:
        raise BitfitError(f"the inference session fell back to {active}: the GPU is not usable (driver, CUDA 11.8, cuDNN 8?)")
    probes = probe_inputs(gpu.bundle.manifest)
    t = time.perf_counter()
    on_gpu = predictor.predict(probes, user=user)
    gpu_ms = 1000 * (time.perf_counter() - t)
    on_cpu = Predictor(gpu.bundle, gpu.store, providers="cpu").predict(probes, user=user)
    return {
        "status": "ok", "providers": active, "version": r.version, "steps": r.steps, "train_seconds": round(r.seconds, 3),
        "accuracy_before": r.accuracy_before, "accuracy_after": r.accuracy_after, "predict_ms": round(gpu_ms, 2),
        "labels": on_gpu.labels, "gpu_vs_cpu_max_abs_diff": float(np.max(np.abs(on_gpu.probabilities - on_cpu.probabilities))),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--store", help="delta store directory (default: a fresh temporary directory)")
    parser.add_argument("--user", default="alice")
    parser.add_argument("--habit", default="optimist", choices=sorted(HABITS))
    parser.add_argument("--count", type=int, default=96)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--require", action="store_true", help="exit 1 instead of skipping when CUDA is unavailable")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    args = parser.parse_args(argv)

    try:
        bundle = Bundle.open(args.bundle)  # a wrong path is an error everywhere, not a skip
    except BitfitError as err:
        print(f"cuda_path: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    usable, why = cuda_status()
    if usable:
        store = args.store or tempfile.mkdtemp(prefix="bitfit-cuda-")
        try:
            result = run(bundle, store, args.user, habit=args.habit, count=args.count, learning_rate=args.learning_rate)
        except Exception as err:  # noqa: BLE001 - ORT's errors (Fail, EPFail, ...) share no narrower base
            # A CUDA provider in the build but no usable device (no driver, wrong CUDA): a skip, not a failure.
            usable, why = False, f"CUDA provider present but not usable here ({type(err).__name__}: {err})"
    if not usable:
        print(f"skipped: no CUDA ({why})")
        if args.json:
            print(json.dumps({"status": "skipped", "reason": why, "providers": ort.get_available_providers()}))
        return EXIT_SKIPPED_REQUIRED if args.require else 0
    print(f"CUDA: trained {args.user!r} on the GPU (delta v{result['version']}, {result['steps']} steps in "
          f"{result['train_seconds']:.2f} s); inference providers {result['providers']}")
    print(f"  predictions {result['labels']} in {result['predict_ms']:.1f} ms; "
          f"GPU vs CPU max probability difference {result['gpu_vs_cpu_max_abs_diff']:.1e}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
