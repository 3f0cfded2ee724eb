"""The targets (met or not, with the measured value) and ``BENCHMARKS.md``, rendered from
the results dict that ``benchmarks.run`` collects. Every number in the report comes from
that dict; the prose only explains.

Example:
    >>> from benchmarks.report import evaluate_targets
    >>> [t.name.split(" [")[0] for t in evaluate_targets({})][:3]
    ['Portable step vs PyTorch BitFit step', 'Portable step vs PyTorch BitFit step', 'Portable step vs its own forward']
    >>> {t.met for t in evaluate_targets({})}
    {None}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Target:
    name: str
    goal: str
    value: str
    met: bool | None  # None: not measured in this run
    detail: str = ""


def _fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}f}"


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.1f}"


def _us(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e6:.1f}"


# Per-shape limits of the portable backend's step vs a PyTorch BitFit step (shapes not
# listed are reported, not judged).
PORTABLE_VS_TORCH_LIMITS = {(1, 32): 0.5, (8, 32): 0.6, (8, 128): 0.75, (32, 128): 0.9}
MEMORY_TARGET_SHAPE = (16, 64)


def _per_shape_target(name: str, goal: str, limit: float | dict[tuple[int, int], float], ratios: list[dict[str, Any]],
                      key: str) -> Target:
    """A target judged per shape: ``limit`` for every shape, or per (batch, seq) (others only reported)."""
    values = [(r["batch"], r["seq"], r[key]) for r in ratios if r.get(key) is not None]
    if not values:
        return Target(name, goal, "not measured", None)
    limits = {(b, s): (limit.get((b, s)) if isinstance(limit, dict) else limit) for b, s, _ in values}
    judged = [(b, s, v) for b, s, v in values if limits[(b, s)] is not None]
    met = [v <= limits[(b, s)] for b, s, v in judged]
    text = ", ".join(f"{b}x{s}: {v:.2f}x" + ("" if limits[(b, s)] is not None or not isinstance(limit, dict) else " (no target)")
                     for b, s, v in values)
    if not judged:
        return Target(name, goal, text + " (no shape with a target measured)", None)
    worst = max(v / limits[(b, s)] for b, s, v in judged)
    missed = [f"{b}x{s}" for (b, s, v), ok in zip(judged, met) if not ok]
    detail = f"met at {sum(met)} of {len(met)} shapes" + (f" (missed at {', '.join(missed)})" if missed else "")
    if isinstance(limit, dict):
        detail += f"; worst value / its limit {worst:.2f}"
    return Target(name, goal, text, all(met), detail)


def runtime_labels(results: dict[str, Any]) -> dict[str, str]:
    """``main`` / ``device`` -> "main venv, onnxruntime X" (which build measured what).

    Example:
        >>> runtime_labels({"environment": {"onnxruntime": "1.19.2"},
        ...                 "device": {"info": {"onnxruntime": "1.32.0", "python": "3.13.0"}}})["device"]
        'device venv, onnxruntime 1.32.0, Python 3.13.0'
    """
    env = results.get("environment") or {}
    info = (results.get("device") or {}).get("info") or {}
    return {"main": f"main venv, onnxruntime {env.get('onnxruntime', '?')} (training build)",
            "device": f"device venv, onnxruntime {info.get('onnxruntime', '?')}, Python {info.get('python', '?')}"}


def _memory_target(name: str, goal: str, limit: float, mem: list[dict[str, Any]], method: str, venv: str) -> Target:
    """``method`` (in ``venv``) vs torch full fine-tuning (main venv), judged at MEMORY_TARGET_SHAPE."""
    peaks = {(r["method"], r.get("venv", "main"), r["batch"], r["seq"]): r["peak_mb"] for r in mem}
    pairs = [(b, s, peaks[(m, v, b, s)], peaks[("torch-full", "main", b, s)]) for (m, v, b, s) in peaks
             if m == method and v == venv and ("torch-full", "main", b, s) in peaks]
    if not pairs:
        return Target(name, goal, "not measured", None)
    text = ", ".join(f"{b}x{s}: {p / f:.3f}x ({p:.0f} vs {f:.0f} MB)" for b, s, p, f in pairs)
    judged = [p / f for b, s, p, f in pairs if (b, s) == MEMORY_TARGET_SHAPE]
    if not judged:
        return Target(name, goal, f"{text} ({MEMORY_TARGET_SHAPE[0]}x{MEMORY_TARGET_SHAPE[1]} not measured)", None)
    return Target(name, goal, text, judged[0] <= limit,
                  f"judged at {MEMORY_TARGET_SHAPE[0]}x{MEMORY_TARGET_SHAPE[1]}; other shapes reported")


def _latency_target(name: str, lat_rows: list[dict[str, Any]]) -> Target:
    from .inference import latency_ratios

    lat = latency_ratios(lat_rows) if lat_rows else []
    at_all = [r for r in lat if r["level"] == "all"]
    if not at_all:
        return Target(name, "<= 1.02x", "not measured", None)
    met = [r["sdk_user_vs_plain"] <= 1.02 for r in at_all]
    text = ", ".join(f"batch {r['batch']}: {r['sdk_user_vs_plain']:.3f}x" for r in at_all)
    others = ", ".join(f"{r['level']}/b{r['batch']}: {r['sdk_user_vs_plain']:.2f}x" for r in lat if r["level"] != "all")
    return Target(name, "<= 1.02x", text, all(met), f"other levels: {others}" if others else "")


def _per_row_target(name: str, per_row: dict[str, Any] | None) -> Target:
    if not per_row:
        return Target(name, "<= 1.05x", "not measured", None)
    return Target(f"{name} (batch {per_row['batch']})", "<= 1.05x", f"{per_row['ratio']:.3f}x", per_row["ratio"] <= 1.05,
                  f"{per_row['users_in_batch']} users in one batch")


def evaluate_targets(results: dict[str, Any]) -> list[Target]:
    """The targets against this run's numbers (``met`` None: not measured in this run)."""
    from .personalization import backend_agreement
    from .step_time import step_ratios

    labels = runtime_labels(results)
    main, dev = f" [{labels['main']}]", f" [{labels['device']}]"
    targets = []
    step_rows = results.get("step_time") or []
    ratios = step_ratios(step_rows) if step_rows else []
    limit_text = "<= " + ", ".join(f"{v}x at {b}x{s}" for (b, s), v in PORTABLE_VS_TORCH_LIMITS.items())
    targets += [
        _per_shape_target("Portable step vs PyTorch BitFit step" + main, limit_text, PORTABLE_VS_TORCH_LIMITS, ratios,
                          "portable_vs_torch_bitfit"),
        _per_shape_target("Portable step vs PyTorch BitFit step" + dev, limit_text, PORTABLE_VS_TORCH_LIMITS, ratios,
                          "device_portable_vs_torch_bitfit"),
        _per_shape_target("Portable step vs its own forward" + main, "<= 2.2x", 2.2, ratios, "portable_vs_forward"),
        _per_shape_target("Portable step vs its own forward" + dev, "<= 2.2x", 2.2, ratios, "device_portable_vs_forward"),
        _per_shape_target("Portable step vs ORT-training step" + main, "<= 1.0x", 1.0, ratios, "portable_vs_ort_training"),
        _per_shape_target("Portable step vs ORT-training step" + dev, "<= 1.0x", 1.0, ratios,
                          "device_portable_vs_ort_training"),
        _per_shape_target("ORT-training step vs PyTorch BitFit step (old backend)" + main, "<= 0.6x", 0.6, ratios,
                          "ort_training_vs_torch_bitfit"),
        _per_shape_target("ORT-training step vs its forward (old backend)" + main, "<= 2.2x", 2.2, ratios,
                          "ort_training_vs_forward"),
    ]

    mem = results.get("memory") or []
    targets += [
        _memory_target("Peak RSS, portable training vs PyTorch full fine-tuning" + main, "<= 0.35x", 0.35, mem,
                       "sdk-train-portable", "main"),
        _memory_target("Peak RSS, portable training vs PyTorch full fine-tuning" + dev, "<= 0.35x", 0.35, mem,
                       "sdk-train-portable", "device"),
        _memory_target("Peak RSS, ORT-training vs PyTorch full fine-tuning (old backend)" + main, "<= 0.35x", 0.35, mem,
                       "sdk-train-ort-training", "main"),
    ]

    agreement = backend_agreement(results.get("personalization") or [])
    if agreement:
        rows = {(r["examples"], r["backend"]): r for r in results["personalization"]}
        checks = []
        for a in agreement:
            holdout = rows[(a["examples"], "portable")]["holdout_examples"] or 1
            checks.append(a["accuracy_after_diff"] <= 1.0 / holdout + 1e-9)
        text = ", ".join(f"{a['examples']} ex.: |diff| {a['accuracy_after_diff']:.3f}, time ratio "
                         f"{_fmt(a['seconds_ratio'])}x" for a in agreement)
        targets.append(Target("Personalize: holdout accuracy, portable vs ORT-training" + main,
                              "equal within noise (<= 1 holdout example)", text, all(checks),
                              "largest trained-value difference: " + ", ".join(
                                  f"{a['examples']} ex.: {a['max_trained_value_diff']:.1e}" for a in agreement
                                  if a["max_trained_value_diff"] is not None)))
    else:
        targets.append(Target("Personalize: holdout accuracy, portable vs ORT-training" + main, "equal within noise",
                              "not measured", None))

    inference = results.get("inference") or {}
    device_inf = inference.get("device") or {}
    targets.append(_latency_target("Inference with a user's delta vs plain ONNX (ORT_ENABLE_ALL)" + main,
                                   inference.get("latency") or []))
    targets.append(_latency_target("Inference with a user's delta vs plain ONNX (ORT_ENABLE_ALL)" + dev,
                                   device_inf.get("latency") or []))

    switch = inference.get("switch")
    if switch:
        lookup = switch["user_tensors_cached_alternating"]["median"]
        over = switch["switch_overhead_seconds"]
        same = switch["predict_same_user"]
        band = (same["q3"] - same["q1"])
        targets.append(Target("User switch (Predictor.user_tensors, cached user)" + main, "<= 50 us", f"{_us(lookup)} us",
                              lookup <= 50e-6,
                              f"batch-1 predict alternating users minus same user: {_us(over)} us per call "
                              f"(same-user call IQR {_us(band)} us)"))
    else:
        targets.append(Target("User switch" + main, "<= 50 us", "not measured", None))
    targets.append(_per_row_target("Per-row multi-user batch vs single-user batch" + main, inference.get("per_row")))
    targets.append(_per_row_target("Per-row multi-user batch vs single-user batch" + dev, device_inf.get("per_row")))

    quality = results.get("quality") or {}
    overall = next((s for s in quality.get("summary", []) if s["size"] == "all"), None)
    if overall and overall["bitfit_share_of_full_gain"] is not None:
        share = overall["bitfit_share_of_full_gain"]
        per_size = ", ".join(f"{s['size']} ex.: {_fmt(s['bitfit_share_of_full_gain'] and 100 * s['bitfit_share_of_full_gain'], 0)}%"
                             for s in quality["summary"] if s["size"] != "all")
        targets.append(Target("BitFit's share of the full fine-tuning gain", ">= 90%", f"{100 * share:.0f}%", share >= 0.9,
                              f"summed over {overall['users']} user/size runs; per size: {per_size}"))
    elif overall:
        targets.append(Target("BitFit's share of the full fine-tuning gain", ">= 90%", "full fine-tuning gained nothing", None))
    else:
        targets.append(Target("BitFit's share of the full fine-tuning gain", ">= 90%", "not measured", None))
    return targets


