"""``make quality`` (``python -m benchmarks.quality [--quick]``): per-user accuracy of the SDK
*with its defaults* against tuned PyTorch baselines, on real data, side by side in one run.

Users and base models are :mod:`benchmarks.quality_users`: the demo's tweet domains on the
demo's base, SMS users with different spam shares on a spam base, and the same SMS users on
a non-text bundle (an MLP over hashed bag-of-words features). Per user, on the user's own
train examples, scored by accuracy on the user's separate test examples:

- ``base``: the suite's base model, untouched (through the SDK's predictor);
- ``sdk``: ``Personalizer(bundle, store).personalize(train, user=...)`` with **no** tuning
  argument (the SDK's defaults, whatever they are when this runs); its seconds count opening
  the Personalizer (loading the bundle) and the whole ``personalize`` call;
- ``torch-head``, ``torch-bitfit``, ``torch-full``: PyTorch with AdamW as the bundle's optimizer
  runs it (:mod:`benchmarks.torch_recipes`), ``EPOCHS`` epochs of batches of ``BATCH_SIZE``,
  the SDK's tokenization and batches (``bitfit.sdk.data``); seconds count loading the base
  model from disk, preparing the data and training (head-only: embedding the train examples
  once, then the head on the cached embeddings).

Honest grids: each torch method's learning rate is chosen per suite by the *mean* test
accuracy over the suite's ``tuning`` users, from a grid on a half-decade scale (1e-3, 3e-3,
1e-2, ...); when the best value sits at an edge of the grid, the grid is extended on that
side, automatically, until it does not (or ``max_extensions`` is reached, which the report
says). That value is then applied to the ``held-aside`` users, which nothing was tuned on.
The targets are judged on the held-aside users only:

1. SDK defaults >= tuned PyTorch BitFit on every held-aside user, within one standard error
   of BitFit's mean accuracy there: ``sqrt(p (1 - p) / n + sd^2 / SEEDS)``, the test set's
   binomial error plus the spread between training seeds;
2. SDK defaults' mean gain over the base >= 95% of tuned full fine-tuning's mean gain;
3. SDK wall time <= 0.6x PyTorch BitFit's on every held-aside user, both timed in this run.

Every method runs ``SEEDS`` times per user at its chosen rate (the seeds shuffle the batches)
and a user's accuracy is the mean: one run's accuracy moves by several points between seeds.

Torch results (and their seconds) are cached in ``benchmarks/_work/quality/cache.json``,
keyed by the base model, the user's data, the method, the learning rate, the seed and the
recipe, so a rerun after the SDK's defaults changed re-runs only the SDK column and PyTorch
BitFit's runs at its chosen rate (those are always run again, alternating with the SDK's, so
the time ratio is measured side by side). The bases are cached
too (``quality_users.prepare_base``; bundles are re-exported when ``export/`` changes).

Outputs: a section of ``BENCHMARKS.md`` (between ``<!-- quality:begin -->`` and
``<!-- quality:end -->``; ``make bench`` keeps it), ``benchmarks/quality.png`` and
``benchmarks/_work/quality.json`` (``--quick``: ``benchmarks/_work/quality-quick.*``, no
BENCHMARKS.md change).

Tuning the SDK's defaults: :func:`sdk_tuning_check` runs only the SDK column on the TUNING
users (the torch BitFit grid comes from the cache, computed once if missing) and prints,
per user, the SDK's accuracy against tuned PyTorch BitFit's::

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.quality --sdk-tuning-check [--quick]

or, from Python (returns the rows)::

    >>> from benchmarks.quality import sdk_tuning_check
    >>> rows = sdk_tuning_check()                                                     # doctest: +SKIP
    >>> sorted(rows[0])                                                               # doctest: +SKIP
    ['base', 'bitfit_lr', 'bitfit_seconds', 'diff', 'sdk', 'sdk_seconds', 'se', 'suite', 'torch-bitfit', 'user']

Example:
    >>> from benchmarks.quality import lr_value, choose
    >>> [lr_value(k) for k in (-6, -5, -4)]
    [0.001, 0.003, 0.01]
    >>> choose({-6: 0.70, -5: 0.75, -4: 0.75})     # ties: the one nearest the grid's middle
    -5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .quality_users import Base, QualityUser, Suite, full_suites, prepare_base, quick_suites, tiny_suites

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
WORK = HERE / "_work"
METHODS = ("base", "sdk", "torch-head", "torch-bitfit", "torch-full")
TORCH_METHODS = ("torch-head", "torch-bitfit", "torch-full")
EPOCHS = 3
BATCH_SIZE = 16
SEED = 0
SEEDS = 3
"""Training runs per user and method at the chosen learning rate (seeds ``SEED`` .. ``SEED + SEEDS - 1``,
which shuffle the batches): a per-user accuracy is their mean. One run's accuracy moved by up to
0.06 between two seeds on a 150-tweet user, more than the test set's binomial error."""
RECIPE = 1  # bump when the torch recipe below changes: the cached torch results are then recomputed
BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"
TIME_RATIO_TARGET = 0.6
GAIN_SHARE_TARGET = 0.95


def lr_value(k: int) -> float:
    """The learning rate at grid index ``k``: 1e-3 at -6, 3e-3 at -5, 1e-2 at -4 (half-decades).

    Example:
        >>> lr_value(-10), lr_value(-9)
        (1e-05, 3e-05)
    """
    return float(f"{1 if k % 2 == 0 else 3}e{k // 2}")


