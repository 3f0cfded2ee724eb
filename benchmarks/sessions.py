"""ONNX Runtime session options shared by every measurement: the same intra-op thread
count as torch, one inter-op thread, and a named graph optimization level.

Example:
    >>> from benchmarks.sessions import LEVELS, session_options
    >>> options = session_options(2, "basic")
    >>> options.intra_op_num_threads, str(options.graph_optimization_level).split(".")[-1]
    (2, 'ORT_ENABLE_BASIC')
"""

from __future__ import annotations

from typing import Any

from bitfit.sdk.runtime import ort

LEVELS = ("disabled", "basic", "extended", "all")
_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(threads: int, level: str = "all") -> Any:
    """``SessionOptions`` with ``threads`` intra-op threads and the optimization ``level``."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = _LEVELS[level]
    return options
