"""Inspecting, comparing and combining deltas (bitfit.sdk.delta_tools) and their
``bitfit deltas STORE inspect|compare|combine`` commands; the old list/show/rollback/rm stay."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bitfit.sdk import DeltaStore
from bitfit.sdk.bundle import Bundle
from bitfit.sdk.cli import main
from bitfit.sdk.delta import Delta
from bitfit.sdk.delta_tools import (
    combine_deltas, compare_deltas, format_inspection, inspect_delta, layer_of, plot_layers, subtract_deltas,
)
from bitfit.sdk.errors import DeltaMismatchError, InvalidArgumentError
from bitfit.sdk.predictor import Predictor

from sdk_fixtures import *  # noqa: F401,F403  (fixtures)

FP = "sha256:" + "0" * 64


def delta(values: dict[str, list[float]], fingerprint: str = FP, encoding: str = "fp32") -> Delta:
    return Delta({k: np.array(v, np.float32) for k, v in values.items()}, fingerprint, encoding=encoding)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_layer_of_groups_by_the_first_numbered_module():
    assert layer_of("bert.encoder.layer.11.output.dense.bias") == "bert.encoder.layer.11"
    assert layer_of("transformer.h.0.ln_1.bias") == "transformer.h.0"
    assert layer_of("0.bias") == "0"
    assert layer_of("h.2.attn.bias.__copy1") == "h.2"
    assert layer_of("classifier.bias") == "classifier"
    assert layer_of("bias") == "(no layer)"


def test_inspect_reports_l2_max_and_relative_per_tensor_and_layer():
    d = delta({"h.0.a.bias": [3.0, 4.0], "h.0.b.bias": [0.0, 0.0], "h.1.a.bias": [0.0, -1.0]})
    base = {"h.0.a.bias": np.array([0.0, 10.0], np.float32), "h.0.b.bias": np.array([1.0, 0.0], np.float32),
            "h.1.a.bias": np.array([0.0, 2.0], np.float32)}
    report = inspect_delta(d, base, top=2)
    rows = {r["name"]: r for r in report["tensors"]}
    assert rows["h.0.a.bias"]["l2"] == pytest.approx(5.0) and rows["h.0.a.bias"]["max_abs"] == 4.0
    assert rows["h.0.a.bias"]["relative"] == pytest.approx(0.5)
    assert rows["h.1.a.bias"]["relative"] == pytest.approx(0.5)
    layers = {r["layer"]: r for r in report["layers"]}
    assert layers["h.0"]["tensors"] == 2 and layers["h.0"]["l2"] == pytest.approx(5.0)
    assert layers["h.0"]["relative"] == pytest.approx(5.0 / np.sqrt(101.0))
    assert report["total"]["l2"] == pytest.approx(np.sqrt(26.0)) and report["total"]["size"] == 6
    assert [r["name"] for r in report["top"]] == ["h.0.a.bias", "h.1.a.bias"]  # by relative change, ties by L2
    json.dumps(report)  # JSON-able for --json


def test_inspect_without_base_reports_absolute_sizes_only():
    report = inspect_delta(delta({"h.0.b": [1.0, 0.0], "h.1.b": [0.0, 3.0]}))
    assert all(r["relative"] is None for r in report["tensors"] + report["layers"])
    assert [r["name"] for r in report["top"]] == ["h.1.b", "h.0.b"]
    assert "absolute sizes only" in format_inspection(report)


def test_inspect_refuses_base_values_of_another_model():
    with pytest.raises(DeltaMismatchError, match="the bundle the delta was trained with"):
        inspect_delta(delta({"b": [1.0]}), {"other": np.zeros(1, np.float32)})
    with pytest.raises(InvalidArgumentError, match="top"):
        inspect_delta(delta({"b": [1.0]}), top=-1)


def test_compare_gives_cosine_per_layer_and_overall():
    a = delta({"h.0.b": [1.0, 0.0], "h.1.b": [1.0, 1.0], "h.2.b": [0.0, 0.0]})
    b = delta({"h.0.b": [-1.0, 0.0], "h.1.b": [2.0, 2.0], "h.2.b": [1.0, 0.0]})
    result = compare_deltas(a, b)
    layers = {r["layer"]: r["cosine"] for r in result["layers"]}
    assert layers["h.0"] == pytest.approx(-1.0) and layers["h.1"] == pytest.approx(1.0)
    assert layers["h.2"] is None  # one side all zeros: undefined, not 0
    x, y = np.array([1, 0, 1, 1, 0, 0.0]), np.array([-1, 0, 2, 2, 1, 0.0])
    assert result["overall"]["cosine"] == pytest.approx(x @ y / np.linalg.norm(x) / np.linalg.norm(y))
    assert result["overall"]["l2_diff"] == pytest.approx(np.linalg.norm(x - y))


def test_combine_mean_weighted_sum_and_subtract():
    a, b = delta({"b": [1.0, 0.0]}), delta({"b": [0.0, 2.0]})
    assert combine_deltas([a, b]).tensors["b"].tolist() == [0.5, 1.0]
    assert combine_deltas([a, b], [3, 1]).tensors["b"].tolist() == [0.75, 0.5]
    assert combine_deltas([a, b], [1, -1], mode="sum").tensors["b"].tolist() == [1.0, -2.0]
    assert subtract_deltas(a, b).tensors["b"].tolist() == [1.0, -2.0]
    result = combine_deltas([a, b], [1, 1], mode="sum")
    assert result.base_fingerprint == FP and result.info["operation"] == "combine-sum"
    assert result.info["weights"] == [1.0, 1.0]


def test_combine_takes_the_most_precise_encoding_and_rounds_through_it():
    a, b = delta({"b": [1.0 / 3]}, encoding="fp16"), delta({"b": [1.0 / 3]}, encoding="int8")
    assert combine_deltas([a, b]).encoding == "fp16"
    assert combine_deltas([a, delta({"b": [0.1]})]).encoding == "fp32"
    out = combine_deltas([a, b], encoding="fp16").tensors["b"]
    assert out.tolist() == out.astype(np.float16).astype(np.float32).tolist()  # what a reader of the file gets


def test_combine_refuses_other_bases_tensor_sets_and_bad_weights():
    a = delta({"b": [1.0, 0.0]})
    with pytest.raises(DeltaMismatchError, match="base"):
        combine_deltas([a, delta({"b": [1.0, 0.0]}, fingerprint="sha256:" + "1" * 64)])
    with pytest.raises(DeltaMismatchError, match="other tensors"):
        combine_deltas([a, delta({"c": [1.0, 0.0]})])
    with pytest.raises(DeltaMismatchError, match="shape"):
        subtract_deltas(a, delta({"b": [1.0, 0.0, 2.0]}))
    with pytest.raises(InvalidArgumentError, match="one weight per delta"):
        combine_deltas([a, a], [1.0])
    with pytest.raises(InvalidArgumentError, match="sum to 0"):
        combine_deltas([a, a], [1.0, -1.0])
    with pytest.raises(InvalidArgumentError, match="finite"):
        combine_deltas([a, a], [1.0, float("nan")])
    with pytest.raises(InvalidArgumentError, match="mode"):
        combine_deltas([a, a], mode="max")


def test_plot_writes_bars_for_one_delta_and_a_heat_map_for_several(tmp_path):
    pytest.importorskip("matplotlib")
    one = plot_layers({"alice": inspect_delta(delta({"h.0.b": [1.0], "h.1.b": [2.0]}))}, tmp_path / "one.png")
    many = plot_layers({u: inspect_delta(delta({"h.0.b": [float(i)], "h.1.b": [2.0]})) for i, u in enumerate("abc")},
                       tmp_path / "many.png")
    for path in (one, many):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []
    with pytest.raises(InvalidArgumentError):
        plot_layers({}, tmp_path / "none.png")


# -- the command ----------------------------------------------------------------------

@pytest.fixture
def store_with_users(numeric_bundle, tmp_path):
    bundle = Bundle.open(numeric_bundle)
    store = DeltaStore(tmp_path / "store")
    rng = np.random.default_rng(0)
    for user in ("alice", "bob", "alice"):
        store.save(user, Delta({t.name: rng.normal(size=t.shape) * 0.1 for t in bundle.manifest.trainable},
                               bundle.manifest.base_fingerprint, encoding="fp32"))
    return bundle, store


def test_cli_inspect_prints_a_table_and_json_and_a_plot(store_with_users, capsys, tmp_path):
    bundle, store = store_with_users
    code, out, err = run(capsys, "deltas", store.root, "inspect", "--user", "alice", "--bundle", bundle.path)
    assert code == 0 and err == ""
    assert out.startswith("alice v2: 3 tensors") and "relative to the base" in out and "most moved:" in out
    code, out, _ = run(capsys, "deltas", store.root, "inspect", "--user", "alice", "--version", "1", "--json")
    report = json.loads(out)
    expected = inspect_delta(store.load("alice", 1))
    assert report["version"] == 1 and report["total"]["l2"] == pytest.approx(expected["total"]["l2"])
    assert report["total"]["relative"] is None
    pytest.importorskip("matplotlib")
    code, out, _ = run(capsys, "deltas", store.root, "inspect", "--user", "alice", "--user", "bob", "--plot",
                       tmp_path / "heat.png", "--json")
    assert code == 0 and [r["user"] for r in json.loads(out)] == ["alice", "bob"]
    assert (tmp_path / "heat.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_inspect_refuses_a_bundle_of_another_base(store_with_users, text_bundle, capsys):
    _, store = store_with_users
    code, out, err = run(capsys, "deltas", store.root, "inspect", "--user", "alice", "--bundle", text_bundle)
    assert code == 2 and "DeltaMismatchError" in err and out == ""


def test_cli_compare_two_users_and_two_versions(store_with_users, capsys):
    _, store = store_with_users
    code, out, _ = run(capsys, "deltas", store.root, "compare", "--user", "alice", "--other", "bob", "--json")
    result = json.loads(out)
    expected = compare_deltas(store.load("alice"), store.load("bob"))
    assert code == 0 and result["overall"]["cosine"] == pytest.approx(expected["overall"]["cosine"])
    assert result["a"] == {"user": "alice", "version": 2} and result["b"] == {"user": "bob", "version": 1}
    code, out, _ = run(capsys, "deltas", store.root, "compare", "--user", "alice", "--version", "1", "--other-version", "2")
    assert code == 0 and out.startswith("alice v1 vs alice v2: cosine")
    code, _, err = run(capsys, "deltas", store.root, "compare", "--user", "alice")
    assert code == 2 and "compare needs two deltas" in err


def test_cli_combine_saves_an_ordinary_delta_the_predictor_serves(store_with_users, capsys):
    bundle, store = store_with_users
    code, out, _ = run(capsys, "deltas", store.root, "combine", "--user", "alice", "--user", "bob", "--weights", "1,3",
                       "--out", "team")
    assert code == 0 and out.startswith("team: saved v1")
    team, alice, bob = store.load("team"), store.load("alice"), store.load("bob")
    for name in team.tensors:
        np.testing.assert_allclose(team.tensors[name], (alice.tensors[name] + 3 * bob.tensors[name]) / 4, atol=1e-6)
    assert team.info["sources"] == [{"user": "alice", "version": 2}, {"user": "bob", "version": 1}]
    features = {"features": np.random.default_rng(1).normal(size=(3, bundle.manifest.inputs[0].shape[1])).astype(np.float32)}
    predictor = Predictor(bundle, store)
    served = predictor.logits(features, ["team"] * 3)
    by_hand = predictor.session.run([bundle.manifest.logits_output], {**features, **predictor.tensors_for_delta(team)})[0]
    np.testing.assert_array_equal(served, by_hand)
    code, out, _ = run(capsys, "deltas", store.root, "combine", "--user", "alice", "--user", "bob", "--mode", "subtract",
                       "--out", "alice-minus-bob")
    diff = store.load("alice-minus-bob")
    assert code == 0 and all(np.allclose(diff.tensors[n], alice.tensors[n] - bob.tensors[n], atol=1e-6) for n in diff.tensors)


@pytest.mark.parametrize("argv, message", [
    (["combine", "--user", "alice", "--user", "bob"], "--out NAME is required"),
    (["combine", "--user", "alice", "--user", "bob", "--weights", "1", "--out", "x"], "1 numbers for 2 users"),
    (["combine", "--user", "alice", "--user", "bob", "--weights", "a,b", "--out", "x"], "comma-separated numbers"),
    (["combine", "--user", "alice", "--mode", "subtract", "--out", "x"], "exactly two --user"),
    (["combine", "--out", "x"], "--user is required for combine"),
    (["inspect"], "--user is required for inspect"),
    (["inspect", "--user", "nobody"], "DeltaNotFoundError"),
    (["inspect", "--user", "alice", "--user", "bob", "--version", "1"], "--version picks one version"),
    (["to-torch", "--user", "alice"], "--bundle is required"),
])
def test_cli_bad_calls_exit_2_with_a_typed_error(store_with_users, capsys, argv, message):
    _, store = store_with_users
    code, out, err = run(capsys, "deltas", store.root, *argv)
    assert code == 2 and message in err and out == ""
    assert "team" not in store.users() and "x" not in store.users()


def test_old_actions_still_work_under_the_sub_commands(store_with_users, capsys):
    _, store = store_with_users
    code, out, _ = run(capsys, "deltas", store.root, "list")
    assert out.splitlines() == ["alice\tcurrent v2\tversions [1, 2]", "bob\tcurrent v1\tversions [1]"]
    code, out, _ = run(capsys, "deltas", store.root, "rollback", "--user", "alice")
    assert code == 0 and store.current_version("alice") == 1
    code, out, _ = run(capsys, "deltas", store.root, "show", "--user", "alice")
    assert [json.loads(line)["version"] for line in out.splitlines()] == [1, 2]
    code, out, _ = run(capsys, "deltas", store.root, "rm", "--user", "bob")
    assert code == 0 and store.users() == ["alice"]
    with pytest.raises(SystemExit):
        main(["deltas", str(store.root), "explode"])