@dataclass
class Grids:
    """The initial grid (indices for :func:`lr_value`) of each torch method, per architecture.

    Example:
        >>> [lr_value(k) for k in FULL_GRIDS.initial["minilm"]["torch-full"]]
        [3e-05, 0.0001, 0.0003]
    """

    initial: dict[str, dict[str, list[int]]]
    max_extensions: int = 4


FULL_GRIDS = Grids({
    "minilm": {"torch-head": [-6, -5, -4, -3], "torch-bitfit": [-7, -6, -5], "torch-full": [-9, -8, -7]},
    "bow-mlp": {"torch-head": [-6, -5, -4, -3], "torch-bitfit": [-6, -5, -4, -3], "torch-full": [-7, -6, -5, -4]},
    "tiny": {"torch-head": [-4, -3], "torch-bitfit": [-4, -3], "torch-full": [-5, -4]},
})
QUICK_GRIDS = Grids({
    "minilm": {"torch-head": [-5, -4, -3], "torch-bitfit": [-6, -5, -4], "torch-full": [-10, -9, -8]},
    "bow-mlp": {"torch-head": [-5, -4, -3], "torch-bitfit": [-5, -4, -3], "torch-full": [-6, -5, -4]},
    "tiny": {"torch-head": [-4, -3], "torch-bitfit": [-4, -3], "torch-full": [-5, -4]},
}, max_extensions=2)
LR_LIMITS = (-16, 0)  # 1e-8 .. 1: a grid never extends past these


def choose(scores: dict[int, float]) -> int:
    """The grid index with the best score; among ties, the one nearest the grid's middle.

    Example:
        >>> choose({-6: 0.5, -5: 0.9, -4: 0.8}), choose({-6: 0.9, -5: 0.5})
        (-5, -6)
    """
    ks = sorted(scores)
    best = max(scores.values())
    tied = [k for k in ks if scores[k] >= best - 1e-12]
    middle = (ks[0] + ks[-1]) / 2
    return min(tied, key=lambda k: (abs(k - middle), k))


def tune_grid(score: Callable[[int], float], initial: Sequence[int], max_extensions: int = 4) -> dict[str, Any]:
    """Score every grid value (``score(k)``: the mean over the tuning users), then extend the
    grid on the side where the best value sits while it sits at an edge.

    Returns ``grid`` (indices), ``lrs``, ``scores`` (lr -> mean score), ``chosen`` (lr),
    ``extended`` (the indices added) and ``at_edge`` (still at an edge after ``max_extensions``).

    Example:
        >>> r = tune_grid(lambda k: -abs(k + 9), [-6, -5], max_extensions=5)   # best at 3e-5
        >>> r["chosen"], [lr_value(k) for k in r["extended"]], r["at_edge"]
        (3e-05, [0.0003, 0.0001, 3e-05, 1e-05], False)
    """
    ks = sorted(set(initial))
    scores = {k: score(k) for k in ks}
    extended: list[int] = []
    while True:
        best = choose(scores)
        if best == ks[0]:
            nxt = ks[0] - 1
        elif best == ks[-1]:
            nxt = ks[-1] + 1
        else:
            break
        if len(extended) >= max_extensions or not LR_LIMITS[0] <= nxt <= LR_LIMITS[1]:
            break
        scores[nxt] = score(nxt)
        extended.append(nxt)
        ks = sorted(scores)
    best = choose(scores)
    return {"grid": ks, "lrs": [lr_value(k) for k in ks], "scores": {lr_value(k): scores[k] for k in ks},
            "chosen": lr_value(best), "chosen_index": best, "initial": [lr_value(k) for k in sorted(set(initial))],
            "extended": extended, "at_edge": best in (ks[0], ks[-1]) and len(ks) > 1}


# ----------------------------------------------------------------------------- one run