# -- markdown ----------------------------------------------------------------------

def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _status(met: bool | None) -> str:
    return {True: "**met**", False: "**not met**", None: "not measured"}[met]


def render(results: dict[str, Any], *, plots: dict[str, str]) -> str:
    """The whole BENCHMARKS.md text."""
    env = results["environment"]
    plan = results["plan"]
    out = [
        "# Benchmarks",
        "",
        f"Generated by `{results['command']}` on {results['finished']} ({results['mode']} mode, "
        f"{results['wall_seconds'] / 60:.1f} min wall time). Every number below was measured by that command in that run; "
        "ratios are taken between methods measured side by side (interleaved, round-robin) in the same process, "
        "as medians over repeats. Rerun it to refresh this file; `--quick` writes a smaller report to "
        "`benchmarks/_work/quick/` instead.",
        "",
        "**The machine is shared with other jobs** (load average at start "
        f"{_load(env.get('load_average_start'))}, at end {_load(results.get('load_average_end'))} on "
        f"{env['cores_available']} cores): absolute times are noisy, single samples varied widely; compare ratios and "
        "look at the IQR columns.",
        "",
        "## Environment",
        "",
        _table(["what", "value"], [
            ["model", f"{results['workspace']['model']} ({results['workspace']['parameters']:,} parameters), "
                      f"{results['workspace']['trainable_tensors']} trainable tensors / "
                      f"{results['workspace']['trainable_values']:,} values"],
            ["threads", f"{env['threads']} intra-op threads for ORT (inter-op 1) and torch (interop 1)"],
            ["cores", f"{env['cores_available']} available of {env['cores_total']}"],
            ["cpu", f"{env['cpu']} ({', '.join(env['cpu_flags'])})"],
            ["python", env["python"]], ["torch", env["torch"]],
            ["onnxruntime (main venv)", f"{env['onnxruntime']} (onnxruntime-training-cpu: ort-training backend, and the "
                                        "portable backend's `portable` columns)"],
            ["device venv", _device_line(results)],
            ["numpy", env["numpy"]], ["transformers", env["transformers"]], ["onnx", env["onnx"]],
            ["platform", env["platform"]], ["OMP_WAIT_POLICY", env["omp_wait_policy"]],
            ["data", results["workspace"]["corpus"]],
        ]),
        "",
        _methods_note(results),
        "",
        "## Targets",
        "",
    ]
    targets = evaluate_targets(results)
    out.append(_table(["target", "goal", "measured", "status", "detail"],
                      [[t.name, t.goal, t.value, _status(t.met), t.detail] for t in targets]))
    out += ["", _analysis(results, targets), ""]
    out += _section_steps(results, plots)
    out += _section_memory(results, plots)
    out += _section_personalize(results)
    out += _section_inference(results)
    out += _section_deltas(results)
    out += _section_quality(results, plots)
    out += _section_diagnostics(results)
    errors = results.get("errors") or {}
    if errors:
        out += ["## Sections that failed", ""]
        out += [f"- `{k}`: {v}" for k, v in errors.items()]
        out.append("")
    out += ["## Plan of this run", "", "```json", _json(plan), "```", ""]
    return "\n".join(out)


