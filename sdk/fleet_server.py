"""The server side of a fleet: a Flower ServerApp that averages the devices' biases into a
population delta and saves one version per round.

Each round: Flower's FedAvg (``flwr.serverapp.strategy``) sends the current values to the
sampled devices; the replies are checked here **before** aggregation (:func:`check_update`:
tensor names and shapes, the base fingerprint, NaN/inf, the update's norm, a positive example
count) and a device that crashed, timed out or sent a bad update is dropped and logged; with at
least ``min_clients`` good updates the strategy aggregates them (weighted by ``num-examples``;
with differential privacy equal weights, clipping and Gaussian noise by Flower's DP wrappers),
the devices evaluate the result on their local holdouts, and it is saved into a ``DeltaStore``
as a new version of the population delta (relative to the base, with the round, the clients
and the metrics in its info). With fewer good updates the round fails: nothing is saved and the
next round starts again from the last good population.

The round loop is written out here (not ``strategy.start``) so that bad replies are dropped
before the strategy sees them, a failed round cannot replace the population, and every round
is saved as it ends. flwr is imported only inside the functions that need it.

Example:
    >>> import numpy as np
    >>> shapes = {"b": (2,)}
    >>> check_update({"b": np.array([0.1, np.nan], np.float32)}, "sha256:00", shapes=shapes,
    ...              fingerprint="sha256:00", current={"b": np.zeros(2, np.float32)}, max_norm=10.0)
    'non-finite values in b'
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .delta import Delta
from .errors import InvalidArgumentError, MissingDependencyError
from .fleet_client import EXAMPLES_KEY, UNIT_WEIGHT_KEY

log = logging.getLogger("bitfit.sdk.fleet")

DEFAULT_POPULATION = "population"
ROUNDS_FILE = "rounds.jsonl"


POPULATION_RETENTION = 1_000_000
"""Population versions the server's store keeps (all, in practice; each is ~100 KB)."""


