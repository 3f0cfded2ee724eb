"""``python -m benchmarks.run [--quick]``: run every benchmark on the MiniLM bundle and write
``BENCHMARKS.md`` and the plots under ``benchmarks/``.

The full run is planned to finish in < 45 minutes on 2 idle cores; ``--quick`` (a few
minutes: fewer shapes, repeats, users) writes its report to ``benchmarks/_work/quick/``
so it never replaces the full report. Scratch files (bundle, plain ONNX, profiles,
results.json) go to ``benchmarks/_work/`` (git-ignored).

Example:
    >>> from benchmarks.run import full_plan, quick_plan
    >>> quick_plan().step_shapes, full_plan().step_shapes[-1]
    ([(1, 32), (8, 32)], (32, 128))
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent


@dataclass
class Plan:
    """What one run measures; ``full_plan`` / ``quick_plan`` / ``tiny_plan`` fill it."""

    model: str = "minilm"
    users: list[str] = field(default_factory=lambda: ["self-driving-cars", "festival", "apple", "airline:united"])
    dev_user: str | None = "airline:jetblue"
    general_size: int = 1500  # the demo's general slice: 500 tweets per label
    step_shapes: list[tuple[int, int]] = field(default_factory=lambda: [(1, 32), (8, 32), (32, 32), (1, 128), (8, 128), (32, 128)])
    step_repeats: int = 9
    step_warmup: int = 2
    memory_shapes: list[tuple[int, int]] = field(default_factory=lambda: [(16, 64), (32, 128)])
    memory_steps: int = 3
    memory_methods: tuple[str, ...] = ("sdk-import", "sdk-predict", "sdk-train-portable", "sdk-train-ort-training",
                                       "torch-bitfit", "torch-full", "torch-head")
    # Measured again under the device venv's Python (the newest plain onnxruntime), when it exists.
    memory_device_methods: tuple[str, ...] = ("sdk-import", "sdk-predict", "sdk-train-portable")
    # Use the device venv (.venv-device) for the device-side measurements when it exists.
    device: bool = True
    personalize_sizes: list[int] = field(default_factory=lambda: [100, 200, 500])
    personalize_repeats: int = 2
    personalize_epochs: int = 3
    inference_levels: tuple[str, ...] = ("disabled", "basic", "extended", "all")
    inference_batches: tuple[int, ...] = (1, 32)
    inference_seq: int = 64
    inference_repeats: dict[int, int] = field(default_factory=lambda: {1: 40, 32: 9})
    switch_repeats: int = 9
    per_row_repeats: int = 9
    rebuild_repeats: int = 4
    delta_train: int = 200
    delta_holdout: int = 400
    quality_sizes: list[int] = field(default_factory=lambda: [50, 100, 200])
    quality_holdout: int = 400
    quality_epochs: int = 5
    tune: bool = True
    tune_examples: int = 100
    tune_holdout: int = 300
    profile_shapes: list[tuple[int, int]] = field(default_factory=lambda: [(1, 32), (8, 128)])
    max_length: int = 64  # the demo's (demo.base_model.MAX_LENGTH): the same base model


def full_plan() -> Plan:
    return Plan()


def quick_plan() -> Plan:
    return Plan(
        users=["self-driving-cars", "festival"], general_size=600,
        step_shapes=[(1, 32), (8, 32)], step_repeats=3, step_warmup=1,
        memory_shapes=[(16, 64)], memory_steps=2, memory_device_methods=("sdk-import", "sdk-train-portable"),
        personalize_sizes=[100], personalize_repeats=1,
        inference_levels=("basic", "all"), inference_repeats={1: 10, 32: 3}, switch_repeats=3, per_row_repeats=3,
        rebuild_repeats=2, delta_train=100, delta_holdout=150,
        quality_sizes=[50, 100], quality_holdout=150, quality_epochs=3, tune=False,
        profile_shapes=[(1, 32), (8, 32)],
    )


def tiny_plan() -> Plan:
    """The test suite's plan: the tiny model on synthetic data, everything small."""
    return Plan(
        model="tiny", users=["user-0", "user-1"], dev_user="dev", general_size=60,
        step_shapes=[(2, 8)], step_repeats=2, step_warmup=1,
        memory_shapes=[(2, 8)], memory_steps=1,
        memory_methods=("sdk-import", "sdk-train-portable", "sdk-train-ort-training", "torch-head"),
        memory_device_methods=("sdk-train-portable",),
        personalize_sizes=[24], personalize_repeats=1, personalize_epochs=1,
        inference_levels=("basic", "all"), inference_batches=(1, 4), inference_seq=8,
        inference_repeats={1: 2, 4: 2}, switch_repeats=2, per_row_repeats=2, rebuild_repeats=1,
        delta_train=24, delta_holdout=16,
        quality_sizes=[8, 16], quality_holdout=16, quality_epochs=1, tune=True, tune_examples=8, tune_holdout=16,
        profile_shapes=[(2, 8)], max_length=32,
    )


