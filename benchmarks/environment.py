"""What the numbers were measured on: versions, CPU, threads, load; and the torch blocker
the SDK-side subprocesses install (the device side must run without torch).

Example:
    >>> from benchmarks.environment import available_cores
    >>> available_cores() >= 1
    True
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata
import os
import platform
import sys
from typing import Any


def available_cores() -> int:
    """Cores this process may run on (affinity), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The SIMD flags that decide which GEMM kernels torch and ORT pick."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "fma")
                    return [f for f in line.split(":", 1)[1].split() if f in wanted]
    except OSError:
        pass
    return []


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def describe(threads: int) -> dict[str, Any]:
    """Versions and machine facts for the report header."""
    return {
        "python": platform.python_version(),
        "torch": _version("torch"),
        "onnxruntime": _version("onnxruntime-training-cpu") if _version("onnxruntime-training-cpu") != "not installed"
        else _version("onnxruntime"),
        "numpy": _version("numpy"),
        "transformers": _version("transformers"),
        "onnx": _version("onnx"),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores_total": os.cpu_count(),
        "cores_available": available_cores(),
        "threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "load_average_start": load_average(),
    }


class _TorchBlocker(importlib.abc.MetaPathFinder):
    """Refuses ``import torch`` (and submodules) so a process proves it runs torch-free."""

    def find_spec(self, name, path=None, target=None):  # noqa: D401 - importlib protocol
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} is blocked: this benchmark process measures the torch-free device side")
        return None


def block_torch() -> None:
    """Make every later ``import torch`` fail in this process.

    Example:
        >>> import subprocess, sys
        >>> code = "from benchmarks.environment import block_torch; block_torch(); import torch"
        >>> subprocess.run([sys.executable, "-c", code], capture_output=True).returncode != 0
        True
    """
    if "torch" in sys.modules:
        raise RuntimeError("torch is already imported in this process; block it before any other import")
    sys.meta_path.insert(0, _TorchBlocker())


def set_torch_threads(threads: int) -> None:
    """Give torch the same intra-op thread count as the ORT sessions (one inter-op thread)."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (it can only be set once per process)
        pass
