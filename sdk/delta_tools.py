"""Look at deltas and do arithmetic with them: how far a user's biases moved, how two
deltas agree, and averages, weighted sums and differences of deltas of one base.

Everything here is numpy on ``Delta`` objects (``bitfit.sdk.delta``); the ``bitfit
deltas STORE inspect|compare|combine`` commands (``bitfit.sdk.cli_deltas``) print what
these functions return. A combined delta is an ordinary delta: save it to a store under
any name and serve it like a user's.

Example:
    >>> import numpy as np
    >>> from bitfit.sdk.delta import Delta
    >>> a = Delta({"layer.0.bias": np.array([3.0, 4.0])}, "sha256:00", encoding="fp32")
    >>> b = Delta({"layer.0.bias": np.array([1.0, 0.0])}, "sha256:00", encoding="fp32")
    >>> inspect_delta(a)["total"]["l2"]
    5.0
    >>> combine_deltas([a, b]).tensors["layer.0.bias"].tolist()
    [2.0, 2.0]
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .atomic_files import write_file_atomic
from .delta import Delta, Encoding
from .errors import DeltaMismatchError, InvalidArgumentError, MissingDependencyError

CombineMode = Literal["mean", "sum"]
OTHER_LAYER = "(no layer)"
# "encoder.layer.3.attention.self.query.bias" -> "encoder.layer.3"; "0.bias" -> "0";
# a split copy "x.bias.__copy2" counts with "x.bias".
_LAYER = re.compile(r"^(.*?(?:^|\.)\d+)(?:\.|$)")
_COPY = re.compile(r"\.__copy\d+$")
_WIDER = {"int8": 0, "fp16": 1, "fp32": 2}


def layer_of(name: str) -> str:
    """The layer a tensor belongs to: its name up to the first numeric part (``h.3``,
    ``encoder.layer.3``); the module path for names without one (``classifier``).

    Example:
        >>> layer_of("bert.encoder.layer.3.attention.self.query.bias"), layer_of("0.bias"), layer_of("classifier.bias")
        ('bert.encoder.layer.3', '0', 'classifier')
    """
    name = _COPY.sub("", name)
    match = _LAYER.match(name)
    if match:
        return match.group(1)
    return name.rpartition(".")[0] or OTHER_LAYER


def inspect_delta(delta: Delta, base: Mapping[str, np.ndarray] | None = None, *, top: int = 5) -> dict[str, Any]:
    """How far each trainable tensor and each layer moved: L2 norm, largest absolute
    change, and (with ``base``, the bundle's base values) the change relative to the base
    tensor's L2 norm. JSON-able.

    Args:
        delta: the delta to look at.
        base: name -> base value of the trainable tensors (``Bundle.trainable_base()``);
            without it only absolute sizes are reported (``relative`` is None).
        top: how many of the most-moved tensors to list under ``top`` (by relative change
            where the base is known, else by L2).

    Returns:
        ``{"base_fingerprint", "encoding", "created", "info", "tensors": [...],
        "layers": [...], "total": {...}, "top": [...]}``; each tensor row has name, shape,
        size, l2, max_abs, base_l2, relative; each layer row has layer, tensors, size,
        l2, max_abs, base_l2, relative.

    Raises:
        DeltaMismatchError: ``base`` lacks a tensor of the delta or has another shape.
        InvalidArgumentError: ``top`` is not an int >= 0.

    Example:
        >>> from bitfit.sdk.delta import Delta
        >>> d = Delta({"h.0.b": np.array([0.0, 1.0]), "h.1.b": np.array([0.1, 0.0])}, "sha256:00", encoding="fp32")
        >>> report = inspect_delta(d, {"h.0.b": np.array([2.0, 0.0]), "h.1.b": np.array([1.0, 0.0])})
        >>> [(row["layer"], round(row["relative"], 3)) for row in report["layers"]], report["top"][0]["name"]
        ([('h.0', 0.5), ('h.1', 0.1)], 'h.0.b')
    """
    if type(top) is not int or top < 0:
        raise InvalidArgumentError(f"top must be an int >= 0, got {top!r}")
    if base is not None:
        _check_base(delta, base)
    rows = []
    for name, value in delta.tensors.items():
        v = value.astype(np.float64).ravel()
        b = None if base is None else np.asarray(base[name], np.float64).ravel()
        base_l2 = None if b is None else float(np.linalg.norm(b))
        l2 = float(np.linalg.norm(v))
        rows.append({"name": name, "shape": list(value.shape), "size": int(v.size), "l2": l2,
                     "max_abs": float(np.abs(v).max()) if v.size else 0.0, "base_l2": base_l2,
                     "relative": _ratio(l2, base_l2)})
    layers: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        layers.setdefault(layer_of(row["name"]), []).append(row)
    layer_rows = [{"layer": layer, "tensors": len(members), **_pool(members, base is not None)}
                  for layer, members in sorted(layers.items(), key=lambda kv: _natural(kv[0]))]
    key = (lambda r: (r["relative"] if r["relative"] is not None else math.inf, r["l2"])) if base is not None else (lambda r: r["l2"])
    ranked = sorted(rows, key=key, reverse=True)[:top]
    return {
        "base_fingerprint": delta.base_fingerprint, "encoding": delta.encoding, "created": delta.created,
        "info": delta.info, "tensors": rows, "layers": layer_rows,
        "total": {"tensors": len(rows), **_pool(rows, base is not None)},
        "top": [{"name": r["name"], "l2": r["l2"], "max_abs": r["max_abs"], "relative": r["relative"]} for r in ranked],
    }


def compare_deltas(a: Delta, b: Delta) -> dict[str, Any]:
    """How alike two deltas of the same base are: cosine similarity per tensor, per layer
    and overall (None where either side is all zeros), and the L2 norm of ``a - b``.

    Raises:
        DeltaMismatchError: the deltas have other base fingerprints or tensor sets.

    Example:
        >>> from bitfit.sdk.delta import Delta
        >>> a = Delta({"h.0.b": np.array([1.0, 0.0]), "h.1.b": np.array([1.0, 1.0])}, "sha256:00", encoding="fp32")
        >>> b = Delta({"h.0.b": np.array([0.0, 1.0]), "h.1.b": np.array([2.0, 2.0])}, "sha256:00", encoding="fp32")
        >>> result = compare_deltas(a, b)
        >>> [(row["layer"], round(row["cosine"], 4)) for row in result["layers"]], round(result["overall"]["cosine"], 4)
        ([('h.0', 0.0), ('h.1', 1.0)], 0.7698)
    """
    _check_same_layout([a, b], "compare")
    rows = []
    for name in a.tensors:
        x, y = a.tensors[name].astype(np.float64).ravel(), b.tensors[name].astype(np.float64).ravel()
        rows.append({"name": name, "cosine": _cosine(x, y), "l2_a": float(np.linalg.norm(x)),
                     "l2_b": float(np.linalg.norm(y)), "l2_diff": float(np.linalg.norm(x - y))})
    groups: dict[str, list[str]] = {}
    for name in a.tensors:
        groups.setdefault(layer_of(name), []).append(name)
    layer_rows = []
    for layer, names in sorted(groups.items(), key=lambda kv: _natural(kv[0])):
        x, y = _flat(a, names), _flat(b, names)
        layer_rows.append({"layer": layer, "tensors": len(names), "cosine": _cosine(x, y),
                           "l2_a": float(np.linalg.norm(x)), "l2_b": float(np.linalg.norm(y)),
                           "l2_diff": float(np.linalg.norm(x - y))})
    x, y = _flat(a, list(a.tensors)), _flat(b, list(a.tensors))
    overall = {"cosine": _cosine(x, y), "l2_a": float(np.linalg.norm(x)), "l2_b": float(np.linalg.norm(y)),
               "l2_diff": float(np.linalg.norm(x - y))}
    return {"base_fingerprint": a.base_fingerprint, "tensors": rows, "layers": layer_rows, "overall": overall}


def combine_deltas(
    deltas: Sequence[Delta],
    weights: Sequence[float] | None = None,
    *,
    mode: CombineMode = "mean",
    encoding: Encoding | None = None,
    info: Mapping[str, Any] | None = None,
) -> Delta:
    """Average or weighted-sum deltas of one base (task arithmetic, multi-task merging).

    ``mode="mean"`` gives ``sum(w_i * d_i) / sum(w_i)`` (plain average without weights);
    ``mode="sum"`` gives ``sum(w_i * d_i)`` (weights default to 1: task addition).

    Args:
        deltas: two or more deltas with the same base fingerprint and tensor set.
        weights: one finite number per delta (for ``mean`` they must not sum to 0).
        mode: ``"mean"`` or ``"sum"``.
        encoding: of the result; None takes the most precise of the inputs'.
        info: extra facts for the result's info (it records the operation and weights).

    Raises:
        DeltaMismatchError: other bases, tensor names or shapes.
        InvalidArgumentError: fewer than one delta, a bad mode, weight count or value.

    Example:
        >>> from bitfit.sdk.delta import Delta
        >>> a = Delta({"b": np.array([1.0, 0.0])}, "sha256:00", encoding="fp32")
        >>> b = Delta({"b": np.array([0.0, 1.0])}, "sha256:00", encoding="fp32")
        >>> combine_deltas([a, b], [3, 1]).tensors["b"].tolist(), combine_deltas([a, b], mode="sum").tensors["b"].tolist()
        ([0.75, 0.25], [1.0, 1.0])
    """
    if mode not in ("mean", "sum"):
        raise InvalidArgumentError(f"mode must be 'mean' or 'sum', got {mode!r}")
    deltas = list(deltas)
    if not deltas or not all(isinstance(d, Delta) for d in deltas):
        raise InvalidArgumentError("combine needs one or more Delta objects (load them with DeltaStore.load)")
    if weights is None:
        weights = [1.0] * len(deltas)
    weights = list(weights)
    if len(weights) != len(deltas):
        raise InvalidArgumentError(f"got {len(weights)} weights for {len(deltas)} deltas: give one weight per delta")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise InvalidArgumentError(f"weights must be finite numbers, got {weights!r}")
    total = float(sum(weights))
    if mode == "mean" and total == 0:
        raise InvalidArgumentError("mean with weights that sum to 0 is undefined: use mode='sum' or other weights")
    _check_same_layout(deltas, "combine")
    scale = 1.0 / total if mode == "mean" else 1.0
    tensors = {name: sum(w * d.tensors[name].astype(np.float64) for w, d in zip(weights, deltas)) * scale
               for name in deltas[0].tensors}
    facts = {"operation": f"combine-{mode}", "weights": [float(w) for w in weights],
             "inputs": [_describe(d) for d in deltas], **dict(info or {})}
    return _delta_of(tensors, deltas, encoding, facts)


def subtract_deltas(a: Delta, b: Delta, *, encoding: Encoding | None = None,
                    info: Mapping[str, Any] | None = None) -> Delta:
    """``a - b``: the change from ``b`` to ``a`` as a delta of the same base (applied to
    the base it gives the base plus what ``a`` has beyond ``b``).

    Raises:
        DeltaMismatchError: other bases, tensor names or shapes.

    Example:
        >>> from bitfit.sdk.delta import Delta
        >>> a = Delta({"b": np.array([1.0, 2.0])}, "sha256:00", encoding="fp32")
        >>> b = Delta({"b": np.array([0.5, 2.0])}, "sha256:00", encoding="fp32")
        >>> subtract_deltas(a, b).tensors["b"].tolist()
        [0.5, 0.0]
    """
    _check_same_layout([a, b], "subtract")
    tensors = {name: a.tensors[name].astype(np.float64) - b.tensors[name].astype(np.float64) for name in a.tensors}
    facts = {"operation": "subtract", "inputs": [_describe(a), _describe(b)], **dict(info or {})}
    return _delta_of(tensors, [a, b], encoding, facts)


def format_inspection(report: Mapping[str, Any], *, title: str = "") -> str:
    """``inspect_delta``'s result as a table for a terminal (layers, then the top tensors).

    Example:
        >>> from bitfit.sdk.delta import Delta
        >>> d = Delta({"h.0.b": np.array([3.0, 4.0])}, "sha256:00", encoding="fp32")
        >>> print(format_inspection(inspect_delta(d), title="alice v1"))
        alice v1: 1 tensors, 2 values, fp32, base sha256:00
          L2 5, max |change| 4 (no bundle given: absolute sizes only)
        layer  tensors  values      L2  max|d|  relative
        h.0          1       2  5.0000  4.0000         -
        most moved:
          h.0.b  L2 5.0000  max|d| 4.0000
    """
    total = report["total"]
    head = f"{title + ': ' if title else ''}{total['tensors']} tensors, {total['size']:,} values, {report['encoding']}, base {report['base_fingerprint']}"
    rel = total["relative"]
    lines = [head, f"  L2 {total['l2']:.6g}, max |change| {total['max_abs']:.6g}"
             + (f", relative to the base {rel:.4g}" if rel is not None else
                (" (no bundle given: absolute sizes only)" if total["base_l2"] is None else ""))]
    table = [["layer", "tensors", "values", "L2", "max|d|", "relative"]]
    for row in report["layers"]:
        table.append([row["layer"], str(row["tensors"]), f"{row['size']:,}", f"{row['l2']:.4f}", f"{row['max_abs']:.4f}",
                      _fmt(row["relative"])])
    lines.extend(_table(table, right={1, 2, 3, 4, 5}))
    lines.append("most moved:")
    for row in report["top"]:
        lines.append(f"  {row['name']}  L2 {row['l2']:.4f}  max|d| {row['max_abs']:.4f}"
                     + (f"  relative {row['relative']:.4f}" if row["relative"] is not None else ""))
    return "\n".join(lines)


def format_comparison(result: Mapping[str, Any], *, title: str = "") -> str:
    """``compare_deltas``'s result as a table for a terminal.

    Example:
        >>> from bitfit.sdk.delta import Delta
        >>> a = Delta({"h.0.b": np.array([1.0, 0.0])}, "sha256:00", encoding="fp32")
        >>> print(format_comparison(compare_deltas(a, a), title="alice vs alice"))
        alice vs alice: cosine 1.0000, L2 of the difference 0.0000
        layer  tensors  cosine    L2 a    L2 b  L2 a-b
        h.0          1  1.0000  1.0000  1.0000  0.0000
    """
    overall = result["overall"]
    lines = [f"{title + ': ' if title else ''}cosine {_fmt(overall['cosine'])}, L2 of the difference {overall['l2_diff']:.4f}"]
    table = [["layer", "tensors", "cosine", "L2 a", "L2 b", "L2 a-b"]]
    for row in result["layers"]:
        table.append([row["layer"], str(row["tensors"]), _fmt(row["cosine"]), f"{row['l2_a']:.4f}", f"{row['l2_b']:.4f}",
                      f"{row['l2_diff']:.4f}"])
    lines.extend(_table(table, right={1, 2, 3, 4, 5}))
    return "\n".join(lines)


def plot_layers(reports: Mapping[str, Mapping[str, Any]], path: str | os.PathLike, *, value: str = "auto") -> Path:
    """Plot per-layer change to a PNG: bars for one delta, a heat map (layers x deltas)
    for several. Needs matplotlib (imported only here); written atomically.

    Args:
        reports: label (e.g. ``"alice v3"``) -> ``inspect_delta`` result.
        path: the image file to write.
        value: ``"l2"``, ``"relative"``, or ``"auto"`` (relative where every report has it).

    Raises:
        MissingDependencyError: matplotlib is not installed.
        InvalidArgumentError: no reports, or an unknown ``value``.

    Example:
        >>> import tempfile
        >>> from bitfit.sdk.delta import Delta
        >>> d = Delta({"h.0.b": np.array([3.0, 4.0]), "h.1.b": np.array([1.0, 0.0])}, "sha256:00", encoding="fp32")
        >>> plot_layers({"alice": inspect_delta(d)}, tempfile.mkdtemp() + "/alice.png").suffix
        '.png'
    """
    if not reports:
        raise InvalidArgumentError("plot_layers needs at least one inspect_delta report")
    if value not in ("auto", "l2", "relative"):
        raise InvalidArgumentError(f"value must be 'auto', 'l2' or 'relative', got {value!r}")
    if value == "auto":
        value = "relative" if all(r["total"]["relative"] is not None for r in reports.values()) else "l2"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise MissingDependencyError("plotting needs matplotlib: pip install matplotlib") from err
    layers = list(dict.fromkeys(row["layer"] for r in reports.values() for row in r["layers"]))
    grid = np.array([[next((row[value] or 0.0 for row in r["layers"] if row["layer"] == layer), np.nan) for layer in layers]
                     for r in reports.values()], dtype=np.float64)
    label = "L2 of the change" if value == "l2" else "change / base L2"
    if len(reports) == 1:
        fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(layers) + 2), 3.5))
        ax.bar(range(len(layers)), grid[0], color="#3b75af")
        ax.set_title(f"{next(iter(reports))}: per-layer change")
        ax.set_ylabel(label)
    else:
        fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(layers) + 3), 1.0 + 0.4 * len(reports)))
        image = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(reports)), list(reports))
        fig.colorbar(image, ax=ax, label=label)
        ax.set_title("per-layer change across deltas")
    ax.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    path = Path(path)
    write_file_atomic(path, buffer.getvalue())
    return path


# -- helpers -------------------------------------------------------------------------

def _check_base(delta: Delta, base: Mapping[str, np.ndarray]) -> None:
    missing = sorted(n for n in delta.tensors if n not in base)
    wrong = sorted(n for n in delta.tensors if n in base and np.shape(base[n]) != delta.tensors[n].shape)
    if missing or wrong:
        raise DeltaMismatchError(
            f"the base values do not fit the delta (missing {missing[:5]}, other shapes {wrong[:5]}): pass the bundle "
            "the delta was trained with")


def _check_same_layout(deltas: Sequence[Delta], what: str) -> None:
    first = deltas[0]
    for i, other in enumerate(deltas[1:], start=1):
        if other.base_fingerprint != first.base_fingerprint:
            raise DeltaMismatchError(
                f"cannot {what}: delta {i} was trained on base {other.base_fingerprint}, delta 0 on "
                f"{first.base_fingerprint}; only deltas of the same bundle can be combined")
        names_a, names_b = set(first.tensors), set(other.tensors)
        if names_a != names_b:
            raise DeltaMismatchError(
                f"cannot {what}: delta {i} has other tensors than delta 0 (only in 0: {sorted(names_a - names_b)[:5]}, "
                f"only in {i}: {sorted(names_b - names_a)[:5]}); use deltas personalized with the same bundle")
        wrong = [n for n in names_a if first.tensors[n].shape != other.tensors[n].shape]
        if wrong:
            raise DeltaMismatchError(f"cannot {what}: tensors {sorted(wrong)[:5]} differ in shape between delta 0 and "
                                     f"delta {i}; use deltas personalized with the same bundle")


def _delta_of(tensors: dict[str, np.ndarray], inputs: Sequence[Delta], encoding: Encoding | None,
              info: dict[str, Any]) -> Delta:
    encoding = encoding or max((d.encoding for d in inputs), key=lambda e: _WIDER[e])
    zeros = {n: np.zeros(v.shape, np.float32) for n, v in tensors.items()}
    return Delta.from_params({n: v.astype(np.float32) for n, v in tensors.items()}, zeros, inputs[0].base_fingerprint,
                             encoding=encoding, info=info)


def _describe(delta: Delta) -> dict[str, Any]:
    return {"created": delta.created, "encoding": delta.encoding,
            **{k: delta.info[k] for k in ("user", "version") if k in delta.info}}


def _pool(rows: list[dict[str, Any]], with_base: bool) -> dict[str, Any]:
    l2 = math.sqrt(sum(r["l2"] ** 2 for r in rows))
    base_l2 = math.sqrt(sum(r["base_l2"] ** 2 for r in rows)) if with_base else None
    return {"size": sum(r["size"] for r in rows), "l2": l2, "max_abs": max((r["max_abs"] for r in rows), default=0.0),
            "base_l2": base_l2, "relative": _ratio(l2, base_l2)}


def _ratio(value: float, base: float | None) -> float | None:
    return None if base is None or base == 0 else value / base


def _cosine(x: np.ndarray, y: np.ndarray) -> float | None:
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if nx == 0 or ny == 0:
        return None
    return float(np.clip(np.dot(x, y) / (nx * ny), -1.0, 1.0))


def _flat(delta: Delta, names: list[str]) -> np.ndarray:
    return np.concatenate([delta.tensors[n].astype(np.float64).ravel() for n in names]) if names else np.zeros(0)


def _natural(text: str) -> list[Any]:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]


__all__ = ["layer_of", "inspect_delta", "compare_deltas", "combine_deltas", "subtract_deltas", "format_inspection",
           "format_comparison", "plot_layers"]
