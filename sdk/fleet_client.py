"""The device side of a fleet: a Flower ClientApp that trains the population's biases on local data.

Each round the server sends the current population values (the trainable tensors in full,
base + population, as FedAvg averages full values); the client trains them on its own data
with the SDK's training code (``Personalizer.fit``, the code ``personalize`` runs) within the
round's step/time budget and returns the trained values with its example count. Asked to
evaluate, it scores the values it is sent on a local holdout that it never trains on. No
torch: numpy and onnxruntime, like the rest of ``bitfit.sdk``; flwr is imported only inside
:func:`make_client_app`, so this module imports without it.

Settings come from a :class:`ClientSettings` (simulation: built by ``bitfit federate
simulate``) or from the Flower run's ``run_config`` / the SuperNode's ``node_config``
(deployment: :meth:`ClientSettings.from_context`); docs/fleet.md lists the keys.

Example:
    >>> s = ClientSettings(bundle="bundles/tiny", data_files=("a.jsonl", "b.jsonl"), misbehave="1:nan")
    >>> s.misbehavior(1), s.misbehavior(0)
    ('nan', None)
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .data import normalize_records
from .delta import Delta
from .errors import InvalidArgumentError, InvalidUserDataError, MissingDependencyError

log = logging.getLogger("bitfit.sdk.fleet")

MISBEHAVIORS = ("crash", "timeout", "names", "shapes", "fingerprint", "nan", "inf", "norm")
"""How a client told to misbehave (tests, drills) spoils its reply: raise, sleep past the
round's timeout, rename a tensor, drop a value, claim another base model, send NaN, send inf,
or send an update of absurd norm."""
DATA_SUFFIXES = (".jsonl", ".csv")
UNIT_WEIGHT_KEY = "unit-weight"
"""A MetricRecord key every client sets to 1: what FedAvg weights by when DP wants equal weights."""
EXAMPLES_KEY = "num-examples"


@dataclass(frozen=True)
class ClientSettings:
    """What a fleet client needs to know besides the round's message.

    Args:
        bundle: the bundle directory (the same base model as the server's).
        data_files: one labelled data file per client (``.jsonl``/``.csv``, as ``personalize``
            reads them); client ``partition-id`` i reads file i. Empty: the node's
            ``data-file`` (deployment).
        eval_fraction: the share of each client's examples kept aside for evaluation (never trained on).
        threads: onnxruntime threads per client.
        seed: seeds the evaluation split and training.
        misbehave: ``"ID:KIND,ID:KIND"``: clients (by partition id) that spoil their replies
            on purpose, one of :data:`MISBEHAVIORS` (tests and drills only).
        misbehave_sleep: seconds a ``timeout`` client sleeps.
        verify: how the bundle's files are checked on opening (``"sizes"``: fast, every round reuses it).

    Example:
        >>> ClientSettings(bundle="b", data_files=("x.jsonl",)).eval_fraction
        0.2
    """

    bundle: str
    data_files: tuple[str, ...] = ()
    eval_fraction: float = 0.2
    threads: int | None = 1
    seed: int = 0
    misbehave: str = ""
    misbehave_sleep: float = 30.0
    verify: str = "sizes"
    _bad: dict[int, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.bundle, (str, os.PathLike)) or not str(self.bundle):
            raise InvalidArgumentError(f"bundle must be a bundle directory, got {self.bundle!r}")
        if isinstance(self.eval_fraction, bool) or not isinstance(self.eval_fraction, (int, float)) \
                or not 0 <= self.eval_fraction < 1:
            raise InvalidArgumentError(f"eval_fraction must be in [0, 1), got {self.eval_fraction!r}")
        self._bad.update(parse_misbehave(self.misbehave))

    @classmethod
    def from_context(cls, run_config: dict[str, Any], node_config: dict[str, Any]) -> "ClientSettings":
        """Settings from a deployed run's ``run_config`` and the SuperNode's ``node_config``.

        ``run_config``: ``bundle`` (required), ``eval-fraction``, ``threads``, ``seed``,
        ``misbehave``, ``misbehave-sleep``; ``node_config``: ``data-file`` (this device's data) or
        ``data-dir`` (then file ``partition-id`` of its sorted data files).

        Example:
            >>> ClientSettings.from_context({"bundle": "b"}, {"data-file": "me.jsonl"}).data_files
            ('me.jsonl',)
        """
        if not run_config.get("bundle"):
            raise InvalidArgumentError("the run's config has no 'bundle': set it in the app's pyproject.toml "
                                       "[tool.flwr.app.config] or with `flwr run --run-config \"bundle='DIR'\"`")
        data_file = node_config.get("data-file")
        data_dir = node_config.get("data-dir") or run_config.get("data-dir")
        files: tuple[str, ...] = ()
        if data_file:
            files = (str(data_file),)
        elif data_dir:
            files = tuple(str(p) for p in data_files(data_dir))
        threads = int(run_config.get("threads", 1)) or None
        return cls(bundle=str(run_config["bundle"]), data_files=files,
                   eval_fraction=float(run_config.get("eval-fraction", 0.2)), threads=threads,
                   seed=int(run_config.get("seed", 0)), misbehave=str(run_config.get("misbehave", "")),
                   misbehave_sleep=float(run_config.get("misbehave-sleep", 30.0)))

    def misbehavior(self, partition: int) -> str | None:
        """How client ``partition`` misbehaves (None: it behaves).

        Example:
            >>> ClientSettings(bundle="b", misbehave="0:crash").misbehavior(0)
            'crash'
        """
        return self._bad.get(int(partition))

    def data_file(self, partition: int) -> str:
        """The data file of client ``partition``.

        Example:
            >>> ClientSettings(bundle="b", data_files=("a.jsonl", "b.jsonl")).data_file(1)
            'b.jsonl'
        """
        if len(self.data_files) == 1:
            return self.data_files[0]
        if not 0 <= partition < len(self.data_files):
            raise InvalidArgumentError(f"client {partition} has no data file: {len(self.data_files)} files were given "
                                       "(one per client)")
        return self.data_files[partition]


def parse_misbehave(text: str) -> dict[int, str]:
    """``"1:nan,3:crash"`` -> ``{1: "nan", 3: "crash"}``, checked against :data:`MISBEHAVIORS`.

    Example:
        >>> parse_misbehave("1:nan, 3:crash")
        {1: 'nan', 3: 'crash'}
        >>> parse_misbehave("1:sulk")
        Traceback (most recent call last):
        ...
        bitfit.sdk.errors.InvalidArgumentError: misbehave entry '1:sulk': the kind must be one of crash, timeout, names, shapes, fingerprint, nan, inf, norm
    """
    out: dict[int, str] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        ident, _, kind = part.partition(":")
        if not ident.strip().isdigit():
            raise InvalidArgumentError(f"misbehave entry {part!r}: expected CLIENT_ID:KIND, e.g. 1:nan")
        if kind.strip() not in MISBEHAVIORS:
            raise InvalidArgumentError(f"misbehave entry {part!r}: the kind must be one of {', '.join(MISBEHAVIORS)}")
        out[int(ident)] = kind.strip()
    return out


def data_files(directory: str | os.PathLike) -> list[Path]:
    """The data files of a directory (``.jsonl``/``.csv``), sorted by name: one per client.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> for name in ("b.csv", "a.jsonl", "notes.txt"): _ = (d / name).write_text("")
        >>> [p.name for p in data_files(d)]
        ['a.jsonl', 'b.csv']
    """
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise InvalidArgumentError(f"{root} is not a directory: pass a directory with one .jsonl or .csv file per client")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    if not files:
        raise InvalidUserDataError(f"{root} holds no .jsonl or .csv data files: write one per client")
    return files


def split_local(records: list[tuple[Any, Any]], eval_fraction: float, seed: int) -> tuple[list, list]:
    """A client's examples as (train, evaluation holdout), the same split every round.

    Example:
        >>> train, held = split_local([(f"t{i}", "a") for i in range(10)], 0.2, seed=0)
        >>> len(train), len(held)
        (8, 2)
    """
    if len(records) < 2:
        raise InvalidUserDataError(f"a fleet client needs at least 2 examples, it has {len(records)}")
    order = np.random.default_rng(seed).permutation(len(records))
    held = min(len(records) - 1, math.ceil(len(records) * eval_fraction)) if eval_fraction > 0 else 0
    return [records[i] for i in order[held:]], [records[i] for i in order[:held]]


@dataclass(frozen=True)
class LocalUpdate:
    """What one client's round of training produced.

    Example:
        >>> u = LocalUpdate({"b": np.zeros(2, np.float32)}, examples=10, steps=5, seconds=0.1, loss=0.7)
        >>> u.metrics()["num-examples"]
        10.0
    """

    values: dict[str, np.ndarray]
    examples: int
    steps: int
    seconds: float
    loss: float

    def metrics(self) -> dict[str, float]:
        """The MetricRecord a client replies with: example count, a unit weight, steps, seconds, loss.

        Example:
            >>> sorted(LocalUpdate({}, 3, 1, 0.5, 0.2).metrics())
            ['num-examples', 'train-loss', 'train-seconds', 'train-steps', 'unit-weight']
        """
        return {EXAMPLES_KEY: float(self.examples), UNIT_WEIGHT_KEY: 1.0, "train-steps": float(self.steps),
                "train-seconds": float(self.seconds), "train-loss": float(self.loss)}


def train_update(personalizer: Any, records: list, start: dict[str, np.ndarray], *, max_steps: int | None = None,
                 max_seconds: float | None = None, learning_rate: float | None = None, holdout: float = 0.0,
                 seed: int = 0) -> LocalUpdate:
    """Train ``start`` on ``records`` with ``Personalizer.fit`` (the code ``personalize`` runs) and
    return the trained values; nothing is saved on the device.

    Example:
        >>> from bitfit.sdk import Personalizer
        >>> p = Personalizer("bundles/tiny", store=tempfile.mkdtemp())                      # doctest: +SKIP
        >>> u = train_update(p, [("good", "positive"), ("bad", "negative")], p.base_trainable, max_steps=3)  # doctest: +SKIP
        >>> u.steps, u.examples                                                              # doctest: +SKIP
        (3, 2)
    """
    started = time.perf_counter()
    fit = personalizer.fit(records, start={k: np.asarray(v, np.float32) for k, v in start.items()}, user="fleet",
                           max_steps=max_steps, max_seconds=max_seconds, learning_rate=learning_rate,
                           holdout=holdout, seed=seed, progress_bar=False)
    history = [loss for _, loss in fit.outcome.history] if fit.outcome.history and isinstance(
        fit.outcome.history[0], (tuple, list)) else list(fit.outcome.history or [])
    loss = float(fit.metrics_after.get("loss", history[-1] if history else float("nan")))
    return LocalUpdate(values=fit.values, examples=fit.train_examples + fit.holdout_examples,
                       steps=int(fit.outcome.steps), seconds=time.perf_counter() - started,
                       loss=loss if math.isfinite(loss) else -1.0)


class ValuesEvaluator:
    """Scores given trainable values on labelled data with ``Personalizer.evaluate``: the values
    go into a private scratch store as a delta relative to the base (fp32, exact).

    Example:
        >>> ev = ValuesEvaluator("bundles/tiny")                                     # doctest: +SKIP
        >>> ev.evaluate([("good", "positive")], ev.personalizer.base_trainable)["accuracy"]   # doctest: +SKIP
        1.0
    """

    def __init__(self, bundle: Any, *, threads: int | None = 1, verify: str = "sizes") -> None:
        from .personalizer import Personalizer

        self._scratch = tempfile.TemporaryDirectory(prefix="bitfit-fleet-eval-")
        self.personalizer = Personalizer(bundle, self._scratch.name, threads=threads, verify=verify)
        self._user = "fleet-values"

    def evaluate(self, records: Any, values: dict[str, np.ndarray] | None) -> dict[str, float]:
        """The task's metrics (and loss) of ``values`` (None: the base) on ``records``.

        Example:
            >>> ev.evaluate("held.jsonl", None)                                      # doctest: +SKIP
            {'loss': 0.69, 'accuracy': 0.5, 'macro_f1': 0.33, 'examples': 20.0}
        """
        p = self.personalizer
        if values is None:
            return p.evaluate(records, user=None)
        manifest = p.bundle.manifest
        delta = Delta.from_params(values, p.base_trainable, manifest.base_fingerprint, encoding="fp32")
        p.store.save(self._user, delta)
        p.predictor.invalidate(self._user)
        return p.evaluate(records, user=self._user)


class _Device:
    """One client's opened bundle, data split and evaluator, kept across rounds in this process."""

    def __init__(self, settings: ClientSettings, partition: int) -> None:
        self.partition = partition
        self.path = settings.data_file(partition)
        records = normalize_records(self.path)
        self.train, self.held = split_local(records, settings.eval_fraction, settings.seed + partition)
        self.evaluator = ValuesEvaluator(settings.bundle, threads=settings.threads, verify=settings.verify)
        self.personalizer = self.evaluator.personalizer
        self.name = Path(self.path).stem


_DEVICES: dict[tuple[Any, ...], _Device] = {}


def _device(settings: ClientSettings, partition: int) -> _Device:
    key = (settings.bundle, settings.data_file(partition), settings.eval_fraction, settings.seed, partition)
    if key not in _DEVICES:
        _DEVICES[key] = _Device(settings, partition)
    return _DEVICES[key]


def spoil(values: dict[str, np.ndarray], kind: str | None) -> dict[str, np.ndarray]:
    """``values`` as a misbehaving client would send them (``kind`` from :data:`MISBEHAVIORS`).

    Example:
        >>> spoil({"b": np.zeros(2, np.float32)}, "nan")["b"].tolist()
        [nan, 0.0]
        >>> sorted(spoil({"b": np.zeros(2, np.float32)}, "names"))
        ['b.renamed']
    """
    out = {k: np.array(v, np.float32, copy=True) for k, v in values.items()}
    first = sorted(out)[0]
    if kind == "names":
        out[first + ".renamed"] = out.pop(first)
    elif kind == "shapes":
        out[first] = out[first].reshape(-1)[:-1] if out[first].size > 1 else np.zeros(2, np.float32)
    elif kind in ("nan", "inf"):
        out[first].reshape(-1)[0] = np.nan if kind == "nan" else np.inf
    elif kind == "norm":
        out[first] = out[first] + np.float32(1e6)
    return out


def make_client_app(settings: ClientSettings | None = None) -> Any:
    """The Flower ClientApp (Message API) of a fleet device; needs ``flwr`` (``pip install 'bitfit[fleet]'``).

    ``settings`` None: each message's settings come from the run's ``run_config`` and the
    SuperNode's ``node_config`` (:meth:`ClientSettings.from_context`), as in a deployed app.
    A train message carries ``arrays`` (the current values) and a ``config`` with
    ``max-steps``, ``max-seconds``, ``learning-rate`` (0: the bundle's) and ``server-round``;
    the reply carries the trained values, a MetricRecord (``num-examples``, ``unit-weight``,
    ``train-steps``, ``train-seconds``, ``train-loss``) and a ConfigRecord ``client`` naming the
    client and its base fingerprint. With client-side DP the server's clipping norm is applied
    by Flower's ``fixedclipping_mod``.

    Example:
        >>> app = make_client_app(ClientSettings(bundle="bundles/tiny", data_files=("a.jsonl",)))  # doctest: +SKIP
        >>> type(app).__name__                                                                      # doctest: +SKIP
        'ClientApp'
    """
    try:
        from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
        from flwr.clientapp import ClientApp
        from flwr.clientapp.mod import fixedclipping_mod
        from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
    except ImportError as err:
        raise MissingDependencyError(f"a fleet client needs flwr: pip install 'bitfit[fleet]' ({err})") from err

    def clip_if_asked(msg: Any, ctxt: Any, call_next: Any) -> Any:
        # Flower's mod refuses messages without a clipping norm: use it only when the server asks.
        config = msg.content.config_records.get("config")
        if msg.metadata.message_type.startswith("train") and config is not None and KEY_CLIPPING_NORM in config:
            return fixedclipping_mod(msg, ctxt, call_next)
        return call_next(msg, ctxt)

    app = ClientApp(mods=[clip_if_asked])

    def resolve(context: Any) -> tuple[ClientSettings, _Device]:
        s = settings or ClientSettings.from_context(dict(context.run_config), dict(context.node_config))
        partition = int(context.node_config.get("partition-id", 0))
        return s, _device(s, partition)

    @app.train()
    def train(msg: Any, context: Any) -> Any:
        s, device = resolve(context)
        kind = s.misbehavior(device.partition)
        config = msg.content["config"]
        server_round = int(config.get("server-round", 0))
        if kind == "crash":
            raise RuntimeError(f"client {device.partition} crashes on purpose (misbehave={kind})")
        if kind == "timeout":
            time.sleep(s.misbehave_sleep)
        start = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        rate = float(config.get("learning-rate", 0.0)) or None
        update = train_update(device.personalizer, device.train, start,
                              max_steps=int(config.get("max-steps", 0)) or None,
                              max_seconds=float(config.get("max-seconds", 0.0)) or None, learning_rate=rate,
                              holdout=float(config.get("fit-holdout", 0.0)), seed=s.seed + 1000 * server_round + device.partition)
        values = spoil(update.values, kind)
        ordered = [k for k in start if k in values] + [k for k in values if k not in start]
        fingerprint = device.personalizer.bundle.manifest.base_fingerprint
        if kind == "fingerprint":
            fingerprint = "sha256:" + "f" * 64
        log.info("client %s round %d: %d steps on %d examples in %.1fs", device.name, server_round, update.steps,
                 update.examples, update.seconds)
        content = RecordDict({
            "arrays": ArrayRecord({k: Array(np.ascontiguousarray(values[k])) for k in ordered}),
            "metrics": MetricRecord(update.metrics()),
            "client": ConfigRecord({"name": device.name, "base-fingerprint": fingerprint,
                                    "partition-id": device.partition}),
        })
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Any, context: Any) -> Any:
        s, device = resolve(context)
        if s.misbehavior(device.partition) == "crash":
            raise RuntimeError(f"client {device.partition} crashes on purpose")
        values = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        metrics = device.evaluator.evaluate(device.held, values) if device.held else {"loss": 0.0, "examples": 0.0}
        record = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not k.startswith("f1/")}
        record[EXAMPLES_KEY] = float(len(device.held))
        record[UNIT_WEIGHT_KEY] = 1.0
        return Message(content=RecordDict({"metrics": MetricRecord(record)}), reply_to=msg)

    return app


__all__ = ["ClientSettings", "LocalUpdate", "ValuesEvaluator", "MISBEHAVIORS", "data_files", "make_client_app",
           "parse_misbehave", "spoil", "split_local", "train_update"]