def _load_line(results: dict[str, Any], *names: str) -> str:
    """'Run time and 1-minute load average' line for a section (the machine is shared)."""
    parts = []
    for name in names:
        secs = (results.get("section_seconds") or {}).get(name)
        load = (results.get("section_load") or {}).get(name)
        if secs is not None and load and load[0] is not None:
            parts.append(f"`{name}` took {secs:.0f} s; 1-minute load average {load[0]:.1f} at its start, {load[1]:.1f} at its end")
    return ("_" + "; ".join(parts) + f" ({results['environment']['cores_available']} cores)._") if parts else ""


def _json(value: Any) -> str:
    import json

    return json.dumps(value, indent=1, default=str)


def _load(value: Any) -> str:
    return "n/a" if not value else "/".join(f"{x:.1f}" for x in value)


def _device_line(results: dict[str, Any]) -> str:
    dev = results.get("device") or {}
    info = dev.get("info")
    if not info:
        return f"not used: {dev.get('reason') or 'not measured'}"
    return (f"`{dev['python']}`: Python {info['python']}, plain onnxruntime {info['onnxruntime']}, numpy {info['numpy']}, "
            f"no torch (imported: {'yes' if info['torch_imported'] else 'no'}); the `device-*` columns and device rows")


def _methods_note(results: dict[str, Any]) -> str:
    labels = runtime_labels(results)
    return "\n".join([
        "How the methods are run:",
        "",
        "- **portable**: `open_training_session(bundle, backend=\"portable\").train_step`: the bundle's portable "
        "gradient model (`portable_gradient.onnx`: loss + bias gradients as a plain ONNX graph) and optimizer model, "
        f"run by `InferenceSession`. Measured twice: in the benchmark process ({labels['main']}) and by a torch-free "
        f"worker process ({labels['device']}); the worker times each call inside its process and is interleaved call by "
        "call with the benchmark process's methods, so its ratios to the torch step are taken between calls of the "
        "same rounds.",
        "- **ort-training**: the same call with `backend=\"ort-training\"` (onnxruntime-training 1.19.2's training "
        "API over the bundle's training artifacts).",
        "- **forward** (a step's \"own forward\"): one `InferenceSession.run` of the bundle's inference graph on the same "
        "batch, in the same onnxruntime as the step it is compared with (`forward` in the main venv, `device-forward` in "
        "the device venv).",
        "- **PyTorch BitFit**: the same torch model, every parameter frozen except the bundle's trainable biases; "
        "**full**: every parameter; **head-only**: `head.weight` and `head.bias`. All use `torch.optim.AdamW` with ORT's "
        "AdamW settings (betas 0.9/0.999, epsilon 1e-6 added the Hugging Face way, weight decay 0, bias correction), "
        "cross-entropy, and the model in eval mode (no dropout), as the bundle was exported.",
        "- **plain** inference: `torch.onnx.export(dynamo=False, opset 17)` of the same torch model, biases and weights "
        "as constants in the file; served by a plain `InferenceSession`.",
        "- Train-step batches hold `seq` real tokens per row (no padding); quality and personalization use real tweets "
        "padded per batch. Peak memory: each method in a fresh subprocess (`VmHWM`); the SDK processes block "
        "`import torch`.",
        "- torch's OpenMP threads are set to the passive wait policy (`OMP_WAIT_POLICY`, unless set by the caller): with "
        "ORT sessions in the same process on a loaded machine, actively spinning OpenMP threads made torch steps "
        "erratic, which would have flattered the SDK.",
    ])


