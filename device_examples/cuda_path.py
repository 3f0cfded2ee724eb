"""The CUDA path: personalize with ``providers="cuda"`` and predict with the CUDA provider.

Device side: bitfit.sdk only (no torch). It needs an onnxruntime build with the CUDA
execution provider, e.g. ``onnxruntime-training`` 1.19.2 (CUDA 11.8, cuDNN 8, Linux
cp310/cp311), which replaces ``onnxruntime-training-cpu`` (both install the ``onnxruntime``
module).

Exit status:
    0   CUDA ran, and the GPU predictions match a CPU session fed the same delta within
        ``--tolerance`` (max absolute probability difference; default 1e-4: different
        kernels agree to ~1e-5, not bit-exactly).
    1   the GPU predictions differ from the CPU ones by more than the tolerance; or
        ``--require`` and this build has no CUDA provider; or an unexpected error (traceback).
    2   the bundle (or another bitfit input) was refused; the typed error is printed.
    77  skipped: this onnxruntime build has no ``CUDAExecutionProvider`` (the only reason to
        skip, checked before anything runs); the output starts with ``skipped: ``.

A build *with* the CUDA provider that then fails (no driver, wrong CUDA or cuDNN, out of
GPU memory) is an error, not a skip: the error propagates.

Usage:
    python device_examples/cuda_path.py BUNDLE [--store DIR] [--user U] [--tolerance T] [--require] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from typing import Any

import numpy as np

from bitfit.sdk import BitfitError, Bundle, Personalizer, Predictor
from bitfit.sdk.runtime import ort
from bitfit.sdk.trainer import cuda_available

from example_data import HABITS, probe_inputs, user_examples

EXIT_OK = 0
EXIT_FAILED = 1  # GPU and CPU disagree, or --require without the CUDA provider
EXIT_ERROR = 2  # a bitfit input (the bundle, ...) was refused
EXIT_SKIPPED = 77  # the usual "skipped" status of test drivers (automake, meson)
DEFAULT_TOLERANCE = 1e-4


def why_no_cuda() -> str | None:
    """Why this onnxruntime build cannot run on CUDA (it has no CUDA provider); None if it has one."""
    if cuda_available():
        return None
    return (f"this onnxruntime build ({ort.__version__}, providers {ort.get_available_providers()}) has no "
            "CUDAExecutionProvider; install onnxruntime-training==1.19.2 (CUDA 11.8) instead of onnxruntime-training-cpu")


def run(bundle: Bundle, store: str, user: str, *, habit: str, count: int, learning_rate: float) -> dict[str, Any]:
    """Train on the GPU, serve on the GPU, compare with the CPU."""
    gpu = Personalizer(bundle, store=store, providers="cuda")  # training and inference; refused without CUDA
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
        "providers": active, "version": r.version, "steps": r.steps, "train_seconds": round(r.seconds, 3),
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
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"largest GPU-vs-CPU probability difference accepted (default {DEFAULT_TOLERANCE:g})")
    parser.add_argument("--require", action="store_true",
                        help=f"exit {EXIT_FAILED} instead of skipping ({EXIT_SKIPPED}) when the build has no CUDA provider")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    args = parser.parse_args(argv)
    if not args.tolerance >= 0:
        parser.error(f"--tolerance must be a number >= 0, got {args.tolerance}")

    try:
        bundle = Bundle.open(args.bundle)  # a wrong path is an error everywhere, never a skip
    except BitfitError as err:
        print(f"cuda_path: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_ERROR
    why = why_no_cuda()
    if why is not None:
        if args.require:
            print(f"cuda_path: CUDA required (--require), but {why}", file=sys.stderr)
        else:
            print(f"skipped: {why}")
        if args.json:
            print(json.dumps({"status": "failed" if args.require else "skipped", "reason": why,
                              "providers": ort.get_available_providers()}))
        return EXIT_FAILED if args.require else EXIT_SKIPPED

    # From here on every failure is a failure: the build has CUDA, so it is expected to work.
    store = args.store or tempfile.mkdtemp(prefix="bitfit-cuda-")
    result = run(bundle, store, args.user, habit=args.habit, count=args.count, learning_rate=args.learning_rate)
    diff = result["gpu_vs_cpu_max_abs_diff"]
    agree = math.isfinite(diff) and diff <= args.tolerance
    result.update(status="ok" if agree else "failed", tolerance=args.tolerance)
    print(f"CUDA: trained {args.user!r} on the GPU (delta v{result['version']}, {result['steps']} steps in "
          f"{result['train_seconds']:.2f} s); inference providers {result['providers']}")
    print(f"  predictions {result['labels']} in {result['predict_ms']:.1f} ms; "
          f"GPU vs CPU max probability difference {diff:.1e} (tolerance {args.tolerance:.0e})")
    if not agree:
        print(f"cuda_path: FAILED: the GPU and CPU probabilities differ by {diff:.3g}, more than the tolerance "
              f"{args.tolerance:g}: the CUDA kernels do not reproduce the CPU result", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    return EXIT_OK if agree else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