@dataclass(frozen=True)
class FleetSettings:
    """How the server runs a fleet.

    Args:
        bundle: the bundle directory (the base model every device has).
        store: the DeltaStore directory the population versions are saved into.
        population: the population delta's name in the store.
        rounds: federated rounds.
        clients: devices to wait for before the first round (``min_available_nodes``).
        min_clients: good updates a round needs; fewer and the round fails (nothing saved).
        fraction: share of the connected devices sampled per round.
        steps_per_round: each device's step budget per round (``max_steps`` of ``Personalizer.fit``).
        seconds_per_round: each device's time budget per round (0: none).
        learning_rate: the devices' peak learning rate (0: the bundle's).
        round_timeout: seconds to wait for replies; a device that has not replied is dropped.
        max_update_norm: an update whose L2 distance from the values sent exceeds this is dropped.
        dp_noise: Gaussian noise multiplier (0: no differential privacy).
        dp_clip: clipping norm of each device's update (needed with ``dp_noise``).
        dp_side: where updates are clipped: ``"server"`` or ``"client"`` (Flower's ``fixedclipping_mod``).
        dp_delta: the delta at which the accountant reports epsilon.
        encoding: the population delta file's encoding (fp32: exactly what was averaged).
        resume: start from the store's current population (else from the base).
        out: a directory for ``rounds.jsonl`` (one JSON line per round); None: the store's parent.

    Example:
        >>> FleetSettings(bundle="b", store="s", rounds=2, clients=3).min_clients
        1
        >>> FleetSettings(bundle="b", store="s", dp_noise=1.0)
        Traceback (most recent call last):
        ...
        bitfit.sdk.errors.InvalidArgumentError: dp_noise needs dp_clip > 0 (the clipping norm the noise is calibrated to)
    """

    bundle: str
    store: str
    population: str = DEFAULT_POPULATION
    rounds: int = 3
    clients: int = 2
    min_clients: int = 1
    fraction: float = 1.0
    steps_per_round: int = 10
    seconds_per_round: float = 0.0
    learning_rate: float = 0.0
    round_timeout: float = 600.0
    max_update_norm: float = 100.0
    dp_noise: float = 0.0
    dp_clip: float = 0.0
    dp_side: Literal["server", "client"] = "server"
    dp_delta: float = 1e-5
    encoding: Literal["fp32", "fp16", "int8"] = "fp32"
    resume: bool = True
    out: str | None = None

    def __post_init__(self) -> None:
        problems = []
        for name, low in (("rounds", 1), ("clients", 1), ("min_clients", 1), ("steps_per_round", 1)):
            value = getattr(self, name)
            if type(value) is not int or value < low:
                problems.append(f"{name} must be an int >= {low}, got {value!r}")
        for name in ("round_timeout", "max_update_norm"):
            if not _positive(getattr(self, name)):
                problems.append(f"{name} must be a positive number, got {getattr(self, name)!r}")
        for name in ("seconds_per_round", "learning_rate", "dp_noise", "dp_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                problems.append(f"{name} must be a number >= 0, got {value!r}")
        if not isinstance(self.fraction, (int, float)) or not 0 < self.fraction <= 1:
            problems.append(f"fraction must be in (0, 1], got {self.fraction!r}")
        if self.dp_side not in ("server", "client"):
            problems.append(f"dp_side must be 'server' or 'client', got {self.dp_side!r}")
        if self.encoding not in ("fp32", "fp16", "int8"):
            problems.append(f"encoding must be fp32, fp16 or int8, got {self.encoding!r}")
        if not isinstance(self.population, str) or not self.population:
            problems.append(f"population must be a non-empty name, got {self.population!r}")
        if problems:
            raise InvalidArgumentError("; ".join(problems))
        if self.dp_noise > 0 and not self.dp_clip > 0:
            raise InvalidArgumentError("dp_noise needs dp_clip > 0 (the clipping norm the noise is calibrated to)")
        if type(self.clients) is int and type(self.min_clients) is int and self.min_clients > self.clients:
            raise InvalidArgumentError(f"min_clients ({self.min_clients}) cannot exceed clients ({self.clients})")

    @property
    def dp(self) -> bool:
        """Whether differential privacy is on (clipping with a clipping norm; noise when ``dp_noise`` > 0).

        Example:
            >>> FleetSettings(bundle="b", store="s", dp_clip=1.0).dp
            True
        """
        return self.dp_clip > 0

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "FleetSettings":
        """Settings from a deployed run's ``run_config`` (keys as in docs/fleet.md, dashes for underscores).

        Example:
            >>> FleetSettings.from_run_config({"bundle": "b", "store": "s", "num-server-rounds": 2}).rounds
            2
        """
        names = {f.name for f in cls.__dataclass_fields__.values()}  # type: ignore[attr-defined]
        given = {k.replace("-", "_"): v for k, v in run_config.items()}
        if "num_server_rounds" in given:
            given.setdefault("rounds", given.pop("num_server_rounds"))
        missing = [k for k in ("bundle", "store") if not given.get(k)]
        if missing:
            raise InvalidArgumentError(f"the run's config lacks {missing}: set them in [tool.flwr.app.config]")
        kwargs = {k: v for k, v in given.items() if k in names}
        for k in ("rounds", "clients", "min_clients", "steps_per_round"):
            if k in kwargs:
                kwargs[k] = int(kwargs[k])
        if "resume" in kwargs:
            kwargs["resume"] = str(kwargs["resume"]).lower() in ("1", "true", "yes")
        return cls(**kwargs)


@dataclass
class RoundReport:
    """What one round did: who took part, who was dropped and why, the metrics, what was saved.

    Example:
        >>> RoundReport(round=1, ok=False, reason="1 good update, min_clients is 2").as_dict()["ok"]
        False
    """

    round: int
    ok: bool
    reason: str = ""
    version: int | None = None
    clients: list[str] = field(default_factory=list)
    dropped: list[dict[str, str]] = field(default_factory=list)
    train_metrics: dict[str, float] = field(default_factory=dict)
    evaluate_metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    bytes_down_per_client: int = 0
    bytes_up_per_client: int = 0
    privacy: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-able values.

        Example:
            >>> RoundReport(round=2, ok=True, version=2).as_dict()["version"]
            2
        """
        return asdict(self)


def _positive(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def check_update(values: Mapping[str, np.ndarray], client_fingerprint: Any, *, shapes: Mapping[str, tuple[int, ...]],
                 fingerprint: str, current: Mapping[str, np.ndarray], max_norm: float,
                 examples: Any = 1.0) -> str | None:
    """Why a client's update cannot be averaged (None: it can).

    Refused: other tensor names or shapes than the bundle's trainable set, another base
    fingerprint, NaN/inf values, an L2 distance from the values sent (``current``) above
    ``max_norm``, and an example count that is not a positive finite number.

    Example:
        >>> import numpy as np
        >>> cur = {"b": np.zeros(2, np.float32)}
        >>> check_update({"b": np.ones(2, np.float32)}, "sha256:00", shapes={"b": (2,)}, fingerprint="sha256:00",
        ...              current=cur, max_norm=10.0) is None
        True
        >>> check_update({"b": np.ones(3, np.float32)}, "sha256:00", shapes={"b": (2,)}, fingerprint="sha256:00",
        ...              current=cur, max_norm=10.0)
        'shape of b is (3,), the bundle has (2,)'
        >>> check_update({"b": np.full(2, 100, np.float32)}, "sha256:00", shapes={"b": (2,)}, fingerprint="sha256:00",
        ...              current=cur, max_norm=10.0)
        'update norm 141.4 exceeds max_update_norm 10'
    """
    names, expected = set(values), set(shapes)
    if names != expected:
        extra, missing = sorted(names - expected), sorted(expected - names)
        return f"tensor names differ from the bundle's: unexpected {extra[:3]}, missing {missing[:3]}"
    if client_fingerprint != fingerprint:
        return f"trained on base {client_fingerprint!r}, the fleet's base is {fingerprint}"
    for name in sorted(shapes):
        if tuple(np.shape(values[name])) != tuple(shapes[name]):
            return f"shape of {name} is {tuple(np.shape(values[name]))}, the bundle has {tuple(shapes[name])}"
    bad = [n for n in sorted(values) if not np.all(np.isfinite(values[n]))]
    if bad:
        return f"non-finite values in {', '.join(bad[:3])}"
    if isinstance(examples, bool) or not isinstance(examples, (int, float)) or not math.isfinite(examples) or examples <= 0:
        return f"num-examples must be a positive number, got {examples!r}"
    norm = math.sqrt(sum(float(np.sum((np.asarray(values[n], np.float64) - np.asarray(current[n], np.float64)) ** 2))
                         for n in values))
    if norm > max_norm:
        return f"update norm {norm:.1f} exceeds max_update_norm {max_norm:g}"
    return None


def save_population(store: Any, name: str, values: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray],
                    fingerprint: str, info: Mapping[str, Any], encoding: str = "fp32") -> tuple[int, Delta]:
    """Save ``values`` (full trainable values) as a new version of the population delta ``name``,
    relative to ``base``; returns the version and the delta.

    Example:
        >>> import numpy as np, tempfile
        >>> from bitfit.sdk.store import DeltaStore
        >>> store = DeltaStore(tempfile.mkdtemp())
        >>> v, d = save_population(store, "population", {"b": np.ones(2, np.float32)}, {"b": np.zeros(2, np.float32)},
        ...                        "sha256:" + "0" * 64, {"round": 1})
        >>> v, store.load("population").info["round"], d.tensors["b"].tolist()
        (1, 1, [1.0, 1.0])
    """
    delta = Delta.from_params(values, base, fingerprint, encoding=encoding, info=dict(info))  # type: ignore[arg-type]
    return store.save(name, delta), delta


def _array_bytes(values: Mapping[str, np.ndarray]) -> int:
    return int(sum(np.asarray(v).nbytes for v in values.values()))


def _numbers(record: Any) -> dict[str, float]:
    return {k: float(v) for k, v in (record or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _make_strategy(settings: FleetSettings, sampled: int) -> tuple[Any, Any]:
    """Flower's FedAvg, wrapped for DP when asked; and the privacy accountant (None without one)."""
    from flwr.serverapp.strategy import (
        DifferentialPrivacyClientSideFixedClipping, DifferentialPrivacyServerSideFixedClipping, FedAvg,
    )

    # DP noise is calibrated for a plain mean: weight every client equally then.
    strategy = FedAvg(fraction_train=settings.fraction, fraction_evaluate=settings.fraction,
                      min_train_nodes=settings.min_clients, min_evaluate_nodes=settings.min_clients,
                      min_available_nodes=settings.clients,
                      weighted_by_key=UNIT_WEIGHT_KEY if settings.dp else EXAMPLES_KEY)
    if not settings.dp:
        return strategy, None
    accountant = _accountant(settings) if settings.dp_noise > 0 else None
    wrapper = (DifferentialPrivacyServerSideFixedClipping if settings.dp_side == "server"
               else DifferentialPrivacyClientSideFixedClipping)
    return wrapper(strategy, settings.dp_noise, settings.dp_clip, sampled, accountant=accountant), accountant


def _accountant(settings: FleetSettings) -> Any:
    """Flower's RDP accountant (needs ``dp-accounting``: ``flwr[dp]``); None, with a warning, without it."""
    try:
        from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        # Every connected device is sampled each round here, so no sampling amplification is claimed.
        return RdpAccountant(PrivacyConfig(target_delta=settings.dp_delta, population_size=settings.clients,
                                           neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                           sampling_method=SamplingMethod.NO_AMPLIFICATION))
    except ImportError as err:
        log.warning("no privacy accountant (%s): install flwr[dp] (dp-accounting) to have epsilon reported; "
                    "noise multiplier %g and clipping norm %g are applied regardless", err, settings.dp_noise,
                    settings.dp_clip)
        return None


def run_fleet(grid: Any, settings: FleetSettings, on_round: Callable[[RoundReport], None] | None = None) -> list[RoundReport]:
    """Run ``settings.rounds`` federated rounds over ``grid`` (a Flower Grid) and save each good
    round's population delta; returns one :class:`RoundReport` per round (also appended to
    ``rounds.jsonl``).

    Example:
        >>> reports = run_fleet(grid, FleetSettings(bundle="bundles/tiny", store="/tmp/fleet"))   # doctest: +SKIP
        >>> [r.version for r in reports]                                                          # doctest: +SKIP
        [1, 2, 3]
    """
    from flwr.app import Array, ArrayRecord, ConfigRecord

    from .bundle import Bundle
    from .population import load_population
    from .store import DeltaStore
    from .errors import DeltaNotFoundError

    bundle = Bundle.open(settings.bundle, verify="sizes")
    manifest = bundle.manifest
    base = bundle.trainable_base()
    shapes = {n: tuple(np.shape(v)) for n, v in base.items()}
    # Every population version stays: a user delta is applied on the version it was trained on
    # (bitfit.sdk.population), and pruning one would send those users back to the current one.
    store = DeltaStore(settings.store, retention=POPULATION_RETENTION)
    current = dict(base)
    if settings.resume:
        try:
            delta, ref = load_population(store, settings.population, manifest)
            current = delta.apply_to(base)
            log.info("fleet: resuming from %r v%d", ref.name, ref.version)
        except DeltaNotFoundError:
            pass
    out = Path(settings.out) if settings.out else Path(settings.store).parent
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / ROUNDS_FILE

    _wait_for_nodes(grid, settings.clients, settings.round_timeout)
    sampled = max(settings.min_clients, int(len(list(grid.get_node_ids())) * settings.fraction))
    strategy, accountant = _make_strategy(settings, sampled)
    train_config = {"max-steps": settings.steps_per_round, "max-seconds": float(settings.seconds_per_round),
                    "learning-rate": float(settings.learning_rate)}
    reports = []
    for server_round in range(1, settings.rounds + 1):
        started = time.perf_counter()
        arrays = ArrayRecord({k: Array(np.ascontiguousarray(v, np.float32)) for k, v in current.items()})
        report = RoundReport(round=server_round, ok=False, bytes_down_per_client=_array_bytes(current))
        try:
            messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(dict(train_config)), grid))
        except Exception as err:  # e.g. the privacy budget is spent
            report.reason = f"could not configure the round: {err}"
            _finish(report, started, log_path, reports, on_round)
            continue
        sent_to = {m.metadata.dst_node_id for m in messages}
        replies = list(grid.send_and_receive(messages, timeout=settings.round_timeout))
        good, names = [], []
        seen = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            seen.add(node)
            if reply.has_error():
                report.dropped.append({"node": str(node), "reason": f"error: {reply.error.reason}"[:300]})
                continue
            why, name = _check_reply(reply, shapes, manifest.base_fingerprint, current, settings.max_update_norm)
            if why:
                report.dropped.append({"node": str(node), "client": name, "reason": why})
                continue
            good.append(reply)
            names.append(name)
        for node in sorted(sent_to - seen):
            report.dropped.append({"node": str(node), "reason": f"no reply within {settings.round_timeout:g}s (timeout)"})
        for d in report.dropped:
            log.warning("fleet round %d: dropped client %s: %s", server_round, d.get("client", d["node"]), d["reason"])
        report.clients = names
        if len(good) < settings.min_clients:
            report.reason = f"{len(good)} good update(s), min_clients is {settings.min_clients}; nothing saved"
            _discard_privacy_event(strategy, server_round)
            _finish(report, started, log_path, reports, on_round)
            continue
        report.bytes_up_per_client = max(_array_bytes({k: v.numpy() for k, v in r.content["arrays"].items()})
                                         for r in good)
        if settings.dp and accountant is None:
            strategy.num_sampled_clients = len(good)  # the noise is calibrated to the clients averaged
        try:
            aggregated, train_metrics = strategy.aggregate_train(server_round, good)
        except Exception as err:
            aggregated, train_metrics = None, None
            report.reason = f"aggregation failed: {err}"
        if aggregated is None:
            report.reason = report.reason or ("the strategy refused to aggregate (with the privacy accountant every "
                                              "sampled client must send a good update)")
            _finish(report, started, log_path, reports, on_round)
            continue
        candidate = {k: np.asarray(v.numpy(), np.float32) for k, v in aggregated.items()}
        report.train_metrics = _numbers(train_metrics)
        report.train_metrics.pop(UNIT_WEIGHT_KEY, None)
        report.train_metrics["examples"] = float(sum(float(r.content["metrics"][EXAMPLES_KEY]) for r in good))
        report.evaluate_metrics = _evaluate(strategy, grid, server_round, candidate, settings)
        if accountant is not None:
            spent = accountant.get_privacy_spent()
            report.privacy = {"epsilon": spent.epsilon, "delta": spent.delta, "releases": spent.num_releases}
        if settings.dp:
            report.privacy.update({"noise_multiplier": settings.dp_noise, "clipping_norm": settings.dp_clip,
                                   "side": settings.dp_side, "accountant": "rdp" if accountant else None})
        info = {"round": server_round, "clients": names, "dropped": report.dropped, "train_metrics": report.train_metrics,
                "evaluate_metrics": report.evaluate_metrics, "privacy": report.privacy,
                "steps_per_round": settings.steps_per_round, "fleet": "flwr FedAvg"}
        try:
            report.version, delta = save_population(store, settings.population, candidate, base,
                                                    manifest.base_fingerprint, info, settings.encoding)
        except Exception as err:  # e.g. TrainingDivergedError from noise overflow, a full disk
            report.reason = f"could not save the population: {err}"
            _finish(report, started, log_path, reports, on_round)
            continue
        current = delta.apply_to(base)
        report.ok = True
        _finish(report, started, log_path, reports, on_round)
    return reports