def _analysis(results: dict[str, Any], targets: list[Target]) -> str:
    """Why each missed target was missed, from this run's diagnostics."""
    missed = [t for t in targets if t.met is False]
    if not missed:
        return "Every measured target was met in this run."
    lines = ["### Why the missed targets were missed (from this run's diagnostics)", ""]
    diag = results.get("diagnostics") or {}
    profiles = [p for p in diag.get("profiles") or [] if p.get("training") and p["training"].get("runs")]
    for t in missed:
        if t.name.startswith("Portable step"):
            key = "device_portable_profiles" if "device venv" in t.name else "portable_profiles"
            lines.append(f"- **{t.name}**: " + _portable_profile_text(diag.get(key) or []))
        elif t.name.startswith("ORT-training step vs its forward") and profiles:
            bits = []
            for p in profiles:
                tr, fw = p["training"], p["forward"]
                parts = tr["by_part_ms"]
                bits.append(
                    f"at {p['batch']}x{p['seq']} a train step runs {tr['nodes_per_run']} nodes in {tr['model_run_ms']:.0f} ms "
                    f"(forward nodes {parts.get('forward', 0):.0f} ms, gradient nodes {parts.get('backward', 0):.0f} ms, "
                    f"executor overhead outside kernels {tr['overhead_ms_per_run']:.0f} ms) against the inference graph's "
                    f"{fw['nodes_per_run']} nodes in {fw['model_run_ms']:.0f} ms ({fw['kernel_ms_per_run']:.0f} ms in kernels)")
            big = profiles[-1]
            back_top = [o for o in big["training"]["top_ops"] if o["part"] == "backward"][:4]
            back_text = ", ".join(f"{o['op']} {o['ms_per_run']:.0f} ms" for o in back_top)
            lines.append(
                f"- **{t.name}**: " + "; ".join(bits) + ". The train step does the forward again in the training graph, "
                "where it is slower than in the inference graph: the weights are inputs of the training session (no "
                "prepacked GEMM weights, no constant folding), the bias Adds are not fused (no BiasGelu), LayerNorm also "
                "writes its statistics. Then the backward adds the activation-gradient GEMMs (about as many FLOPs as the "
                f"forward) and slow element-wise gradient kernels ({back_text} at {big['batch']}x{big['seq']}). "
                f"`Optimizer.step` is {_ms(big['optimizer_step_seconds']['median'])} ms. At small batches the ~"
                f"{profiles[0]['training']['nodes_per_run']}-node training graph's per-node cost dominates. None of it is "
                "in bitfit's Python.")
        elif t.name.startswith("ORT-training step vs PyTorch BitFit") and profiles:
            small, big = profiles[0], profiles[-1]
            ops = big["training"].get("op_ms", {})
            pairs = [(f, g) for f, g in (("Gelu", "GeluGrad"), ("LayerNormalization", "LayerNormalizationGrad"),
                                         ("Softmax", "SoftmaxGrad_13")) if f"backward/{g}" in ops]
            pair_text = ", ".join(f"{g} {ops[f'backward/{g}']:.0f} ms vs {f} {ops.get(f'forward/{f}', 0):.0f} ms"
                                  for f, g in pairs)
            lines.append(
                f"- **{t.name}**: both sides do the same arithmetic (torch computes no weight gradients for frozen "
                f"weights either), so the ORT-training step wins only where torch eager's per-op overhead dominates (small batches: see "
                f"the per-shape values). At {small['batch']}x{small['seq']}, {small['training']['overhead_ms_per_run']:.0f} "
                f"ms of the {small['training']['model_run_ms']:.0f} ms ORT training run is executor overhead outside the "
                f"kernels of its {small['training']['nodes_per_run']} nodes. At {big['batch']}x{big['seq']} kernels "
                f"dominate: GEMMs (forward FusedMatMul {ops.get('forward/FusedMatMul', 0):.0f} ms, backward FusedMatMul "
                f"{ops.get('backward/FusedMatMul', 0):.0f} ms) run on weights that are graph inputs, so they cannot be "
                f"prepacked, and ORT's element-wise gradient kernels are far slower than their forward kernels "
                f"({pair_text}).")
        elif t.name.startswith("Peak RSS"):
            venv = "device" if "device venv" in t.name else "main"
            method = "sdk-train-portable" if "portable" in t.name else "sdk-train-ort-training"
            mem = {(r["method"], r.get("venv", "main"), r["batch"], r["seq"]): r for r in results.get("memory", [])}
            bits = []
            for (m, v, b, s_), r in mem.items():
                full = mem.get(("torch-full", "main", b, s_))
                if m != method or v != venv or not full:
                    continue
                bits.append(
                    f"at {b}x{s_} the SDK process peaked at {r['peak_mb']:.0f} MB: {r['stages']['after_import']:.0f} MB after "
                    f"import, {r['stages']['after_load']:.0f} MB after building the training session, so "
                    f"{r['peak_mb'] - r['stages']['after_load']:.0f} MB more during the steps (the activations ORT keeps "
                    f"for the backward pass); PyTorch full fine-tuning peaked at {full['peak_mb']:.0f} MB "
                    f"({full['stages']['after_load']:.0f} MB with the model loaded)")
            lines.append(f"- **{t.name}**: " + "; ".join(bits) + ". The SDK's fixed cost is the base weights held once by "
                         "ORT plus the runtime; what grows with batch x sequence is activation memory, which PyTorch needs "
                         "too, so the ratio rises with the batch.")
        elif t.name.startswith("Inference with a user's delta") and "device venv" in t.name:
            lines.append(f"- **{t.name}**: " + _device_inference_text(results))
        elif t.name.startswith("Inference with a user's delta"):
            rc = diag.get("rewrite_cost") or {}
            ops = diag.get("optimized_ops") or {}
            bits = []
            if rc.get("available"):
                bits.append("plain graph with 1-D overridable biases fed per call vs plain: " + ", ".join(
                    f"batch {r['batch']}: {r['vs_plain']:.3f}x" for r in rc["rows"] if r["method"] == "plain-overridable+fed")
                    + "; bundle's per-row graph fed: " + ", ".join(
                    f"batch {r['batch']}: {r['vs_plain']:.3f}x" for r in rc["rows"] if r["method"] == "bundle-per-row+fed"))
            if ops.get("differ"):
                bits.append("ops that differ after ORT_ENABLE_ALL (plain vs bundle): " + ", ".join(
                    f"{d['op']} {d['plain']} vs {d['bundle']}" for d in ops["differ"]))
            lines.append(f"- **{t.name}**: " + "; ".join(bits) + ". Structurally, the per-row rewrite puts every bias in "
                         "its own Add after an Unsqueeze, so ORT can neither fuse the feed-forward bias into BiasGelu nor "
                         "keep LayerNorm's bias inside the LayerNorm kernel: extra element-wise passes and nodes on every "
                         "run. Whether they cost more than this run's noise can be read from the IQR columns and the "
                         "rewrite-cost table under Diagnostics.")
        elif t.name.startswith("Personalize"):
            lines.append(f"- **{t.name}**: both backends run the same loss, gradients and AdamW update on the same "
                         "batches; a difference beyond one holdout example means they diverged (see the trained-value "
                         "difference in the detail column and the per-backend rows under Personalization).")
        elif t.name.startswith("Per-row"):
            inf = results.get("inference") or {}
            pr = ((inf.get("device") or {}) if "device venv" in t.name else inf).get("per_row") or {}
            lines.append(f"- **{t.name}**: a mixed batch feeds [batch, d] bias rows ({pr.get('users_in_batch')} users), built "
                         "by `np.concatenate` per tensor per call in `Predictor.logits`, and each bias Add then broadcasts a "
                         "[batch, 1, d] tensor instead of a [1, 1, d] one; compare the ratio with the IQR of the two "
                         "timings before blaming either.")
        elif t.name.startswith("BitFit's share"):
            lines.append(f"- **{t.name}**: see the quality tables below; with few examples and few epochs, full "
                         f"fine-tuning moves all {results['workspace']['parameters']:,} parameters, BitFit only "
                         f"{results['workspace']['trainable_values']:,} bias values.")
        elif t.name.startswith("User switch"):
            lines.append(f"- **{t.name}**: `Predictor.user_tensors` stats the user's HEAD file on every call to notice "
                         "new versions from other processes; that system call dominates the lookup.")
    return "\n".join(lines)