class Cache:
    """Torch results on disk (JSON), keyed by everything that decides them.

    Example:
        >>> c = Cache(Path(tempfile.mkdtemp()) / "cache.json")
        >>> c.get("k") is None, c.put("k", {"accuracy": 0.5}), c.get("k")
        (True, None, {'accuracy': 0.5})
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.data: dict[str, Any] = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}
        self.computed = 0
        self.reused = 0

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored result for ``key``, or None.

        Example:
            >>> Cache(Path("/nonexistent/cache.json")).get("x") is None
            True
        """
        return self.data.get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        """Store a result and write the file (atomically: a killed run keeps what it had).

        Example:
            >>> Cache(Path(tempfile.mkdtemp()) / "c.json").put("k", {"accuracy": 1.0})
        """
        self.data[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=0, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.path)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Any:
    """torch's intra-op threads set to ``threads`` inside the block (None: left as they are).

    Example:
        >>> import torch
        >>> before = torch.get_num_threads()
        >>> with torch_threads(1):
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == before
        True
    """
    import torch

    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Session:
    """One suite's base, bundle and per-user data, with the torch runs' cache.

    Example:
        >>> s = Session(prepare_base(tiny_suites()[0], Path("/tmp/q")), Cache(Path("/tmp/q/c.json")))   # doctest: +SKIP
        >>> 0 <= s.torch(s.base.suite.users[0], "torch-bitfit", 1e-3)["accuracy"] <= 1                    # doctest: +SKIP
        True
    """

    def __init__(self, base: Base, cache: Cache, log: Callable[[str], None] = print):
        from bitfit.sdk.data import TextEncoder

        self.base, self.cache, self.log = base, cache, log
        self.suite = base.suite
        self.bundle = base.bundle
        self.encoder = TextEncoder(self.bundle) if self.bundle.manifest.text else None
        self.bias_names = [t.name for t in self.bundle.manifest.trainable]
        self._embedded: dict[str, dict[str, Any]] = {}
        # PyTorch gets the SDK's thread rule (bitfit.sdk.options.session_threads): one thread for a
        # model under 1 M values. With torch's default two threads and OMP_WAIT_POLICY=PASSIVE
        # (set for this run, see main), every small op wakes a sleeping OpenMP thread: the MLP's
        # whole BitFit run took ~19-20 ms instead of ~9 ms on one thread (/tmp study, 2026-12-02),
        # which made the SDK look 0.56x-0.67x as fast when it is ~1.2x as slow.
        from bitfit.sdk.training_plan import is_small_model

        self.torch_threads: int | None = 1 if is_small_model(self.bundle.manifest.total_values) else None

    def _examples(self, pairs: list[tuple[str, str]]) -> Any:
        from bitfit.sdk.data import load_examples

        return load_examples(self.suite.user_data(pairs), self.bundle, self.encoder)

    def _key(self, user: QualityUser, method: str, lr: float, seed: int = SEED) -> str:
        return json.dumps({"base": self.base.key, "user": user.fingerprint(), "method": method, "lr": lr,
                           "epochs": EPOCHS, "batch": BATCH_SIZE, "seed": seed, "recipe": RECIPE}, sort_keys=True)

    def torch(self, user: QualityUser, method: str, lr: float, seed: int = SEED, fresh: bool = False) -> dict[str, Any]:
        """One torch method on one user at one learning rate and seed: accuracy and seconds (cached;
        ``fresh``: run it now, for a timing measured side by side, and refresh the cache).

        Example:
            >>> session.torch(user, "torch-full", 3e-5)["seconds"] > 0                           # doctest: +SKIP
            True
        """
        key = self._key(user, method, lr, seed)
        hit = None if fresh else self.cache.get(key)
        if hit is not None:
            self.cache.reused += 1
            return hit
        with torch_threads(self.torch_threads):
            result = self._torch_head(user, lr, seed) if method == "torch-head" else self._torch_train(user, method, lr, seed)
        result["torch_threads"] = self.torch_threads or "default"
        self.cache.computed += 1
        self.log(f"  [{user.key}] {method} lr={lr:g} seed {seed}: accuracy {result['accuracy']:.3f} in {result['seconds']:.1f} s")
        self.cache.put(key, result)
        return result

    def _torch_train(self, user: QualityUser, method: str, lr: float, seed: int = SEED) -> dict[str, Any]:
        from bitfit.sdk.data import batches

        from .torch_recipes import TorchTrainer

        t0 = time.perf_counter()
        model = self.base.load_model()
        load_seconds = time.perf_counter() - t0
        train = self._examples(user.train)
        trainer = TorchTrainer(model, method.removeprefix("torch-"), lr,  # type: ignore[arg-type]
                               self.bias_names if method == "torch-bitfit" else None)
        rng = np.random.default_rng(seed)
        losses = []
        for _ in range(EPOCHS):
            for feeds, labels in batches(train, self.encoder, BATCH_SIZE, rng):
                losses.append(trainer.step(feeds, labels))
        seconds = time.perf_counter() - t0
        test = self._examples(user.test)
        correct = sum(int((trainer.logits(f).argmax(-1) == y).sum()) for f, y in batches(test, self.encoder, 64, None))
        return {"accuracy": correct / len(test), "seconds": seconds, "load_seconds": load_seconds, "steps": trainer.steps,
                "final_loss": float(np.mean(losses[-3:])) if losses else None, "test_examples": len(test),
                "trained": len(trainer.names)}

    def _embeddings(self, user: QualityUser) -> dict[str, Any]:
        """The base's penultimate features of the user's train and test examples, computed once."""
        import torch

        from bitfit.sdk.data import batches

        if user.key not in self._embedded:
            t0 = time.perf_counter()
            model = self.base.load_model()
            load_seconds = time.perf_counter() - t0
            train = self._examples(user.train)

            def embed(examples: Any) -> np.ndarray:
                with torch.no_grad():
                    return np.concatenate([model.embed(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in f.items()}).numpy()
                                           for f, _ in batches(examples, self.encoder, 64, None)])

            x_train = embed(train)
            seconds = time.perf_counter() - t0
            test = self._examples(user.test)
            self._embedded[user.key] = {"model": model, "x_train": x_train, "y_train": train.labels,
                                        "x_test": embed(test), "y_test": test.labels, "seconds": seconds,
                                        "load_seconds": load_seconds}
        return self._embedded[user.key]

    def _torch_head(self, user: QualityUser, lr: float, seed: int = SEED) -> dict[str, Any]:
        import copy

        import torch

        from .torch_recipes import train_head

        e = self._embeddings(user)
        head = copy.deepcopy(e["model"].head)
        t0 = time.perf_counter()
        train_head(head, e["x_train"], e["y_train"], epochs=EPOCHS, lr=lr, batch_size=BATCH_SIZE,
                   rng=np.random.default_rng(seed))
        train_seconds = time.perf_counter() - t0
        with torch.no_grad():
            predicted = head(torch.from_numpy(e["x_test"])).argmax(-1).numpy()
        return {"accuracy": float((predicted == e["y_test"]).mean()), "seconds": e["seconds"] + train_seconds,
                "load_seconds": e["load_seconds"], "test_examples": len(e["y_test"])}

    def sdk(self, user: QualityUser, seed: int = SEED, score_base: bool = True) -> dict[str, Any]:
        """The SDK with its defaults (``seed`` is personalize's, which shuffles the batches): open a
        Personalizer on the bundle (cold: nothing remembered of its files) and personalize; never
        cached. ``score_base=False`` skips the base model's test accuracy (the same for every seed;
        ``base`` is then None).

        Example:
            >>> r = session.sdk(user)                                                            # doctest: +SKIP
            >>> sorted(r)[:3]                                                                    # doctest: +SKIP
            ['accuracy', 'base', 'epochs_run']
        """
        from bitfit.sdk import Personalizer
        from bitfit.sdk.bundle import forget_checked_files

        # A cold open, as the first Personalizer of a process: the bundle's files hashed and
        # parsed again, not remembered from the previous user's run (bitfit.sdk.file_facts).
        forget_checked_files()
        with tempfile.TemporaryDirectory(prefix="bitfit-quality-") as store:
            t0 = time.perf_counter()
            personalizer = Personalizer(self.base.bundle_dir, store)
            result = personalizer.personalize(self.suite.user_data(user.train), user=user.name, seed=seed)
            seconds = time.perf_counter() - t0
            test = self.suite.user_data(user.test)
            accuracy = personalizer.evaluate(test, user=user.name)["accuracy"]
            base = personalizer.evaluate(test, user=None)["accuracy"] if score_base else None
        info = result.as_dict() if hasattr(result, "as_dict") else asdict(result)
        # Whatever the result reports of these (its fields change as the defaults are redesigned).
        keep = ("learning_rate", "learning_rate_from", "epochs_run", "steps", "stopped_by", "examples_used",
                "holdout_examples", "kept_epoch", "kept_step", "saved", "backend", "delta_bytes", "plan")
        self.log(f"  [{user.key}] sdk defaults seed {seed}: accuracy " + (f"{base:.3f} -> " if base is not None else "")
                 + f"{accuracy:.3f} in {seconds:.1f} s "
                 f"(lr {info.get('learning_rate')}, {info.get('steps')} steps, stopped by {info.get('stopped_by')})")
        return {"accuracy": accuracy, "base": base, "seconds": seconds, **{k: info.get(k) for k in keep if k in info}}


