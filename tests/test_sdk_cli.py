"""The ``bitfit`` command's device side: personalize, predict, deltas, info, and errors."""

from __future__ import annotations

import json

import pytest

from bitfit.sdk import DeltaStore
from bitfit.sdk.bundle import Bundle
from bitfit.sdk.cli import main

from sdk_fixtures import *  # noqa: F401,F403  (fixtures and helpers)
from sdk_fixtures import PROBES, delta_file, text_data, write_jsonl


@pytest.fixture
def data_file(tmp_path):
    return write_jsonl(tmp_path / "alice.jsonl", [{"text": t, "label": label} for t, label in text_data(32)])


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_personalize_predict_and_manage_deltas(text_bundle, data_file, tmp_path, capsys):
    store = tmp_path / "store"
    code, out, _ = run(capsys, "personalize", text_bundle, "--user", "alice", "--data", data_file, "--store", store,
                       "--epochs", "1")
    assert code == 0
    assert "user alice: version 1" in out and "(fp16)" in out and "stopped by steps" in out
    assert "holdout (" in out and "accuracy" in out
    assert DeltaStore(store).current_version("alice") == 1

    code, out, _ = run(capsys, "personalize", text_bundle, "--user", "alice", "--data", data_file, "--store", store,
                       "--epochs", "4", "--learning-rate", "0.01", "--batch-size", "8", "--encoding", "fp32",
                       "--seed", "3", "--threads", "1", "--max-steps", "12")
    assert code == 0 and "version 2" in out and "(fp32)" in out and "12 steps" in out and "stopped by steps" in out
    assert DeltaStore(store).load("alice").info["seed"] == 3

    code, out, err = run(capsys, "predict", text_bundle, "--user", "alice", "--store", store, *PROBES)
    assert code == 0 and err == ""
    lines = out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["pos", "neg", "pos", "neg"]
    assert [line.split("\t")[2] for line in lines] == PROBES
    code, out, _ = run(capsys, "predict", text_bundle, PROBES[0])  # the base model
    assert code == 0 and out.startswith("neg\t")
    code, out, _ = run(capsys, "predict", text_bundle, "--user", "alice", "--store", store, "--json", "good text")
    row = json.loads(out)
    assert row["text"] == "good text" and row["label"] in ("neg", "pos") and len(row["probabilities"]) == 2
    assert sum(row["probabilities"]) == pytest.approx(1.0, abs=1e-4)

    code, out, _ = run(capsys, "deltas", store, "list")
    assert code == 0 and out.strip() == "alice\tcurrent v2\tversions [1, 2]"
    code, out, _ = run(capsys, "deltas", store, "show", "--user", "alice")
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["version"] for r in rows] == [1, 2] and [r["current"] for r in rows] == [False, True]
    assert rows[1]["encoding"] == "fp32" and rows[1]["info"]["steps"] == 12
    code, out, _ = run(capsys, "deltas", store, "rollback", "--user", "alice")
    assert code == 0 and "current version is now v1" in out
    assert DeltaStore(store).current_version("alice") == 1
    code, out, _ = run(capsys, "deltas", store, "rollback", "--user", "alice", "--version", "2")
    assert code == 0 and "v2" in out
    code, out, _ = run(capsys, "deltas", store, "rm", "--user", "alice", "--version", "1")
    assert code == 0 and "deleted v1" in out and DeltaStore(store).versions("alice") == [2]
    code, out, _ = run(capsys, "deltas", store, "rm", "--user", "alice")
    assert code == 0 and "deleted all versions" in out
    assert DeltaStore(store).users() == []
    code, out, _ = run(capsys, "deltas", store, "list")
    assert code == 0 and out == ""


def test_info(text_bundle, text_head_bundle, capsys):
    code, out, _ = run(capsys, "info", text_bundle)
    assert code == 0
    assert f"bundle {text_bundle}" in out
    assert "task classification, loss cross-entropy, optimizer adamw, labels ['neg', 'pos']" in out
    assert "policy all-biases, per-row True" in out and "trainable: 18 tensors" in out
    assert "base fingerprint sha256:" in out and "format 2" in out
    assert "training backend portable: yes" in out and "training backend ort-training: yes" in out
    assert "portable gradients vs torch-autograd: worst error" in out
    assert "ort-training: frozen tensors unchanged by a step: True" in out
    code, out, _ = run(capsys, "info", text_head_bundle)
    assert code == 0 and "policy all-biases+head, per-row False" in out


def test_predict_reports_a_fallback_on_stderr(text_bundle, data_file, tmp_path, capsys):
    store = tmp_path / "store"
    assert run(capsys, "personalize", text_bundle, "--user", "eve", "--data", data_file, "--store", store,
               "--max-steps", "2")[0] == 0
    path = DeltaStore(store).path_for("eve") / "v000001.delta"
    path.write_bytes(path.read_bytes()[:-3])
    code, out, err = run(capsys, "predict", text_bundle, "--user", "eve", "--store", store, PROBES[0])
    assert code == 0 and out.startswith("neg\t")
    assert "warning: served the base model to 'eve'" in err and "DeltaCorruptError" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "{tmp}/no-bundle"], "BundleInvalidError"),
        (["predict", "{tmp}/no-bundle", "text"], "BundleInvalidError"),
        (["personalize", "{bundle}", "--user", "u", "--data", "{tmp}/missing.jsonl", "--store", "{tmp}/s"],
         "InvalidUserDataError"),
        (["personalize", "{bundle}", "--user", "u", "--data", "{data}", "--store", "{tmp}/s", "--epochs", "0"],
         "epochs must be an int >= 1"),
        (["personalize", "{bundle}", "--user", "u", "--data", "{data}", "--store", "{tmp}/s", "--holdout", "1.5"],
         "holdout must be in"),
        (["deltas", "{tmp}/s", "show"], "InvalidArgumentError: --user is required"),
        (["personalize", "{bundle}", "--user", "u", "--data", "{data}", "--store", "{tmp}/s", "--patience", "0"],
         "InvalidArgumentError: patience must be an int >= 1"),
        (["deltas", "{tmp}/s", "rollback", "--user", "nobody"], "DeltaNotFoundError"),
        (["deltas", "{tmp}/s", "rm", "--user", "nobody"], "DeltaNotFoundError"),
        (["deltas", "{tmp}/s", "rm", "--user", "nobody", "--version", "0"], "version must be an int >= 1"),
    ],
)
def test_bad_calls_return_2_with_an_error_on_stderr(text_bundle, data_file, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, bundle=text_bundle, data=data_file) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert "error" in err and message in err
    assert out == ""