def _portable_profile_text(profiles: list[dict[str, Any]]) -> str:
    """What a portable step spends its time on, from ``benchmarks.profiles.profile_portable_step`` results."""
    profiles = [p for p in profiles if (p.get("gradient") or {}).get("runs")]
    if not profiles:
        return "no portable profile in this run."
    bits = []
    for p in profiles:
        g, o, f = p["gradient"], p["optimizer"], p["forward"]
        parts = g["by_part_ms"]
        bits.append(
            f"at {p['batch']}x{p['seq']} (onnxruntime {p['onnxruntime']}) the gradient model runs {g['nodes_per_run']} "
            f"nodes in {g['model_run_ms']:.1f} ms (its forward part {parts.get('forward', 0):.1f} ms, loss + backward "
            f"{parts.get('backward', 0):.1f} ms, executor overhead outside kernels {g['overhead_ms_per_run']:.1f} ms) and "
            f"the optimizer model {o['nodes_per_run']} nodes in {o['model_run_ms']:.1f} ms, against the inference graph's "
            f"{f['nodes_per_run']} nodes in {f['model_run_ms']:.1f} ms")
    big = profiles[-1]
    top = [x for x in big["gradient"]["top_ops"] if x["part"] == "backward"][:5]
    fwd = {x["op"]: x["ms_per_run"] for x in big["forward"]["top_ops"]}
    return ("; ".join(bits) + f". Top backward kernels at {big['batch']}x{big['seq']}: "
            + ", ".join(f"{x['op']} {x['ms_per_run']:.1f} ms ({x['nodes']} nodes)" for x in top)
            + f" (the inference graph's MatMul: {fwd.get('MatMul', 0):.1f} ms). A step is a forward plus an "
            "input-gradient backward (about the forward's GEMM work again), so 2x its forward is the floor; what is "
            "above it is the backward's element-wise gradient formulas and the optimizer run. Per-op tables: Diagnostics.")


def _device_inference_text(results: dict[str, Any]) -> str:
    prof = (results.get("diagnostics") or {}).get("device_inference_profile") or {}
    graphs = [(name, prof[name]) for name in ("plain", "plain-overridable+fed", "sdk-user") if prof.get(name)]
    if not graphs:
        return "no device inference profile in this run."
    ops = sorted({o["op"] for _, g in graphs for o in g["top_ops"]})
    per = {name: {k.split("/", 1)[1]: v for k, v in g["op_ms"].items()} for name, g in graphs}
    diffs = sorted(ops, key=lambda op: -abs(per.get("sdk-user", {}).get(op, 0) - per["plain"].get(op, 0)))[:5]
    return (f"ORT profile at batch {prof['batch']} x {prof['seq']} (`{prof['level']}`): "
            + ", ".join(f"{name} {g['model_run_ms']:.1f} ms in {g['nodes_per_run']} nodes" for name, g in graphs)
            + "; the op types that differ most between sdk-user and plain: "
            + ", ".join(f"{op} {per.get('sdk-user', {}).get(op, 0):.1f} vs {per['plain'].get(op, 0):.1f} ms" for op in diffs)
            + ". The overridable 1-D biases lose ORT's constant folding and bias fusions (BiasGelu, bias in "
            "LayerNorm/Attention) because their values are not constants; the per-row graph adds an Unsqueeze + Add per bias.")


def _section_steps(results: dict[str, Any], plots: dict[str, str]) -> list[str]:
    from .step_time import step_ratios

    rows = results.get("step_time")
    if not rows:
        return []
    labels = runtime_labels(results)
    shapes = list(dict.fromkeys((r["batch"], r["seq"]) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["batch"], r["seq"], r["method"]): r for r in rows}

    def cell(b: int, s: int, m: str) -> str:
        r = by.get((b, s, m))
        return "-" if r is None else f"{_ms(r['median'])} ({_ms(r['q1'])}-{_ms(r['q3'])})"

    versions = ", ".join(f"`{m}`: {v}" for m, v in dict.fromkeys(
        (r["method"], r.get("onnxruntime")) for r in rows if r.get("onnxruntime")))
    ratios = step_ratios(rows)
    device = any(r["device_portable_vs_torch_bitfit"] is not None for r in ratios)
    header = ["batch x seq", "portable / torch BitFit", "ort-training / torch BitFit", "portable / forward",
              "ort-training / forward", "portable / ort-training"]
    if device:
        header += ["device-portable / torch BitFit", "device-portable / device-forward", "device-portable / ort-training",
                   "device-forward / forward"]
    table = []
    for r in ratios:
        line = [f"{r['batch']}x{r['seq']}", _fmt(r["portable_vs_torch_bitfit"]), _fmt(r["ort_training_vs_torch_bitfit"]),
                _fmt(r["portable_vs_forward"]), _fmt(r["ort_training_vs_forward"]), _fmt(r["portable_vs_ort_training"])]
        if device:
            line += [_fmt(r["device_portable_vs_torch_bitfit"]), _fmt(r["device_portable_vs_forward"]),
                     _fmt(r["device_portable_vs_ort_training"]), _fmt(r["device_forward_vs_forward"])]
        table.append(line)
    limits = ", ".join(f"{v}x at {b}x{s}" for (b, s), v in PORTABLE_VS_TORCH_LIMITS.items())
    out = ["## Train step: both training backends", "", _load_line(results, "step_time"), "",
           f"Command: `{results['command']}`. Milliseconds per step, median (IQR) of {rows[0]['n']} interleaved repeats, "
           f"every method in every round. onnxruntime per column: {versions}. The `device-*` columns were timed inside the "
           f"device worker ({labels['device']}); all others in the benchmark process ({labels['main']}).", "",
           _table(["batch x seq", *methods], [[f"{b}x{s}", *[cell(b, s, m) for m in methods]] for b, s in shapes]), "",
           "Ratios of medians (lower is faster). Portable-backend targets: <= 2.2x its own forward at every shape; vs the "
           f"PyTorch BitFit step {limits}; never slower than the ort-training step. `forward` is the inference graph "
           "in the same onnxruntime as the step it divides.", "",
           _table(header, table), "",
           _table(["batch x seq", "portable / torch full", "portable / torch head-only", "torch BitFit / torch full"],
                  [[f"{r['batch']}x{r['seq']}", _fmt(r["portable_vs_torch_full"]), _fmt(r["portable_vs_torch_head"]),
                    _fmt(r["torch_bitfit_vs_full"])] for r in ratios]), ""]
    if plots.get("step_time"):
        out += [f"![train step time per method]({plots['step_time']})", ""]
    return out