# ----------------------------------------------------------------------------- the evaluation


@dataclass
class QualityRun:
    """What :func:`evaluate` measured: per-user rows, grids per suite and method, the judged targets.

    Example:
        >>> QualityRun(mode="tiny").rows
        []
    """

    mode: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    grids: dict[str, dict[str, Any]] = field(default_factory=dict)
    suites: dict[str, dict[str, Any]] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def evaluate(suites: Sequence[Suite], *, grids: Grids, work_dir: Path, mode: str, roles: Sequence[str] = ("tuning", "held-aside"),
             methods: Sequence[str] = METHODS, log: Callable[[str], None] = print) -> QualityRun:
    """Bases, grids on the tuning users, then every method on every user (``roles``); targets.

    Example:
        >>> run = evaluate(tiny_suites(), grids=QUICK_GRIDS, work_dir=Path("/tmp/q"), mode="tiny")   # doctest: +SKIP
        >>> {t["name"][:20]: t["met"] for t in run.targets}                                           # doctest: +SKIP
        {...}
    """
    started = time.perf_counter()
    cache = Cache(Path(work_dir) / "cache.json")
    run = QualityRun(mode=mode, info={"epochs": EPOCHS, "batch_size": BATCH_SIZE, "seed": SEED, "seeds": SEEDS,
                                      "max_extensions": grids.max_extensions})
    for suite in suites:
        base = prepare_base(suite, Path(work_dir), log=log)
        session = Session(base, cache, log)
        run.suites[suite.name] = {"description": suite.description, "arch": suite.arch, "kind": suite.kind,
                                  "labels": suite.labels, "general_examples": len(suite.general), "base": base.info,
                                  "trainable_values": session.bundle.manifest.policy.get("trainable_values"),
                                  "training_defaults": session.bundle.manifest.training_defaults}
        tuning = [u for u in suite.users if u.role == "tuning"]
        chosen: dict[str, float] = {}
        for method in (m for m in TORCH_METHODS if m in methods):
            log(f"[{suite.name}] {method}: grid on {len(tuning)} tuning user(s) ...")

            def score(k: int, method: str = method) -> float:
                return float(np.mean([session.torch(u, method, lr_value(k))["accuracy"] for u in tuning]))

            result = tune_grid(score, grids.initial[suite.arch][method], grids.max_extensions)
            run.grids.setdefault(suite.name, {})[method] = result
            chosen[method] = result["chosen"]
            log(f"[{suite.name}] {method}: chose lr {result['chosen']:g} from {result['lrs']}"
                + (" (still at an edge)" if result["at_edge"] else ""))
        for user in suite.users:
            if user.role not in roles:
                continue
            row: dict[str, Any] = {"suite": suite.name, "user": user.name, "role": user.role, "note": user.note,
                                   "train": len(user.train), "test": len(user.test)}
            seeds = range(SEED, SEED + SEEDS)
            if "sdk" in methods or "base" in methods:
                # Interleaved with PyTorch BitFit's runs, so their seconds are side by side.
                runs: dict[str, list[dict[str, Any]]] = {"sdk": [], "torch-bitfit": []}
                for seed in seeds:
                    runs["sdk"].append(session.sdk(user, seed, score_base=seed == SEED))
                    if "torch-bitfit" in chosen:
                        runs["torch-bitfit"].append(session.torch(user, "torch-bitfit", chosen["torch-bitfit"], seed, fresh=True))
                row["base"] = runs["sdk"][0]["base"]
                if "sdk" in methods:
                    row.update(_summary("sdk", runs["sdk"]))
                    row["sdk_info"] = {k: v for k, v in runs["sdk"][0].items() if k not in ("accuracy", "base", "seconds")}
                if runs["torch-bitfit"]:
                    row.update(_summary("torch-bitfit", runs["torch-bitfit"]))
                    row["torch-bitfit_lr"] = chosen["torch-bitfit"]
            for method, lr in chosen.items():
                if method in row:
                    continue
                row.update(_summary(method, [session.torch(user, method, lr, seed) for seed in seeds]))
                row[f"{method}_lr"] = lr
            if "torch-bitfit" in row:
                # The noise of BitFit's expected accuracy on this user: the test set's binomial
                # error plus the spread between training seeds (its standard error over SEEDS runs).
                p, spread = row["torch-bitfit"], row["torch-bitfit_seed_sd"]
                row["se_binomial"] = math.sqrt(max(p * (1 - p), 0.0) / len(user.test))
                row["se"] = math.sqrt(row["se_binomial"] ** 2 + spread ** 2 / len(row["torch-bitfit_runs"]))
            run.rows.append(row)
    run.targets = judge(run.rows)
    run.info.update({"torch_runs_computed": cache.computed, "torch_runs_cached": cache.reused,
                     "wall_seconds": time.perf_counter() - started})
    return run


