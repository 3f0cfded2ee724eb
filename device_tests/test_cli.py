"""The device venv's ``bitfit`` command, run as a user would: personalize, predict, deltas."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from sdk_fixtures import PROBE_LABELS, PROBES, text_data, write_jsonl


def run(command: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(command), *map(str, args)], capture_output=True, text=True, timeout=120)


def labels_of(done: subprocess.CompletedProcess) -> list[str]:
    return [line.split("\t")[0] for line in done.stdout.splitlines() if "\t" in line]


def test_personalize_predict_and_manage_deltas(bitfit_command, text_bundle, tmp_path):
    data = write_jsonl(tmp_path / "alice.jsonl", [{"text": t, "label": label} for t, label in text_data(48)])
    store = tmp_path / "store"
    quick = ["--epochs", "4", "--learning-rate", "1e-2", "--batch-size", "8"]

    done = run(bitfit_command, "personalize", text_bundle, "--user", "alice", "--data", data, "--store", store, *quick)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "user alice: version 1" in done.stdout and "backend portable" in done.stdout

    done = run(bitfit_command, "predict", text_bundle, "--user", "alice", "--store", store, *PROBES)
    assert done.returncode == 0, done.stderr[-2000:]
    assert labels_of(done) == PROBE_LABELS
    base = run(bitfit_command, "predict", text_bundle, *PROBES)
    assert base.returncode == 0 and labels_of(base) == ["neg"] * 4

    done = run(bitfit_command, "predict", text_bundle, "--user", "alice", "--store", store, "--json", PROBES[0])
    row = json.loads(done.stdout.splitlines()[0])
    assert row["label"] == "pos" and abs(sum(row["probabilities"]) - 1) < 1e-3

    # One more step on the same data: a holdout could say it did not help (nothing saved); --holdout 0 saves v2.
    assert run(bitfit_command, "personalize", text_bundle, "--user", "alice", "--data", data, "--store", store,
               "--max-steps", "1", "--holdout", "0").returncode == 0
    listed = run(bitfit_command, "deltas", store, "list")
    assert listed.returncode == 0 and listed.stdout.strip() == "alice\tcurrent v2\tversions [1, 2]"
    rolled = run(bitfit_command, "deltas", store, "rollback", "--user", "alice")
    assert rolled.returncode == 0 and "current version is now v1" in rolled.stdout
    assert run(bitfit_command, "deltas", store, "list").stdout.strip() == "alice\tcurrent v1\tversions [1, 2]"


def test_errors_are_typed_and_exit_2(bitfit_command, text_bundle, tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"text": "good great the movie was", "label": "positive"}] * 2)
    done = run(bitfit_command, "personalize", text_bundle, "--user", "alice", "--data", data, "--store", tmp_path)
    assert done.returncode == 2 and "InvalidUserDataError" in done.stderr

    good = write_jsonl(tmp_path / "good.jsonl", [{"text": t, "label": label} for t, label in text_data(12)])
    done = run(bitfit_command, "personalize", text_bundle, "--user", "alice", "--data", good, "--store", tmp_path,
               "--backend", "ort-training")
    assert done.returncode == 2 and "BackendUnavailableError" in done.stderr
    assert run(bitfit_command, "deltas", tmp_path, "list").stdout.strip() == ""


def test_info_names_both_backends(bitfit_command, text_bundle):
    done = run(bitfit_command, "info", text_bundle)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trainable: 18 tensors" in done.stdout