def _section_memory(results: dict[str, Any], plots: dict[str, str]) -> list[str]:
    rows = results.get("memory")
    if not rows:
        return []
    labels = runtime_labels(results)
    out = ["## Peak memory (RSS)", "", _load_line(results, "memory"), "",
           f"Command: `{results['command']}`. Each row is a fresh process; `after import` / `after load` are the peak so "
           "far at that point (`VmHWM`). `sdk-import`: `import bitfit.sdk` with its trainer and predictor; "
           "`sdk-predict`: `Predictor` + `logits`; `sdk-train-portable` / `sdk-train-ort-training`: "
           "`open_training_session(backend=...)` + `train_step`; `torch-*`: the model, the recipe's AdamW and its steps. "
           f"venv `main`: {labels['main']}; `device`: {labels['device']}.", "",
           _table(["method", "venv", "onnxruntime", "batch x seq", "steps", "after import (MB)", "after load (MB)",
                   "peak (MB)", "torch imported"],
                  [[r["method"], r.get("venv", "main"), r.get("onnxruntime", "?"),
                    "-" if r["method"] == "sdk-import" else f"{r['batch']}x{r['seq']}",
                    "-" if r["method"] == "sdk-import" else r["steps"],
                    f"{r['stages'].get('after_import', float('nan')):.0f}",
                    f"{r['stages']['after_load']:.0f}" if "after_load" in r["stages"] else "-", f"{r['peak_mb']:.0f}",
                    "yes" if r["torch_imported"] else "no"] for r in rows]), ""]
    if plots.get("memory"):
        out += [f"![peak memory per method]({plots['memory']})", ""]
    return out


def _section_personalize(results: dict[str, Any]) -> list[str]:
    from .personalization import backend_agreement

    rows = results.get("personalization")
    if not rows:
        return []
    agreement = backend_agreement(rows)
    out = ["## Personalization wall time: both training backends", "", _load_line(results, "personalization"), "",
           f"Command: `{results['command']}`; {runtime_labels(results)['main']}. "
           f"`Personalizer(bundle, store, backend=...)` + `personalize(examples, epochs={rows[0]['epochs']})` with SDK "
           f"defaults (15% holdout, batch 16, early stopping) on real tweets of `{rows[0]['domain']}`, the same examples "
           "and seed for both backends, alternating backend call by call; the time includes constructing the "
           "Personalizer, building the training sessions, tokenizing, holdout evaluations and saving the delta. Median of "
           f"{rows[0]['n']} run(s) per backend.", "",
           _table(["examples", "backend", "seconds (median)", "min", "steps", "epochs run", "train / holdout", "s per step",
                   "stopped by", "holdout acc. before -> after", "holdout loss after", "delta bytes"],
                  [[r["examples"], r["backend"], f"{r['median']:.2f}", f"{r['min']:.2f}", r["steps"], r["epochs_run"],
                    f"{r['examples_used']} / {r['holdout_examples']}", f"{r['seconds_per_step']:.3f}", r["stopped_by"],
                    f"{_fmt(r['accuracy_before'])} -> {_fmt(r['accuracy_after'])}", _fmt(r.get("loss_after"), 4),
                    f"{r['delta_bytes']:,} ({r['encoding']})"] for r in rows]), ""]
    if agreement:
        out += [_table(["examples", "portable / ort-training seconds", "|accuracy after diff|",
                        "max |trained value diff| (from the saved deltas)"],
                       [[a["examples"], _fmt(a["seconds_ratio"]), f"{a['accuracy_after_diff']:.3f}",
                         "n/a" if a["max_trained_value_diff"] is None else f"{a['max_trained_value_diff']:.1e}"]
                        for a in agreement]), ""]
    return out


def _section_inference(results: dict[str, Any]) -> list[str]:
    from .inference import latency_ratios

    inf = results.get("inference")
    if not inf:
        return []
    rows = inf["latency"]
    by = {(r["level"], r["batch"], r["method"]): r for r in rows}
    table = []
    for r in latency_ratios(rows):
        lv, b = r["level"], r["batch"]
        table.append([lv, b, *[f"{_ms(by[(lv, b, m)]['median'])} ({_ms(by[(lv, b, m)]['q1'])}-{_ms(by[(lv, b, m)]['q3'])})"
                               for m in ("plain", "sdk-base", "sdk-user")],
                      f"{r['sdk_base_vs_plain']:.3f}", f"{r['sdk_user_vs_plain']:.3f}"])
    sw, pr, rb = inf["switch"], inf["per_row"], inf["rebuild"]
    out = ["## Inference", "", _load_line(results, "inference"), "",
           f"Sequence length {inf['seq']} (real tokens, no padding). `sdk-base`: `Predictor.logits` with no user; "
           f"`sdk-user`: with a cached user's delta (all {results['workspace']['trainable_tensors']} bias tensors fed). "
           "Milliseconds, median (IQR).", "",
           _table(["optimization level", "batch", "plain", "sdk-base", "sdk-user", "sdk-base / plain", "sdk-user / plain"], table),
           "", "### User switch", "",
           _table(["measurement", "median", "IQR"], [
               ["`Predictor.user_tensors`, same cached user (us/call)", _us(sw["user_tensors_cached_same"]["median"]),
                f"{_us(sw['user_tensors_cached_same']['q1'])}-{_us(sw['user_tensors_cached_same']['q3'])}"],
               ["`Predictor.user_tensors`, alternating two cached users (us/call)",
                _us(sw["user_tensors_cached_alternating"]["median"]),
                f"{_us(sw['user_tensors_cached_alternating']['q1'])}-{_us(sw['user_tensors_cached_alternating']['q3'])}"],
               [f"batch-1 predict, same user (ms/call, blocks of {sw['block']})", _ms(sw["predict_same_user"]["median"]),
                f"{_ms(sw['predict_same_user']['q1'])}-{_ms(sw['predict_same_user']['q3'])}"],
               ["batch-1 predict, alternating users (ms/call)", _ms(sw["predict_alternating_users"]["median"]),
                f"{_ms(sw['predict_alternating_users']['q1'])}-{_ms(sw['predict_alternating_users']['q3'])}"],
               ["switch overhead = alternating - same (us/call)", _us(sw["switch_overhead_seconds"]), ""],
           ]),
           "", "### Per-row multi-user batch", "",
           _table(["batch", "users in batch", "single-user batch (ms)", "per-row batch (ms)", "ratio",
                   "per-row vs row-by-row max |diff|"],
                  [[pr["batch"], pr["users_in_batch"], _ms(pr["single_user"]["median"]), _ms(pr["per_row"]["median"]),
                    f"{pr['ratio']:.3f}", f"{pr['per_row_vs_row_by_row_max_abs_diff']:.1e}"]]),
           "", "### A session per user instead", "",
           _table(["batch 1", "median (ms)", "IQR (ms)"], [
               ["new InferenceSession with the user's biases (add_initializer) + run", _ms(rb["rebuild_and_run"]["median"]),
                f"{_ms(rb['rebuild_and_run']['q1'])}-{_ms(rb['rebuild_and_run']['q3'])}"],
               ["SDK: switch user + run", _ms(rb["switch_and_run"]["median"]),
                f"{_ms(rb['switch_and_run']['q1'])}-{_ms(rb['switch_and_run']['q3'])}"],
               ["ratio", f"{rb['ratio']:.0f}x", ""]]), ""]
    out += _section_device_inference(results)
    return out