def _check_reply(reply: Any, shapes: Mapping[str, tuple[int, ...]], fingerprint: str, current: Mapping[str, np.ndarray],
                 max_norm: float) -> tuple[str | None, str]:
    content = reply.content
    client = content.config_records.get("client")
    name = str(client.get("name", reply.metadata.src_node_id)) if client is not None else str(reply.metadata.src_node_id)
    if len(content.array_records) != 1 or "arrays" not in content.array_records or "metrics" not in content.metric_records:
        return "the reply lacks its 'arrays' ArrayRecord or 'metrics' MetricRecord", name
    try:
        values = {k: v.numpy() for k, v in content["arrays"].items()}
    except Exception as err:
        return f"unreadable arrays: {err}", name
    metrics = content["metrics"]
    return check_update(values, client.get("base-fingerprint") if client is not None else None, shapes=shapes,
                        fingerprint=fingerprint, current=current, max_norm=max_norm,
                        examples=metrics.get(EXAMPLES_KEY)), name


def _evaluate(strategy: Any, grid: Any, server_round: int, values: Mapping[str, np.ndarray],
              settings: FleetSettings) -> dict[str, float]:
    """The devices' holdout metrics of ``values`` (weighted by their holdout sizes); {} if none replied."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in values.items()})
    messages = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord({}), grid))
    replies = [r for r in grid.send_and_receive(messages, timeout=settings.round_timeout) if not r.has_error()
               and "metrics" in r.content.metric_records]
    if not replies:
        return {}
    keys = set.intersection(*(set(r.content["metrics"].keys()) for r in replies))
    weights = [float(r.content["metrics"].get(EXAMPLES_KEY, 0.0)) for r in replies]
    total = sum(weights) or float(len(replies))
    weights = weights if sum(weights) else [1.0] * len(replies)
    out = {k: sum(w * float(r.content["metrics"][k]) for w, r in zip(weights, replies)) / total
           for k in sorted(keys) if k not in (EXAMPLES_KEY, UNIT_WEIGHT_KEY)}
    out["clients"] = float(len(replies))
    out["examples"] = float(sum(weights))
    return out


def _discard_privacy_event(strategy: Any, server_round: int) -> None:
    # An accounted DP wrapper books an event per configured round; a failed round released nothing.
    pending = getattr(strategy, "_pending_events", None)
    if isinstance(pending, dict):
        pending.pop(server_round, None)


def _wait_for_nodes(grid: Any, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < count and time.monotonic() < deadline:
        time.sleep(0.5)


def _finish(report: RoundReport, started: float, log_path: Path, reports: list, on_round: Any) -> None:
    report.seconds = round(time.perf_counter() - started, 3)
    if report.ok:
        log.info("fleet round %d: population v%s from %d clients (%s) in %.1fs", report.round, report.version,
                 len(report.clients), ", ".join(report.clients), report.seconds)
    else:
        log.warning("fleet round %d failed: %s", report.round, report.reason)
    with open(log_path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(report.as_dict()) + "\n")
    reports.append(report)
    if on_round is not None:
        on_round(report)


def read_rounds(out: str | os.PathLike) -> list[dict[str, Any]]:
    """The round reports a fleet run wrote to ``OUT/rounds.jsonl``.

    Example:
        >>> import tempfile
        >>> read_rounds(tempfile.mkdtemp())
        []
    """
    path = Path(out) / ROUNDS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def make_server_app(settings: FleetSettings | None = None,
                    on_round: Callable[[RoundReport], None] | None = None) -> Any:
    """The Flower ServerApp (Message API) of a fleet; needs ``flwr`` (``pip install 'bitfit[fleet]'``).

    ``settings`` None: they come from the run's ``run_config`` (:meth:`FleetSettings.from_run_config`),
    as in a deployed app.

    Example:
        >>> app = make_server_app(FleetSettings(bundle="bundles/tiny", store="/tmp/fleet/store"))   # doctest: +SKIP
        >>> type(app).__name__                                                                     # doctest: +SKIP
        'ServerApp'
    """
    try:
        from flwr.serverapp import ServerApp
    except ImportError as err:
        raise MissingDependencyError(f"a fleet server needs flwr: pip install 'bitfit[fleet]' ({err})") from err

    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        s = settings or FleetSettings.from_run_config(dict(context.run_config))
        run_fleet(grid, s, on_round)

    return app


__all__ = ["DEFAULT_POPULATION", "FleetSettings", "RoundReport", "check_update", "make_server_app", "read_rounds",
           "run_fleet", "save_population"]