def _summary(method: str, runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A method's row fields from its runs (one per seed): the mean accuracy, each run's, their
    standard deviation, and the fastest run's seconds (the least disturbed by other load).

    Example:
        >>> r = _summary("sdk", [{"accuracy": 0.7, "seconds": 3.0}, {"accuracy": 0.8, "seconds": 2.0}])
        >>> round(r["sdk"], 3), r["sdk_runs"], r["sdk_seconds"], round(r["sdk_seed_sd"], 3)
        (0.75, [0.7, 0.8], 2.0, 0.071)
    """
    accuracies = [float(r["accuracy"]) for r in runs]
    return {method: float(np.mean(accuracies)), f"{method}_runs": accuracies,
            f"{method}_seed_sd": float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else 0.0,
            f"{method}_seconds": min(float(r["seconds"]) for r in runs)}


def judge(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The three targets on the held-aside rows: name, measured value, met (True/False/None).

    Example:
        >>> rows = [{"role": "held-aside", "user": "u", "base": 0.5, "sdk": 0.70, "torch-bitfit": 0.72, "se": 0.03,
        ...          "torch-full": 0.70, "sdk_seconds": 5.0, "torch-bitfit_seconds": 10.0}]
        >>> [t["met"] for t in judge(rows)]
        [True, True, True]
    """
    held = [r for r in rows if r["role"] == "held-aside"]
    out = []
    have = [r for r in held if "sdk" in r and "torch-bitfit" in r]
    if have:
        misses = [r for r in have if r["sdk"] < r["torch-bitfit"] - r["se"]]
        worst = min(have, key=lambda r: r["sdk"] - r["torch-bitfit"] + r["se"])
        out.append({"name": "SDK defaults >= tuned PyTorch BitFit on every held-aside user (mean over seeds, within 1 SE: test set + seeds)",
                    "value": f"{len(have) - len(misses)} of {len(have)} users; closest: {worst['user']} "
                             f"{worst['sdk']:.3f} vs {worst['torch-bitfit']:.3f} (SE {worst['se']:.3f})"
                             + (f"; below: {', '.join(r['suite'] + '/' + r['user'] for r in misses)}" if misses else ""),
                    "met": not misses})
    have = [r for r in held if "sdk" in r and "torch-full" in r and "base" in r]
    if have:
        sdk_gain = float(np.mean([r["sdk"] - r["base"] for r in have]))
        full_gain = float(np.mean([r["torch-full"] - r["base"] for r in have]))
        share = sdk_gain / full_gain if full_gain > 1e-12 else None
        out.append({"name": f"SDK defaults' mean gain >= {GAIN_SHARE_TARGET:.0%} of tuned full fine-tuning's (held-aside)",
                    "value": f"{sdk_gain:+.3f} vs {full_gain:+.3f}: "
                             + (f"{share:.0%}" if share is not None else "full fine-tuning gained nothing"),
                    "met": (sdk_gain >= GAIN_SHARE_TARGET * full_gain) if share is not None else None})
    have = [r for r in held if "sdk_seconds" in r and "torch-bitfit_seconds" in r]
    if have:
        ratios = [r["sdk_seconds"] / r["torch-bitfit_seconds"] for r in have]
        out.append({"name": f"SDK wall time <= {TIME_RATIO_TARGET}x PyTorch BitFit per held-aside user",
                    "value": f"{min(ratios):.2f}x .. {max(ratios):.2f}x (median {float(np.median(ratios)):.2f}x), "
                             f"{sum(x <= TIME_RATIO_TARGET for x in ratios)} of {len(ratios)} users within",
                    "met": all(x <= TIME_RATIO_TARGET for x in ratios)})
    return out


# ----------------------------------------------------------------------------- outputs


def render_section(run: QualityRun, *, command: str, plot: str | None = None) -> str:
    """The BENCHMARKS.md section (with its markers) for a run.

    Example:
        >>> text = render_section(QualityRun(mode="tiny", info={"finished": "now"}), command="x")
        >>> text.startswith(BEGIN) and text.endswith(END)
        True
    """
    info = run.info
    lines = [BEGIN, "## Quality per user: SDK defaults vs tuned PyTorch (`make quality`)", "",
             f"Generated by `{command}` on {info.get('finished', '?')} ({run.mode} mode, "
             f"{info.get('wall_seconds', 0) / 60:.1f} min wall time; {info.get('machine', '?')}; load average "
             f"{info.get('load_start', '?')} at start, {info.get('load_end', '?')} at end). Torch results "
             f"computed in this run: {info.get('torch_runs_computed', 0)}, reused from the cache "
             f"(`benchmarks/_work/quality/cache.json`, same data, base, method, learning rate, seed and recipe): "
             f"{info.get('torch_runs_cached', 0)}. The SDK column always runs.", "",
             "Protocol: per user, every method trains on the user's own train examples and is scored by accuracy on the "
             f"user's separate test examples, **{info.get('seeds', 1)} times** (training seeds {info.get('seed')} and up, "
             "which shuffle the batches): a user's accuracy is the mean of those runs. **SDK** = "
             "`Personalizer(bundle, store).personalize(train, user=..., seed=s)` with no tuning argument (its defaults); its "
             "seconds include opening the Personalizer (loading the bundle, its files hashed and checked as on a process's "
             "first open: nothing remembered from the previous run). **PyTorch** = AdamW as the bundle's optimizer "
             f"runs it, {info.get('epochs')} epochs of batches of {info.get('batch_size')}, the SDK's tokenization and "
             "batches; seconds include loading the base model from disk; torch runs on one thread for a model under 1 M "
             "values (the SDK's rule for training; with two threads and this run's OMP_WAIT_POLICY=PASSIVE a small "
             "model's run took twice as long), on torch's default threads otherwise. Head-only trains the head on cached embeddings; "
             "BitFit trains the bundle's trainable biases; full trains everything. Each PyTorch learning rate was chosen "
             "per suite by the mean test accuracy over that suite's **tuning** users (seed 0) and then applied unchanged "
             "to its **held-aside** users; a grid whose best value sat at an edge was extended on that side (at most "
             f"{info.get('max_extensions')} times). The targets are judged on held-aside users only. **Times are side by "
             "side**: per user, the SDK's runs and PyTorch BitFit's (never from the cache) alternate in this run, and each "
             "side's fastest run is reported. SE (the noise a target allows) = sqrt(binomial variance of PyTorch BitFit's "
             "mean accuracy on the n test examples, p (1 - p) / n, + the variance of that mean over its training seeds, "
             "sd^2 / seeds).", ""]
    lines += ["### Suites", ""]
    lines += _table(["suite", "base model", "general examples", "base head accuracy (its 20% held out)", "training defaults"],
                    [[name, s["description"], str(s["general_examples"]),
                      f"{s['base'].get('head_valid_accuracy', float('nan')):.3f}" if s.get("base") else "",
                      json.dumps(s.get("training_defaults") or {})] for name, s in run.suites.items()])
    lines += ["", "### Targets (held-aside users)", ""]
    lines += _table(["target", "measured", "status"],
                    [[t["name"], t["value"], {True: "**met**", False: "**not met**", None: "not judged"}[t["met"]]]
                     for t in run.targets])
    lines += ["", "### Per user (accuracy on the user's test examples)", ""]
    headers = ["suite", "user", "role", "train / test", "base", "SDK defaults", "torch head", "torch BitFit", "torch full",
               "SE", "SDK - BitFit", "SDK s", "BitFit s", "SDK / BitFit time"]
    body = []
    for r in run.rows:
        def acc(key: str) -> str:
            return f"{r[key]:.3f}" if key in r else ""
        ratio = r["sdk_seconds"] / r["torch-bitfit_seconds"] if "sdk_seconds" in r and "torch-bitfit_seconds" in r else None
        body.append([r["suite"], f"{r['user']} ({r['note']})", r["role"], f"{r['train']} / {r['test']}", acc("base"), acc("sdk"),
                     acc("torch-head"), acc("torch-bitfit"), acc("torch-full"), f"{r['se']:.3f}" if "se" in r else "",
                     f"{r['sdk'] - r['torch-bitfit']:+.3f}" if "sdk" in r and "torch-bitfit" in r else "",
                     _seconds(r.get("sdk_seconds")), _seconds(r.get("torch-bitfit_seconds")),
                     f"{ratio:.2f}x" if ratio is not None else ""])
    lines += _table(headers, body)
    means = _means(run.rows)
    if means:
        lines += ["", "Means per suite and role: " + "; ".join(means) + "."]
    lines += ["", "### Learning-rate grids (mean test accuracy over the tuning users)", ""]
    grid_rows = []
    for suite, methods in run.grids.items():
        for method, g in methods.items():
            # float(): lr keys come back from the JSON as strings (rerender)
            scores = ", ".join(f"{float(lr):g}: {s:.3f}" + ("*" if float(lr) == g["chosen"] else "")
                               for lr, s in g["scores"].items())
            extended = ", ".join(f"{lr_value(k):g}" for k in g["extended"]) or "no"
            grid_rows.append([suite, method, scores, f"{g['chosen']:g}", extended,
                              "yes: still at an edge" if g["at_edge"] else "no"])
    lines += _table(["suite", "method", "grid (lr: score; * chosen)", "chosen", "added by extension", "at an edge"], grid_rows)
    sdk_rows = [[r["suite"], r["user"], _g(r["sdk_info"].get("learning_rate")),
                 str(r["sdk_info"].get("epochs_run", "")), str(r["sdk_info"].get("steps", "")),
                 str(r["sdk_info"].get("stopped_by", "")), str(r["sdk_info"].get("kept_step", r["sdk_info"].get("kept_epoch", ""))),
                 str(r["sdk_info"].get("saved", "")), str(r["sdk_info"].get("holdout_examples", ""))]
                for r in run.rows if "sdk_info" in r]
    if sdk_rows:
        lines += ["", "### What the SDK's defaults did (seed 0's run)", ""]
        lines += _table(["suite", "user", "learning rate", "epochs run", "steps", "stopped by", "kept step/epoch", "saved",
                         "inner holdout"], sdk_rows)
    if plot:
        lines += ["", f"![per-user accuracy by method]({plot})", "",
                  "(Each panel's axis starts below its lowest bar, so the SMS panels' small differences show.)"]
    lines += ["", END]
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    """Seconds with two significant figures below 1 s (a tiny model's runs), else one decimal."""
    if value is None:
        return ""
    return f"{value:.2g}" if value < 1 else f"{value:.1f}"


def _g(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value if value is not None else "")


def _means(rows: Sequence[dict[str, Any]]) -> list[str]:
    out = []
    for suite in dict.fromkeys(r["suite"] for r in rows):
        for role in ("tuning", "held-aside"):
            part = [r for r in rows if r["suite"] == suite and r["role"] == role]
            if part:
                values = ", ".join(f"{m} {np.mean([r[m] for r in part]):.3f}" for m in METHODS if all(m in r for r in part))
                out.append(f"{suite} {role} ({len(part)}): {values}")
    return out


def splice(document: str, section: str) -> str:
    """``document`` with its quality section replaced by ``section`` (appended if it has none).

    Example:
        >>> splice("# B\\n\\nold", f"{BEGIN}\\nnew\\n{END}").splitlines()[-1]
        '<!-- quality:end -->'
        >>> splice(f"a\\n{BEGIN}\\nold\\n{END}\\nb", f"{BEGIN}\\nnew\\n{END}").split()
        ['a', '<!--', 'quality:begin', '-->', 'new', '<!--', 'quality:end', '-->', 'b']
    """
    if BEGIN in document and END in document:
        head, rest = document.split(BEGIN, 1)
        return head + section + rest.split(END, 1)[1]
    return document.rstrip("\n") + "\n\n" + section + "\n"


def plot(run: QualityRun, path: Path) -> Path:
    """Per-user bars per method, one panel per suite; tuning users marked.

    Example:
        >>> plot(QualityRun(mode="tiny", rows=[{"suite": "s", "user": "u", "role": "tuning", "base": 0.5, "sdk": 0.6}]),
        ...      Path(tempfile.mkdtemp()) / "q.png").stat().st_size > 1000
        True
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = list(dict.fromkeys(r["suite"] for r in run.rows))
    colors = {"base": "#9aa5b1", "sdk": "#2b7bb9", "torch-head": "#f2b447", "torch-bitfit": "#d95f02", "torch-full": "#7570b3"}
    names = {"base": "base", "sdk": "SDK defaults", "torch-head": "torch head (tuned)", "torch-bitfit": "torch BitFit (tuned)",
             "torch-full": "torch full FT (tuned)"}
    fig, axes = plt.subplots(len(suites), 1, figsize=(11, 3.2 * len(suites)), squeeze=False)
    for ax, suite in zip(axes[:, 0], suites):
        rows = [r for r in run.rows if r["suite"] == suite]
        methods = [m for m in METHODS if any(m in r for r in rows)]
        width = 0.8 / max(1, len(methods))
        x = np.arange(len(rows))
        for i, m in enumerate(methods):
            values = [r.get(m, np.nan) for r in rows]
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, values, width, label=names[m], color=colors[m])
        ax.set_xticks(x, [f"{r['user']}\n({r['role']})" for r in rows], fontsize=7)
        # Near-saturated suites (SMS) start the axis below their lowest bar, so differences show.
        low = max(0.0, math.floor((min(r.get(m, 1.0) for r in rows for m in methods) - 0.05) * 10) / 10)
        ax.set_ylim(low, 1 + 0.22 * (1 - low))
        ax.set_yticks(np.linspace(low, 1.0, 6))
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{suite}: per-user test accuracy (learning rates tuned on the tuning users only)", fontsize=9)
        ax.legend(fontsize=7, ncol=len(methods), loc="upper center", frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def _machine(threads: int | None = None) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores available, Python {platform.python_version()}"


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


# ----------------------------------------------------------------------------- entry points


def run_quality(mode: str = "full", *, work_dir: Path | None = None, report: Path | None = None,
                log: Callable[[str], None] = print) -> QualityRun:
    """The whole evaluation for ``mode`` (``full``, ``quick`` or ``tiny``) with its outputs: the JSON,
    the plot and (full mode) the BENCHMARKS.md section.

    Example:
        >>> run = run_quality("quick")                                                      # doctest: +SKIP
        >>> [t["met"] for t in run.targets]                                                 # doctest: +SKIP
        [True, False, False]
    """
    suites, grids = {"full": (full_suites, FULL_GRIDS), "quick": (quick_suites, QUICK_GRIDS),
                     "tiny": (tiny_suites, QUICK_GRIDS)}[mode]
    work = Path(work_dir) if work_dir else WORK / "quality"
    load_start = _load()
    run = evaluate(suites(), grids=grids, work_dir=work, mode=mode, log=log)
    run.info.update({"finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": _machine(),
                     "load_start": load_start, "load_end": _load()})
    suffix = "" if mode == "full" else f"-{mode}"
    out_dir = work.parent if work_dir is None else work
    json_path = out_dir / f"quality{suffix}.json"
    json_path.write_text(json.dumps(asdict(run), indent=1, default=str), encoding="utf-8")
    plot_path = plot(run, (HERE / "quality.png") if mode == "full" and work_dir is None else out_dir / f"quality{suffix}.png")
    command = "python -m benchmarks.quality" + ("" if mode == "full" else f" --{mode}")
    report_path = report or (REPO_ROOT / "BENCHMARKS.md" if mode == "full" and work_dir is None else out_dir / f"QUALITY{suffix}.md")
    link = os.path.relpath(plot_path, report_path.parent).replace(os.sep, "/")
    section = render_section(run, command=command, plot=link)
    old = report_path.read_text(encoding="utf-8") if report_path.is_file() else ""
    report_path.write_text(splice(old, section) if old else section + "\n", encoding="utf-8")
    log(section)
    log(f"wrote {report_path}, {plot_path}, {json_path}")
    return run


def rerender(json_path: Path | None = None, report: Path | None = None, plot_path: Path | None = None) -> Path:
    """Write the BENCHMARKS.md section and the plot again from a run's JSON, running nothing.

    Example:
        >>> rerender()                                                                      # doctest: +SKIP
        PosixPath('.../BENCHMARKS.md')
    """
    json_path = json_path or WORK / "quality.json"
    data = json.loads(Path(json_path).read_text(encoding="utf-8"))
    run = QualityRun(**data)
    report = report or REPO_ROOT / "BENCHMARKS.md"
    plot_path = plot(run, plot_path or HERE / "quality.png")
    command = "python -m benchmarks.quality" + ("" if run.mode == "full" else f" --{run.mode}")
    section = render_section(run, command=command, plot=os.path.relpath(plot_path, report.parent).replace(os.sep, "/"))
    old = report.read_text(encoding="utf-8") if report.is_file() else ""
    report.write_text(splice(old, section) if old else section + "\n", encoding="utf-8")
    return report


def sdk_tuning_check(quick: bool = False, *, work_dir: Path | None = None,
                     log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Only the SDK column, on the TUNING users, against tuned PyTorch BitFit (from the cache,
    computed once if missing); prints and returns one row per tuning user. Nothing on a
    held-aside user runs, so tuning the SDK's defaults with this keeps them honest.

    Example:
        >>> rows = sdk_tuning_check(quick=True)                                             # doctest: +SKIP
        >>> rows[0]["suite"], rows[0]["sdk"] >= 0                                           # doctest: +SKIP
        ('tweets', True)
    """
    suites = quick_suites() if quick else full_suites()
    run = evaluate(suites, grids=QUICK_GRIDS if quick else FULL_GRIDS, work_dir=Path(work_dir) if work_dir else WORK / "quality",
                   mode="quick" if quick else "full", roles=("tuning",), methods=("base", "sdk", "torch-bitfit"), log=log)
    rows = [{"suite": r["suite"], "user": r["user"], "base": r["base"], "sdk": r["sdk"], "torch-bitfit": r["torch-bitfit"],
             "bitfit_lr": r["torch-bitfit_lr"], "diff": r["sdk"] - r["torch-bitfit"], "se": r["se"],
             "sdk_seconds": r["sdk_seconds"], "bitfit_seconds": r["torch-bitfit_seconds"]} for r in run.rows]
    table = _table(["suite", "user (tuning)", "base", "SDK defaults", "torch BitFit (lr)", "SDK - BitFit", "SE", "SDK s", "BitFit s"],
                   [[r["suite"], r["user"], f"{r['base']:.3f}", f"{r['sdk']:.3f}", f"{r['torch-bitfit']:.3f} ({r['bitfit_lr']:g})",
                     f"{r['diff']:+.3f}", f"{r['se']:.3f}", f"{r['sdk_seconds']:.1f}", f"{r['bitfit_seconds']:.1f}"] for r in rows])
    mean = float(np.mean([r["diff"] for r in rows])) if rows else float("nan")
    log("\n".join(table) + f"\nmean SDK - BitFit over {len(rows)} tuning users: {mean:+.3f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.quality [--quick] [--sdk-tuning-check] [--rerender]``.

    Example:
        >>> main(["--quick"])                                                               # doctest: +SKIP
        0
    """
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one tuning and one held-aside user per suite, small grids")
    parser.add_argument("--sdk-tuning-check", action="store_true",
                        help="only the SDK column on the tuning users vs tuned PyTorch BitFit (for tuning the defaults)")
    parser.add_argument("--work", type=Path, default=None, help="cache and bases (default benchmarks/_work/quality)")
    parser.add_argument("--rerender", action="store_true",
                        help="rewrite the BENCHMARKS.md section and plot from benchmarks/_work/quality.json (runs nothing)")
    args = parser.parse_args(argv)
    if args.rerender:
        print(f"wrote {rerender()}")
        return 0
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def log(message: str) -> None:
        print(f"[quality {time.strftime('%H:%M:%S')}] {message}" if "\n" not in message else message, flush=True)

    if args.sdk_tuning_check:
        sdk_tuning_check(args.quick, work_dir=args.work, log=log)
    else:
        run_quality("quick" if args.quick else "full", work_dir=args.work, log=log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