def _section_device_inference(results: dict[str, Any]) -> list[str]:
    from .inference import latency_ratios

    dev = (results.get("inference") or {}).get("device")
    if not dev:
        return []
    rows = dev["latency"]
    by = {(r["level"], r["batch"], r["method"]): r for r in rows}
    methods = [m for m in ("plain", "plain-overridable+fed", "sdk-base", "sdk-user") if any(k[2] == m for k in by)]
    table = []
    for r in latency_ratios(rows):
        lv, b = r["level"], r["batch"]
        table.append([lv, b, *[f"{_ms(by[(lv, b, m)]['median'])} ({_ms(by[(lv, b, m)]['q1'])}-{_ms(by[(lv, b, m)]['q3'])})"
                               for m in methods],
                      f"{r['sdk_user_vs_plain']:.3f}", _fmt(r["overridable_vs_plain"], 3)])
    pr = dev["per_row"]
    return ["### On the newest plain onnxruntime (device venv)", "",
            f"Command: `{results['command']}`; measured by the device worker ({runtime_labels(results)['device']}), "
            "the same models, store and batches as above. `plain-overridable+fed`: the plain model with its "
            f"{results['workspace']['trainable_tensors']} bias constants turned into overridable graph inputs (initializers "
            "that are also inputs), fed a user's 1-D biases every call: the +14% at ORT_ENABLE_ALL reported for ORT 1.31 in "
            "../shared/ORT_TRAINING_NOTES.md is its last column. Milliseconds, median (IQR).", "",
            _table(["optimization level", "batch", *methods, "sdk-user / plain", "plain-overridable+fed / plain"], table),
            "",
            _table(["batch", "users in batch", "single-user batch (ms)", "per-row batch (ms)", "ratio",
                    "per-row vs row-by-row max |diff|"],
                   [[pr["batch"], pr["users_in_batch"], _ms(pr["single_user"]["median"]), _ms(pr["per_row"]["median"]),
                     f"{pr['ratio']:.3f}", f"{pr['per_row_vs_row_by_row_max_abs_diff']:.1e}"]]), ""]


def _section_deltas(results: dict[str, Any]) -> list[str]:
    d = results.get("deltas")
    if not d:
        return []
    files = ", ".join(f"{k} {v:,}" for k, v in d["bundle_files"].items())
    return ["## Delta size and bundle size", "", _load_line(results, "deltas"), "",
            f"One delta trained on {d['train_examples']} `{d['domain']}` tweets ({d['epochs']} epochs, lr {d['learning_rate']:g}, "
            f"{d['train_seconds']:.1f} s), re-encoded; accuracy on {d['holdout_examples']} held-out tweets of that user "
            f"(base model: {_fmt(d['base_accuracy'], 3)}).", "",
            _table(["encoding", "bytes on disk", "payload bytes", "holdout accuracy", "agreement with fp32",
                    "max |logit diff| vs fp32", "max |value error| vs fp32"],
                   [[r["encoding"], f"{r['bytes_on_disk']:,}", f"{r['payload_bytes']:,}", f"{r['accuracy']:.3f}",
                     f"{r['agreement_with_fp32']:.3f}", f"{r['max_abs_logit_diff_vs_fp32']:.1e}",
                     f"{r['max_abs_value_error_vs_fp32']:.1e}"] for r in d["encodings"]]), "",
            _table(["what", "bytes"], [
                ["bundle on disk (all files + manifest)", f"{d['bundle_bytes']:,}"],
                ["of which weights.safetensors (every base tensor once)", f"{d['weights_bytes']:,}"],
                ["base model parameters in torch (fp32)", f"{d['torch_parameter_bytes']:,}"],
                ["plain ONNX export (weights inline)", f"{d['plain_onnx_bytes']:,}"],
                ["bundle / torch parameters", f"{d['bundle_bytes'] / d['torch_parameter_bytes']:.3f}x"],
            ]), "", f"Bundle files: {files}.", "",
            f"Trainable: {d['trainable_tensors']} tensors, {d['trainable_values']:,} of {d['total_values']:,} values.", ""]


def _section_quality(results: dict[str, Any], plots: dict[str, str]) -> list[str]:
    q = results.get("quality")
    if not q:
        return []
    out = ["## Quality on real data", "", _load_line(results, "tuning", "quality"), ""]
    tune = results.get("tuning")
    if tune:
        out += [f"Learning rates chosen per method on a separate development user `{tune['domain']}` "
                f"({tune['examples']} examples, {tune['epochs']} epochs, holdout {tune['holdout']}, base "
                f"{tune['base_accuracy']:.3f}):", "",
                _table(["method", "learning rate", "dev accuracy"],
                       [[r["method"], f"{r['learning_rate']:g}", f"{r['accuracy']:.3f}"] for r in tune["rows"]]), "",
                "Chosen: " + ", ".join(f"{k} {v:g}" for k, v in tune["chosen"].items()) + ".", ""]
    else:
        out += ["Learning rates: " + ", ".join(f"{k} {v:g}" for k, v in q["learning_rates"].items())
                + " (fixed; no tuning in this mode).", ""]
    out += [f"Each method trains {q['epochs']} epochs at batch {q['batch_size']} on the same examples in the same order; "
            f"holdout: {q['holdout_size']} tweets per user. Base: MiniLM + a head trained on cached embeddings of a general "
            "slice of other domains (the bundle's base).", "",
            _table(["user", "examples", "base", "SDK BitFit", "torch full FT", "torch head-only",
                    "BitFit share of full gain", "seconds BitFit / full / head"],
                   [[r["user"], r["examples"], f"{r['base']:.3f}", f"{r['sdk-bitfit']:.3f}", f"{r['torch-full']:.3f}",
                     f"{r['torch-head']:.3f}", _share(r), f"{r['sdk-bitfit_seconds']:.1f} / {r['torch-full_seconds']:.1f} / "
                     f"{r['torch-head_seconds']:.1f}"] for r in q["rows"]]), "",
            "Mean over users; the share is computed from summed gains, (sum BitFit - base) / (sum full - base):", "",
            _table(["examples", "base", "SDK BitFit", "torch full FT", "torch head-only", "BitFit share of full gain",
                    "head-only share"],
                   [[s["size"], f"{s['base']:.3f}", f"{s['sdk-bitfit']:.3f}", f"{s['torch-full']:.3f}", f"{s['torch-head']:.3f}",
                     _pct(s["bitfit_share_of_full_gain"]), _pct(s["head_share_of_full_gain"])] for s in q["summary"]]), ""]
    if plots.get("accuracy"):
        out += [f"![accuracy vs user examples]({plots['accuracy']})", ""]
    return out