def test_usage_errors_exit_2(text_bundle, capsys):
    for argv in (["personalize", str(text_bundle)], ["frobnicate"], ["deltas", "/tmp", "explode"], []):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert "error" in capsys.readouterr().err


def test_store_defaults_to_the_platform_data_directory_for_personalize_and_predict(text_bundle, data_file, tmp_path,
                                                                                   capsys, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data-home"))
    assert run(capsys, "personalize", text_bundle, "--user", "alice", "--data", data_file, "--epochs", "4",
               "--batch-size", "8")[0] == 0
    assert DeltaStore(tmp_path / "data-home" / "bitfit" / "deltas").current_version("alice") == 1
    code, out, err = run(capsys, "predict", text_bundle, "--user", "alice", *PROBES)
    assert code == 0 and err == ""
    assert [line.split("\t")[0] for line in out.strip().splitlines()] == ["pos", "neg", "pos", "neg"]


def test_key_file_opens_an_encrypted_store(text_bundle, data_file, tmp_path, capsys):
    store, key_file = tmp_path / "store", tmp_path / "key"
    key_file.write_bytes(bytes(range(32)))
    code, out, _ = run(capsys, "personalize", text_bundle, "--user", "alice", "--data", data_file, "--store", store,
                       "--key-file", key_file, "--epochs", "4", "--batch-size", "8")
    assert code == 0 and delta_file(store, "alice", 1).read_bytes().startswith(b"BFDELTA-AESGCM")
    assert DeltaStore(store, key=bytes(range(32))).load("alice").info["steps"] > 0
    code, out, err = run(capsys, "predict", text_bundle, "--user", "alice", "--store", store, "--key-file", key_file, *PROBES)
    assert code == 0 and err == "" and [line.split("\t")[0] for line in out.strip().splitlines()] == ["pos", "neg", "pos", "neg"]
    code, out, err = run(capsys, "predict", text_bundle, "--user", "alice", "--store", store, PROBES[0])  # no key
    assert code == 0 and out.startswith("neg\t") and "served the base model" in err
    code, out, _ = run(capsys, "deltas", store, "show", "--user", "alice", "--key-file", key_file)
    assert code == 0 and json.loads(out)["version"] == 1
    key_file.write_bytes(bytes(range(32)) + b"\n")
    code, out, err = run(capsys, "predict", text_bundle, "--user", "alice", "--store", store, "--key-file", key_file, "x")
    assert code == 2 and "InvalidArgumentError" in err and "33 bytes" in err and out == ""
    code, _, err = run(capsys, "deltas", store, "list", "--key-file", tmp_path / "missing")
    assert code == 2 and "cannot read key file" in err


def test_patience_learning_rate_and_providers_options(text_bundle, data_file, tmp_path, capsys):
    store = tmp_path / "store"
    code, out, _ = run(capsys, "personalize", text_bundle, "--user", "a", "--data", data_file, "--store", store,
                       "--epochs", "6", "--patience", "off", "--providers", "cpu")
    rate = Bundle.open(text_bundle).manifest.training_defaults["learning_rate"]
    assert code == 0 and "stopped by steps" in out and f"learning rate {rate:g}" in out  # the bundle's rate
    info = DeltaStore(store).load("a").info
    assert info["epochs_run"] == 6 and info["learning_rate_from"] == "bundle"
    assert info["plan"]["reasons"]["steps"].startswith("epochs=6 given")
    code, out, _ = run(capsys, "personalize", text_bundle, "--user", "b", "--data", data_file, "--store", store,
                       "--epochs", "6", "--patience", "1", "--learning-rate", "0.5", "--holdout", "0")
    assert code == 0 and "learning rate 0.5" in out
    assert DeltaStore(store).load("b").info["learning_rate_from"] == "argument"
    code, out, err = run(capsys, "personalize", text_bundle, "--user", "c", "--data", data_file, "--store", store,
                         "--max-steps", "1", "--device", "cpu")
    assert code == 0 and "--device is deprecated: use --providers cpu" in err
    code, _, err = run(capsys, "predict", text_bundle, "--providers", "gpu", "x")
    assert code == 2 and "InvalidArgumentError: providers must be" in err
    code, out, _ = run(capsys, "predict", text_bundle, "--providers", "CPUExecutionProvider,CPUExecutionProvider",
                       "--verify", "sizes", "--threads", "1", PROBES[0])
    assert code == 0 and out.startswith("neg\t")
    with pytest.raises(SystemExit):
        main(["personalize", str(text_bundle), "--user", "u", "--data", str(data_file), "--patience", "soon"])
