"""The report's plots (matplotlib, Agg backend): step time and peak memory per method, and
holdout accuracy vs number of user examples per method.

Example:
    >>> from benchmarks.plots import plot_step_times
    >>> rows = [{"batch": 1, "seq": 32, "method": m, "median": 0.1, "q1": 0.09, "q3": 0.11}
    ...         for m in ("portable", "torch-full")]
    >>> import tempfile, pathlib
    >>> path = plot_step_times(rows, pathlib.Path(tempfile.mkdtemp()) / "s.png")
    >>> path.stat().st_size > 0
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_COLORS = {"portable": "#1f77b4", "sdk-train-portable": "#1f77b4", "sdk-bitfit": "#1f77b4",
           "device-portable": "#17becf", "sdk-train-portable (device)": "#17becf",
           "ort-training": "#9467bd", "sdk-train-ort-training": "#9467bd",
           "forward": "#aec7e8", "device-forward": "#9edae5", "sdk-predict": "#aec7e8", "sdk-predict (device)": "#9edae5",
           "sdk-import": "#c7d7ea", "sdk-import (device)": "#dbeef0", "torch-bitfit": "#ff7f0e", "torch-full": "#d62728",
           "torch-head": "#2ca02c", "base": "#7f7f7f"}


def _bars(ax: Any, groups: list[str], methods: list[str], values: dict[tuple[str, str], float],
          errors: dict[tuple[str, str], tuple[float, float]] | None = None) -> None:
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(groups))
    for i, method in enumerate(methods):
        heights = [values.get((g, method), np.nan) for g in groups]
        err = None
        if errors:
            low = [max(0.0, heights[j] - errors.get((g, method), (heights[j], heights[j]))[0]) for j, g in enumerate(groups)]
            high = [max(0.0, errors.get((g, method), (heights[j], heights[j]))[1] - heights[j]) for j, g in enumerate(groups)]
            err = [low, high]
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, heights, width, label=method, yerr=err,
               color=_COLORS.get(method), capsize=2)
    ax.set_xticks(x)
    ax.set_xticklabels(groups)
    ax.legend(fontsize=8)


def plot_step_times(rows: list[dict[str, Any]], path: Path) -> Path:
    """Median train-step time (with IQR) per method, grouped by batch x seq."""
    groups = list(dict.fromkeys(f"{r['batch']}x{r['seq']}" for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    values = {(f"{r['batch']}x{r['seq']}", r["method"]): r["median"] * 1e3 for r in rows}
    errors = {(f"{r['batch']}x{r['seq']}", r["method"]): (r["q1"] * 1e3, r["q3"] * 1e3) for r in rows}
    fig, ax = plt.subplots(figsize=(9, 4.5))
    _bars(ax, groups, methods, values, errors)
    ax.set_yscale("log")
    ax.set_xlabel("batch x sequence length")
    ax.set_ylabel("ms per step (median, IQR bars; log scale)")
    ax.set_title("Train step time per method")
    return _save(fig, path)


def plot_memory(rows: list[dict[str, Any]], path: Path) -> Path:
    """Peak RSS per method, grouped by batch x seq (import-only rows in their own group)."""
    def group(r: dict[str, Any]) -> str:
        return "import" if r["method"] == "sdk-import" else f"{r['batch']}x{r['seq']}"

    def label(r: dict[str, Any]) -> str:  # the device venv's rows are their own bars
        return r["method"] + (" (device)" if r.get("venv") == "device" else "")

    groups = list(dict.fromkeys(group(r) for r in rows))
    methods = list(dict.fromkeys(label(r) for r in rows))
    values = {(group(r), label(r)): r["peak_mb"] for r in rows}
    fig, ax = plt.subplots(figsize=(10, 4.5))
    _bars(ax, groups, methods, values)
    ax.set_ylabel("peak RSS (MB)")
    ax.set_xlabel("batch x sequence length")
    ax.set_title("Peak memory per method (each in its own process)")
    return _save(fig, path)


def plot_accuracy(rows: list[dict[str, Any]], path: Path) -> Path:
    """Holdout accuracy vs number of user examples, one panel per user plus the mean."""
    users = list(dict.fromkeys(r["user"] for r in rows))
    methods = ("base", "sdk-bitfit", "torch-full", "torch-head")
    panels = [*users, "mean over users"]
    cols = min(3, len(panels))
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.4 * rows_n), squeeze=False)
    sizes = sorted({r["size"] for r in rows})
    for ax, panel in zip(axes.flat, panels):
        part = rows if panel == "mean over users" else [r for r in rows if r["user"] == panel]
        for method in methods:
            ys = [np.mean([r[method] for r in part if r["size"] == n]) for n in sizes]
            ax.plot(sizes, ys, marker="o", label=method, color=_COLORS.get(method),
                    linestyle="--" if method == "base" else "-")
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("user examples")
        ax.set_ylabel("holdout accuracy")
        ax.set_xticks(sizes)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    """Lay out, write and close a figure (every plot here is saved the same way)."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