def _share(row: dict[str, Any]) -> str:
    from .quality_sizes import gain_fraction

    return _pct(gain_fraction(row["sdk-bitfit"], row["torch-full"], row["base"]))


def _pct(x: float | None) -> str:
    return "n/a (no full-FT gain)" if x is None else f"{100 * x:.0f}%"


def _portable_profile_tables(profiles: list[dict[str, Any]], label: str) -> list[str]:
    profiles = [p for p in profiles if (p.get("gradient") or {}).get("runs")]
    if not profiles:
        return []
    rows = []
    for p in profiles:
        for graph, prof in (("portable gradient", p["gradient"]), ("portable optimizer", p["optimizer"]),
                            ("inference", p["forward"])):
            parts = prof["by_part_ms"]
            rows.append([f"{p['batch']}x{p['seq']}", graph, prof["nodes_per_run"], f"{prof['model_run_ms']:.1f}",
                         f"{prof['kernel_ms_per_run']:.1f}", f"{prof['overhead_ms_per_run']:.1f}",
                         f"{parts.get('forward', 0):.1f}" if graph != "portable optimizer" else "-",
                         f"{parts.get('backward', 0):.1f}" if graph == "portable gradient" else "-"])
    big = profiles[-1]
    return [f"ORT profiles of the portable step ({label}): the gradient model and the optimizer model, each its own "
            "`InferenceSession` with the SDK's options (ORT_ENABLE_ALL), and the inference graph on the same batch; per "
            "run, first run excluded. Gradient-model nodes named `bitfit.grad/...` (the loss and the backward that "
            "`export/gradient_graph.py` wrote; fused nodes keep their first node's name) count as backward.", "",
            _table(["batch x seq", "graph", "nodes", "run ms", "kernel ms", "overhead ms", "forward nodes ms",
                    "loss + backward nodes ms"], rows), "",
            f"Top kernels of the portable gradient model at {big['batch']}x{big['seq']} ({label}):", "",
            _table(["part", "op", "ms per run", "nodes"],
                   [[o["part"], o["op"], f"{o['ms_per_run']:.1f}", o["nodes"]] for o in big["gradient"]["top_ops"]]), ""]


def _section_diagnostics(results: dict[str, Any]) -> list[str]:
    diag = results.get("diagnostics")
    if not diag:
        return []
    out = ["## Diagnostics", "", _load_line(results, "diagnostics"), ""]
    profiles = [p for p in diag.get("profiles") or [] if p.get("training") and p["training"].get("runs")]
    if profiles:
        rows = []
        for p in profiles:
            for graph, prof in (("training", p["training"]), ("inference", p["forward"])):
                parts = prof["by_part_ms"]
                rows.append([f"{p['batch']}x{p['seq']}", graph, prof["nodes_per_run"], f"{prof['model_run_ms']:.1f}",
                             f"{prof['kernel_ms_per_run']:.1f}", f"{prof['overhead_ms_per_run']:.1f}",
                             f"{parts.get('forward', 0):.1f}", f"{parts.get('backward', 0):.1f}" if graph == "training" else "-",
                             f"{parts.get('optimizer', 0):.1f}" if graph == "training" else "-"])
        out += ["ORT profiles (`SessionOptions.enable_profiling`) of the ort-training backend's training graph (one `Module.__call__`: "
                "forward + backward) and of the bundle's inference graph on the same batch, per run, first run excluded. "
                "`overhead` = run wall time minus time inside kernels.", "",
                _table(["batch x seq", "graph", "nodes", "run ms", "kernel ms", "overhead ms", "forward nodes ms",
                        "backward nodes ms", "grad. accumulation ms"], rows), "",
                "Wall time of the SDK step's two calls: " + "; ".join(
                    f"{p['batch']}x{p['seq']}: `Module.__call__` {_ms(p['module_call_seconds']['median'])} ms, "
                    f"`Optimizer.step` + `lazy_reset_grad` {_ms(p['optimizer_step_seconds']['median'])} ms" for p in profiles)
                + ".", ""]
        big = profiles[-1]
        out += [f"Top kernels of the train step at {big['batch']}x{big['seq']}:", "",
                _table(["part", "op", "ms per run", "nodes"],
                       [[o["part"], o["op"], f"{o['ms_per_run']:.1f}", o["nodes"]] for o in big["training"]["top_ops"]]),
                "", f"Top kernels of the inference graph at {big['batch']}x{big['seq']}:", "",
                _table(["op", "ms per run", "nodes"],
                       [[o["op"], f"{o['ms_per_run']:.1f}", o["nodes"]] for o in big["forward"]["top_ops"]]), ""]
    out += _portable_profile_tables(diag.get("portable_profiles") or [], runtime_labels(results)["main"])
    out += _portable_profile_tables(diag.get("device_portable_profiles") or [], runtime_labels(results)["device"])
    prof = diag.get("device_inference_profile") or {}
    graphs = [(n, prof[n]) for n in ("plain", "plain-overridable+fed", "sdk-user") if prof.get(n)]
    if graphs:
        ops = sorted({k.split("/", 1)[1] for _, g in graphs for k in g["op_ms"]},
                     key=lambda op: -max(g["op_ms"].get(f"forward/{op}", 0) for _, g in graphs))[:12]
        out += [f"ORT profile of inference on the device venv ({runtime_labels(results)['device']}), batch {prof['batch']} x "
                f"{prof['seq']}, `{prof['level']}`, ms per run by op type:", "",
                _table(["op", *[n for n, _ in graphs]],
                       [[op, *[f"{g['op_ms'].get(f'forward/{op}', 0):.2f}" for _, g in graphs]] for op in ops]
                       + [["(run wall time / nodes)", *[f"{g['model_run_ms']:.1f} / {g['nodes_per_run']}" for _, g in graphs]]]),
                ""]
    ops = diag.get("optimized_ops")
    if ops:
        out += [f"Ops after `{ops['level']}` optimization that differ between the plain and the bundle inference graphs "
                f"({ops['plain_nodes']} vs {ops['bundle_nodes']} nodes):", "",
                _table(["op", "plain", "bundle"], [[d["op"], d["plain"], d["bundle"]] for d in ops["differ"]]), ""]
    rc = diag.get("rewrite_cost")
    if rc and rc.get("available"):
        out += [f"Cost of the per-row rewrite vs the cost of overridable biases (`{rc['level']}`): the plain graph with its "
                f"{results['workspace']['trainable_tensors']} bias constants turned into overridable 1-D inputs, fed every "
                "call, vs the bundle's per-row graph fed "
                "[1, d] rows.", "",
                _table(["batch", "method", "ms (median)", "IQR", "vs plain"],
                       [[r["batch"], r["method"], _ms(r["median"]), f"{_ms(r['q1'])}-{_ms(r['q3'])}", f"{r['vs_plain']:.3f}"]
                        for r in rc["rows"]]), ""]
    return out