def _log(message: str) -> None:
    from .environment import load_average

    load = load_average()
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}" + (f"  (load {load[0]:.1f})" if load else ""),
          file=sys.stderr, flush=True)


def run(plan: Plan, *, work_dir: Path, report_path: Path, plots_dir: Path, threads: int, command: str, mode: str,
        corpus: Any = None, pause: float | None = None) -> dict[str, Any]:
    """Run every section of ``plan``; write results.json, the plots and the report."""
    from . import deltas, diagnostics, inference, memory, personalization, quality_sizes, step_time
    from .device_worker import DeviceWorker, device_python
    from .environment import describe, load_average
    from .workspace import prepare, tweet_corpus

    started = time.perf_counter()
    results: dict[str, Any] = {"plan": asdict(plan), "command": command, "mode": mode, "environment": describe(threads),
                               "errors": {}, "section_seconds": {}, "section_load": {}}

    def section(name: str, fn: Callable[[], Any]) -> Any:
        _log(f"{name} ...")
        t0 = time.perf_counter()
        load_before = load_average()
        try:
            value = fn()
        except Exception as err:  # a failed section is reported, the others still run
            traceback.print_exc()
            results["errors"][name] = f"{type(err).__name__}: {err}"
            value = None
        results["section_seconds"][name] = time.perf_counter() - t0
        results["section_load"][name] = [load_before[0] if load_before else None, (load_average() or [None])[0]]
        _log(f"{name} done in {results['section_seconds'][name]:.0f} s")
        return value

    corpus = corpus or tweet_corpus(plan.users, plan.dev_user, plan.general_size)
    _log(f"preparing {plan.model}: base head on {len(corpus.general)} general examples, export ...")
    t0 = time.perf_counter()
    ws = prepare(plan.model, work_dir, corpus, threads=threads, max_length=plan.max_length)
    results["section_seconds"]["prepare"] = time.perf_counter() - t0
    m = ws.bundle.manifest
    results["workspace"] = {"model": plan.model, **ws.info, "trainable_tensors": len(m.trainable),
                            "trainable_values": m.policy["trainable_values"], "per_row": m.per_row,
                            "corpus": corpus.source}
    step_pause = 0.05 if pause is None else pause
    device_py = device_python() if plan.device else None
    results["device"] = {"python": str(device_py) if device_py else None,
                         "reason": "" if device_py else ("turned off in the plan" if not plan.device else
                                                         "no working .venv-device (run `make install`)")}

    def device_worker() -> Any:
        """A fresh device worker for one section (None without a device venv)."""
        if device_py is None:
            return None
        worker = DeviceWorker(device_py, ws.bundle.path, threads=ws.threads, log=work_dir / "device-worker.log")
        results["device"].setdefault("info", worker.info)
        return worker

    def with_device(name: str, fn: Callable[[Any], Any]) -> Callable[[], Any]:
        """``fn(worker)``; when the device side fails, the error is reported and the section
        is measured again without it, so the main venv's numbers are never lost to it."""
        def call() -> Any:
            try:
                worker = device_worker()
            except Exception as err:  # noqa: BLE001 - reported, the section runs without the device
                traceback.print_exc()
                results["errors"][f"{name} (device worker)"] = f"{type(err).__name__}: {err}"[:2000]
                return fn(None)
            try:
                return fn(worker)
            except Exception as err:
                if worker is None:
                    raise
                traceback.print_exc()
                results["errors"][f"{name} (device worker)"] = f"{type(err).__name__}: {err}"[:2000]
            finally:
                if worker is not None:
                    worker.close()
            return fn(None)
        return call

    results["step_time"] = section("step_time", with_device("step_time", lambda dev: step_time.train_step_times(
        ws, plan.step_shapes, repeats=plan.step_repeats, warmup=plan.step_warmup, pause=step_pause, device=dev)))
    def device_memory() -> list[dict[str, Any]]:
        if device_py is None:
            return []
        try:
            return memory.peak_memory(ws, plan.memory_shapes, steps=plan.memory_steps, methods=(),
                                      device_python=device_py, device_methods=plan.memory_device_methods)
        except Exception as err:  # noqa: BLE001 - reported; the main venv's rows are kept
            traceback.print_exc()
            results["errors"]["memory (device venv)"] = f"{type(err).__name__}: {err}"[:2000]
            return []

    results["memory"] = section("memory", lambda: memory.peak_memory(
        ws, plan.memory_shapes, steps=plan.memory_steps, methods=plan.memory_methods) + device_memory())
    results["personalization"] = section("personalization", lambda: personalization.personalization_times(
        ws, plan.personalize_sizes, repeats=plan.personalize_repeats, epochs=plan.personalize_epochs))
    results["inference"] = section("inference", with_device("inference", lambda dev: inference.inference_benchmarks(
        ws, levels=plan.inference_levels, batches=plan.inference_batches, seq=plan.inference_seq,
        repeats=plan.inference_repeats, switch_repeats=plan.switch_repeats, per_row_repeats=plan.per_row_repeats,
        rebuild_repeats=plan.rebuild_repeats, device=dev)))
    lrs = dict(quality_sizes.DEFAULT_LRS)
    if plan.tune and plan.dev_user:
        results["tuning"] = section("tuning", lambda: quality_sizes.tune_learning_rates(
            ws, domain=plan.dev_user, n=plan.tune_examples, holdout_size=plan.tune_holdout, epochs=plan.quality_epochs))
        if results["tuning"]:
            lrs.update(results["tuning"]["chosen"])
    results["deltas"] = section("deltas", lambda: deltas.delta_encodings(
        ws, train_size=plan.delta_train, holdout_size=plan.delta_holdout, epochs=plan.quality_epochs,
        learning_rate=lrs["bitfit"]))
    results["quality"] = section("quality", lambda: quality_sizes.quality(
        ws, users=plan.users, sizes=plan.quality_sizes, holdout_size=plan.quality_holdout, epochs=plan.quality_epochs,
        lrs=lrs))
    results["diagnostics"] = section("diagnostics", with_device("diagnostics", lambda dev: {
        "profiles": [diagnostics.profile_train_step(ws, batch=b, seq=s) for b, s in plan.profile_shapes],
        "portable_profiles": [diagnostics.profile_portable(ws, batch=b, seq=s) for b, s in plan.profile_shapes],
        "device_portable_profiles": [] if dev is None else [
            dev.call("profile", batch=b, seq=s, vocab=ws.vocab_size, classes=len(ws.labels),
                     out_dir=str(work_dir / "profiles")) for b, s in plan.profile_shapes],
        "optimized_ops": diagnostics.optimized_graph_ops(ws),
        "rewrite_cost": diagnostics.rewrite_cost(ws, batches=plan.inference_batches, seq=plan.inference_seq,
                                                 repeats=plan.inference_repeats),
        "device_inference_profile": None if dev is None else dev.call(
            "profile_inference", batch=max(plan.inference_batches), seq=plan.inference_seq, vocab=ws.vocab_size,
            classes=len(ws.labels), plain=str(ws.plain_onnx), overridable=_overridable(ws),
            out_dir=str(work_dir / "profiles")),
    }))
    results["load_average_end"] = load_average()
    results["wall_seconds"] = time.perf_counter() - started
    results["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    write_outputs(results, work_dir=work_dir, report_path=report_path, plots_dir=plots_dir)
    _log(f"wrote {report_path} ({results['wall_seconds'] / 60:.1f} min)")
    return results


def _overridable(ws: Any) -> str | None:
    from .diagnostics import overridable_plain_model

    path = ws.work_dir / "plain-overridable.onnx"
    if not path.exists():
        path = overridable_plain_model(ws)
    return str(path) if path else None


def write_outputs(results: dict[str, Any], *, work_dir: Path, report_path: Path, plots_dir: Path) -> None:
    """results.json, the PNG plots and the markdown report (plot links relative to it)."""
    from . import plots as plotting
    from .report import render

    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "results.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    plots_dir.mkdir(parents=True, exist_ok=True)
    links: dict[str, str] = {}

    def link(path: Path) -> str:
        return os.path.relpath(path, report_path.parent).replace(os.sep, "/")

    if results.get("step_time"):
        links["step_time"] = link(plotting.plot_step_times(results["step_time"], plots_dir / "step_time.png"))
    if results.get("memory"):
        links["memory"] = link(plotting.plot_memory(results["memory"], plots_dir / "memory.png"))
    if results.get("quality"):
        links["accuracy"] = link(plotting.plot_accuracy(results["quality"]["rows"], plots_dir / "accuracy.png"))
    report_path.parent.mkdir(parents=True, exist_ok=True)
    text = render(results, plots=links)
    # `make quality` writes its own section into the same file: keep it.
    from .quality import BEGIN, END, splice

    old = report_path.read_text(encoding="utf-8") if report_path.is_file() else ""
    if BEGIN in old and END in old:
        text = splice(text, BEGIN + old.split(BEGIN, 1)[1].split(END, 1)[0] + END)
    report_path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description="bitfit vs PyTorch, side by side.")
    parser.add_argument("--quick", action="store_true", help="a few minutes: fewer shapes, repeats and users")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the available cores)")
    parser.add_argument("--report", type=Path, default=None, help="where to write the markdown report")
    args = parser.parse_args(argv)
    # Before torch loads: OpenMP threads that spin next to ORT's thread pool made torch's
    # timings erratic on a loaded machine (see the report's method notes).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .environment import available_cores

    plan = quick_plan() if args.quick else full_plan()
    work = HERE / "_work" / ("quick" if args.quick else "full")
    report = args.report or ((work / "BENCHMARKS.md") if args.quick else REPO_ROOT / "BENCHMARKS.md")
    plots_dir = work if args.quick else HERE
    command = "python -m benchmarks.run" + (" --quick" if args.quick else "") + \
        (f" --threads {args.threads}" if args.threads else "")
    run(plan, work_dir=work, report_path=report, plots_dir=plots_dir, threads=args.threads or available_cores(),
        command=command, mode="quick" if args.quick else "full")
    return 0


if __name__ == "__main__":
    sys.exit(main())
