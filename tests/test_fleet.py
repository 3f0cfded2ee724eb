"""Federated BitFit (bitfit.sdk.fleet_*): the update checks, the population saved per round,
bad clients dropped, failed rounds saving nothing, DP, and a run on Flower's simulation engine.

Most rounds run on an in-process grid (``InProcessGrid``) that hands Flower's messages to the
real ClientApp and returns its replies, so the server's round loop, Flower's FedAvg and DP
wrappers and the client's training are the real ones, without Ray's start-up cost. One test runs
``bitfit federate simulate`` on Flower's simulation engine (Ray).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bitfit.sdk.bundle import Bundle
from bitfit.sdk.errors import InvalidArgumentError
from bitfit.sdk.fleet_client import MISBEHAVIORS, ClientSettings, parse_misbehave, spoil, train_update
from bitfit.sdk.fleet_server import FleetSettings, check_update, read_rounds, save_population
from bitfit.sdk.store import DeltaStore

from sdk_fixtures import *  # noqa: F401,F403  (fixtures and helpers)
from sdk_fixtures import text_data, write_jsonl

FP = "sha256:" + "0" * 64


def write_clients(directory: Path, count: int, size: int = 30) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    return [str(write_jsonl(directory / f"client{i}.jsonl", [{"text": t, "label": l} for t, l in text_data(size, seed=i)]))
            for i in range(count)]


# ---------------------------------------------------------------------------- no flwr needed

def test_check_update_refuses_names_shapes_fingerprint_nonfinite_norm_and_examples() -> None:
    cur = {"a": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)}
    shapes = {"a": (3,), "b": (2,)}
    ok = {"a": np.full(3, 0.1, np.float32), "b": np.full(2, 0.1, np.float32)}

    def check(values, fp=FP, examples=10.0):
        return check_update(values, fp, shapes=shapes, fingerprint=FP, current=cur, max_norm=5.0, examples=examples)

    assert check(ok) is None
    assert "names differ" in check({"a": ok["a"], "c": ok["b"]})
    assert "names differ" in check({"a": ok["a"]})
    assert "shape of b" in check({"a": ok["a"], "b": np.zeros(3, np.float32)})
    assert "base" in check(ok, fp="sha256:" + "f" * 64)
    assert "non-finite" in check({"a": np.array([0, np.nan, 0], np.float32), "b": ok["b"]})
    assert "non-finite" in check({"a": np.array([0, np.inf, 0], np.float32), "b": ok["b"]})
    assert "exceeds max_update_norm" in check({"a": np.full(3, 10, np.float32), "b": ok["b"]})
    assert "num-examples" in check(ok, examples=0)
    assert "num-examples" in check(ok, examples=float("nan"))


@pytest.mark.parametrize("kind", [k for k in MISBEHAVIORS if k not in ("crash", "timeout", "fingerprint")])
def test_every_spoiled_update_is_refused(kind: str) -> None:
    cur = {"a": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)}
    bad = spoil(cur, kind)
    assert check_update(bad, FP, shapes={"a": (3,), "b": (2,)}, fingerprint=FP, current=cur, max_norm=100.0) is not None


def test_parse_misbehave_and_settings_refuse_bad_values() -> None:
    assert parse_misbehave("0:crash, 2:norm") == {0: "crash", 2: "norm"}
    for text in ("x:nan", "1:sulk", "1"):
        with pytest.raises(InvalidArgumentError):
            parse_misbehave(text)
    with pytest.raises(InvalidArgumentError, match="rounds must be an int >= 1"):
        FleetSettings(bundle="b", store="s", rounds=0)
    with pytest.raises(InvalidArgumentError, match="min_clients .* cannot exceed clients"):
        FleetSettings(bundle="b", store="s", clients=2, min_clients=3)
    with pytest.raises(InvalidArgumentError, match="dp_noise needs dp_clip"):
        FleetSettings(bundle="b", store="s", dp_noise=1.0)
    with pytest.raises(InvalidArgumentError, match="dp_side"):
        FleetSettings(bundle="b", store="s", dp_clip=1.0, dp_side="both")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="eval_fraction"):
        ClientSettings(bundle="b", eval_fraction=1.0)


def test_simulate_settings_refuse_missing_data_and_too_many_clients(tmp_path: Path) -> None:
    from bitfit.sdk.cli import main
    from bitfit.sdk.errors import InvalidUserDataError
    from bitfit.sdk.fleet_run import settings_for_simulation

    with pytest.raises(InvalidArgumentError, match="is not a directory"):
        settings_for_simulation("b", str(tmp_path / "nowhere"), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidUserDataError, match="no .jsonl or .csv data files"):
        settings_for_simulation("b", str(tmp_path / "empty"), str(tmp_path / "out"))
    write_clients(tmp_path / "data", 2)
    with pytest.raises(InvalidArgumentError, match="--clients must be between 1 and the 2 data files"):
        settings_for_simulation("b", str(tmp_path / "data"), str(tmp_path / "out"), clients=3)
    # The command reports it as a typed error with exit status 2, before starting Flower.
    assert main(["federate", "simulate", "b", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o"),
                 "--clients", "3"]) == 2


def test_fleet_modules_import_without_flwr() -> None:
    code = ("import sys; sys.modules['flwr'] = None\n"
            "import bitfit.sdk.fleet_client, bitfit.sdk.fleet_server, bitfit.sdk.fleet_run, bitfit.sdk.cli_federate\n"
            "from bitfit.sdk.errors import MissingDependencyError\n"
            "from bitfit.sdk.fleet_client import make_client_app, ClientSettings\n"
            "try:\n    make_client_app(ClientSettings(bundle='b'))\nexcept MissingDependencyError as e:\n    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: a fleet client needs flwr: pip install 'bitfit[fleet]'" in out.stdout


def test_save_population_is_relative_to_the_base_and_devices_stack_on_it(text_bundle: Path, tmp_path: Path) -> None:
    from bitfit.sdk import Personalizer

    bundle = Bundle.open(text_bundle)
    base = bundle.trainable_base()
    values = {n: v + 0.25 for n, v in base.items()}
    store = DeltaStore(tmp_path / "store")
    version, delta = save_population(store, "population", values, base, bundle.manifest.base_fingerprint,
                                     {"round": 1, "clients": ["a", "b"]})
    assert version == 1 and store.load("population").info["clients"] == ["a", "b"]
    for n in base:
        np.testing.assert_allclose(delta.tensors[n], 0.25, atol=1e-6)
    p = Personalizer(text_bundle, store, population="population")
    # A device without a delta of its own is served base + population.
    served = p.predictor.user_tensors("someone-new")
    name = sorted(base)[0]
    np.testing.assert_allclose(np.asarray(served[name]).reshape(-1), values[name].reshape(-1), atol=1e-5)


def test_train_update_trains_from_the_start_values_for_the_step_budget(text_bundle: Path, tmp_path: Path) -> None:
    from bitfit.sdk.fleet_client import ValuesEvaluator

    ev = ValuesEvaluator(text_bundle)
    start = {n: v + 0.01 for n, v in ev.personalizer.base_trainable.items()}
    update = train_update(ev.personalizer, text_data(24), start, max_steps=4, learning_rate=0.05)
    assert update.steps == 4 and update.examples == 24
    assert set(update.values) == set(start)
    assert any(not np.allclose(update.values[n], start[n]) for n in start)
    # The evaluator scores the values it is given, not the base.
    assert ev.evaluate(text_data(10, seed=5), update.values)["loss"] != ev.evaluate(text_data(10, seed=5), None)["loss"]


# ---------------------------------------------------------------------------- rounds on an in-process grid

flwr = pytest.importorskip("flwr", reason="the fleet needs flwr: pip install 'bitfit[fleet]'")


class InProcessGrid:
    """A Flower Grid whose nodes are the real ClientApp called in this process, one after another;
    a node whose reply takes longer than the timeout is not returned (as a real Grid would)."""

    def __init__(self, client_app, count: int) -> None:
        from flwr.app import Context, RecordDict

        self.app = client_app
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": i, "num-partitions": count},
                                          state=RecordDict(), run_config={}) for i in range(count)}
        self.sent: list = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Error, Message

        replies = []
        for msg in messages:
            self.sent.append(msg)
            started = time.monotonic()
            try:
                reply = self.app(msg, self.contexts[msg.metadata.dst_node_id])
            except Exception as err:
                reply = Message(error=Error(code=1, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            if timeout is not None and time.monotonic() - started > timeout:
                continue
            replies.append(reply)
        return replies


@pytest.fixture()
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = None, None, None


def run_rounds(text_bundle: Path, tmp_path: Path, clients: int = 3, misbehave: str = "", **options):
    from bitfit.sdk.fleet_client import make_client_app
    from bitfit.sdk.fleet_server import run_fleet

    files = write_clients(tmp_path / "data", clients)
    client = ClientSettings(bundle=str(text_bundle), data_files=tuple(files), misbehave=misbehave,
                            misbehave_sleep=options.pop("misbehave_sleep", 30.0))
    settings = FleetSettings(bundle=str(text_bundle), store=str(tmp_path / "out" / "store"), out=str(tmp_path / "out"),
                             clients=clients, **{"rounds": 2, "steps_per_round": 3, "learning_rate": 0.05, **options})
    grid = InProcessGrid(make_client_app(client), clients)
    reports = run_fleet(grid, settings)
    return reports, DeltaStore(settings.store), grid


def test_each_round_saves_a_population_version_with_round_clients_and_metrics(text_bundle, tmp_path, task_identity):
    reports, store, _ = run_rounds(text_bundle, tmp_path, clients=3, rounds=2)
    assert [r.ok for r in reports] == [True, True]
    assert store.versions("population") == [1, 2]
    info = store.load("population", 2).info
    assert info["round"] == 2 and sorted(info["clients"]) == ["client0", "client1", "client2"]
    assert info["train_metrics"]["examples"] == 3 * 24 and 0 <= info["evaluate_metrics"]["accuracy"] <= 1
    assert [r["version"] for r in read_rounds(tmp_path / "out")] == [1, 2]
    assert reports[0].bytes_down_per_client == reports[0].bytes_up_per_client > 0


def test_fedavg_weights_updates_by_example_count(text_bundle, tmp_path, task_identity):
    # Client 1 has 3x the examples of client 0: the population is their 1:3 weighted mean.
    from bitfit.sdk.fleet_client import make_client_app, train_update, _device
    from bitfit.sdk.fleet_server import run_fleet

    data = tmp_path / "data"
    data.mkdir()
    files = [str(write_jsonl(data / "a.jsonl", [{"text": t, "label": l} for t, l in text_data(10, seed=1)])),
             str(write_jsonl(data / "b.jsonl", [{"text": t, "label": l} for t, l in text_data(30, seed=2)]))]
    client = ClientSettings(bundle=str(text_bundle), data_files=tuple(files), eval_fraction=0.0)
    settings = FleetSettings(bundle=str(text_bundle), store=str(tmp_path / "store"), clients=2, rounds=1,
                             steps_per_round=3, learning_rate=0.05)
    base = Bundle.open(text_bundle).trainable_base()
    expected = []
    for i in range(2):  # what each client trains in round 1 (same seed as the client app uses)
        dev = _device(client, i)
        expected.append((len(dev.train), train_update(dev.personalizer, dev.train, base, max_steps=3, learning_rate=0.05,
                                                      seed=client.seed + 1000 + i).values))
    run_fleet(InProcessGrid(make_client_app(client), 2), settings)
    got = DeltaStore(settings.store).load("population").apply_to(base)
    (n0, v0), (n1, v1) = expected
    assert (n0, n1) == (10, 30)
    for name in base:
        np.testing.assert_allclose(got[name], (n0 * v0[name] + n1 * v1[name]) / (n0 + n1), atol=1e-5)


@pytest.mark.parametrize("kind", ["crash", "names", "shapes", "fingerprint", "nan", "inf", "norm", "timeout"])
def test_a_bad_client_is_dropped_and_the_round_completes_with_the_rest(kind, text_bundle, tmp_path, task_identity):
    options = {"round_timeout": 2.0, "misbehave_sleep": 3.0} if kind == "timeout" else {}
    reports, store, _ = run_rounds(text_bundle, tmp_path, clients=3, misbehave=f"1:{kind}", rounds=1, min_clients=2,
                                   **options)
    (report,) = reports
    assert report.ok and store.versions("population") == [1]
    assert sorted(report.clients) == ["client0", "client2"]
    assert len(report.dropped) == 1
    reason = report.dropped[0]["reason"]
    expected = {"crash": "error", "names": "names differ", "shapes": "shape of", "fingerprint": "base",
                "nan": "non-finite", "inf": "non-finite", "norm": "max_update_norm", "timeout": "timeout"}[kind]
    assert expected in reason
    assert store.load("population").info["dropped"][0]["reason"] == reason


def test_too_few_good_clients_fail_the_round_and_keep_the_last_population(text_bundle, tmp_path, task_identity):
    # Round 1 succeeds with 2 clients; then both misbehave... via a second run on the same store.
    reports, store, _ = run_rounds(text_bundle, tmp_path / "a", clients=2, rounds=1, min_clients=2)
    assert reports[0].ok
    good = store.load("population")
    from bitfit.sdk.fleet_client import make_client_app
    from bitfit.sdk.fleet_server import run_fleet

    files = write_clients(tmp_path / "b", 2)
    client = ClientSettings(bundle=str(text_bundle), data_files=tuple(files), misbehave="0:nan")
    settings = FleetSettings(bundle=str(text_bundle), store=str(store.root), clients=2, min_clients=2, rounds=2,
                             steps_per_round=3, learning_rate=0.05)
    failed = run_fleet(InProcessGrid(make_client_app(client), 2), settings)
    assert [r.ok for r in failed] == [False, False]
    assert "min_clients is 2; nothing saved" in failed[0].reason
    assert store.versions("population") == [1]
    for n, t in good.tensors.items():
        np.testing.assert_array_equal(store.load("population").tensors[n], t)


@pytest.mark.parametrize("side", ["server", "client"])
def test_dp_clips_adds_noise_weights_equally_and_reports_privacy(side, text_bundle, tmp_path, task_identity):
    reports, store, grid = run_rounds(text_bundle, tmp_path, clients=3, rounds=2, dp_noise=0.5, dp_clip=0.05,
                                      dp_side=side)
    assert [r.ok for r in reports] == [True, True]
    info = store.load("population").info
    assert info["privacy"]["noise_multiplier"] == 0.5 and info["privacy"]["clipping_norm"] == 0.05
    assert info["privacy"]["side"] == side
    pytest.importorskip("dp_accounting", reason="epsilon needs flwr[dp] (dp-accounting)")
    assert info["privacy"]["accountant"] == "rdp" and info["privacy"]["releases"] == 2
    assert np.isfinite(info["privacy"]["epsilon"]) and info["privacy"]["epsilon"] > reports[0].privacy["epsilon"]
    if side == "client":
        assert all("clipping_norm" in m.content["config"] for m in grid.sent if m.metadata.message_type == "train")


def test_dp_without_noise_clips_each_update_to_the_clipping_norm(text_bundle, tmp_path, task_identity):
    # Noise 0: the population moves by the mean of updates each clipped to norm 0.01, so at most 0.01.
    reports, store, _ = run_rounds(text_bundle, tmp_path, clients=3, rounds=1, dp_noise=0.0, dp_clip=0.01,
                                   learning_rate=0.5)
    assert reports[0].ok
    delta = store.load("population")
    norm = float(np.sqrt(sum(float(np.sum(t.astype(np.float64) ** 2)) for t in delta.tensors.values())))
    assert 0 < norm <= 0.01 + 1e-6


# ---------------------------------------------------------------------------- Flower's simulation engine

@pytest.mark.integration
def test_federate_simulate_cli_runs_rounds_on_the_simulation_engine(text_bundle, tmp_path):
    pytest.importorskip("ray", reason="the simulation engine needs flwr[simulation] (Ray)")
    write_clients(tmp_path / "data", 3)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bitfit.sdk.cli", "federate", "simulate", str(text_bundle), "--clients", "3",
           "--rounds", "2", "--data", str(tmp_path / "data"), "--out", str(out), "--steps-per-round", "3",
           "--min-clients", "2", "--misbehave", "2:crash"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    rounds = read_rounds(out)
    assert [r["ok"] for r in rounds] == [True, True]
    assert all(sorted(r["clients"]) == ["client0", "client1"] and len(r["dropped"]) == 1 for r in rounds)
    assert DeltaStore(out / "store").versions("population") == [1, 2]
    assert "round 2: population v2" in run.stdout


# ---------------------------------------------------------------------------- Flower's deployment engine

def _free_ports(count: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(count)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_for_port(port: int, seconds: float) -> bool:
    import socket

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.5)
    return False


@pytest.mark.integration
def test_deployment_engine_superlink_and_two_supernodes_run_two_rounds(text_bundle, tmp_path):
    """A real SuperLink and two SuperNodes on localhost run the generated app for two rounds."""
    import os

    from bitfit.sdk.fleet_run import write_app_project

    files = write_clients(tmp_path / "data", 2)
    store = tmp_path / "server" / "store"
    app = write_app_project(tmp_path / "app", {"bundle": str(text_bundle), "store": str(store), "num-server-rounds": 2,
                                               "clients": 2, "min-clients": 2, "steps-per-round": 3,
                                               "learning-rate": 0.05, "round-timeout": 120.0})
    # flwr 1.42 serves the Runtime, Control and Fleet APIs on one HTTP port (--host/--port).
    link, node0, node1 = _free_ports(3)
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "fleet"\n\n[superlink.fleet]\n'
                                      f'address = "127.0.0.1:{link}"\ninsecure = true\n', encoding="utf-8")
    bin_dir = Path(sys.executable).parent
    # The SuperLink and SuperNodes start flower-superexec / flwr-serverapp / flwr-clientapp from PATH.
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = []

    def start(name: str, *args: str) -> None:
        fh = open(logs / f"{name}.log", "w")
        procs.append((subprocess.Popen([str(bin_dir / args[0]), *args[1:]], stdout=fh, stderr=subprocess.STDOUT, env=env,
                                       cwd=tmp_path), fh))

    try:
        start("superlink", "flower-superlink", "--insecure", "--database", str(tmp_path / "link.db"),
              "--host", "127.0.0.1", "--port", str(link))
        assert _wait_for_port(link, 120), "the SuperLink did not open its port within 120s"
        for i, port in enumerate((node0, node1)):
            start(f"supernode{i}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                  "--host", "127.0.0.1", "--port", str(port),
                  "--node-config", f"partition-id={i} num-partitions=2 data-file='{files[i]}'")
        # `flwr run` submits the run and returns; the SuperLink runs it with the two SuperNodes.
        for attempt in range(3):  # a busy machine can be slow to serve the first request
            run = subprocess.run([str(bin_dir / "flwr"), "run", str(app), "fleet"], capture_output=True, text=True,
                                 env=env, timeout=120, cwd=tmp_path)
            if run.returncode == 0:
                break
            time.sleep(5)
        (logs / "flwr-run.log").write_text(run.stdout + run.stderr)
        deadline = time.monotonic() + 300
        while run.returncode == 0 and time.monotonic() < deadline and len(read_rounds(store.parent)) < 2:
            time.sleep(2)
    finally:
        for proc, fh in procs:
            proc.terminate()
        for proc, fh in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            fh.close()
    detail = "".join((logs / f).read_text()[-2000:] for f in ("flwr-run.log", "superlink.log", "supernode0.log"))
    rounds = read_rounds(store.parent)
    assert [r["ok"] for r in rounds] == [True, True], detail
    assert DeltaStore(store).versions("population") == [1, 2]
    assert sorted(DeltaStore(store).load("population").info["clients"]) == ["client0", "client1"]
