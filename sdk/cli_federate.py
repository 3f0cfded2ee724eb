"""``bitfit federate``: learn a population delta across a fleet of devices with Flower.

    bitfit federate simulate BUNDLE --clients N --rounds R --data DIR --out DIR [--steps-per-round S]
                    [--dp-noise X --dp-clip C [--dp-side server|client]] [--min-clients M] [--round-timeout T]
    bitfit federate app BUNDLE --store DIR --out APP_DIR [--rounds R --clients N ...]

``simulate`` runs Flower's simulation engine on this machine: one virtual device per data file in
``--data`` (``.jsonl``/``.csv``, as ``personalize`` reads them); the population versions go to
``OUT/store`` (name ``population``), one JSON line per round to ``OUT/rounds.jsonl``. ``app`` writes
a Flower app project for the deployment engine (``flwr run APP_DIR CONNECTION``; docs/fleet.md).
Needs the ``fleet`` extra (``pip install 'bitfit[fleet]'``).

Example:
    >>> from bitfit.sdk.cli import main
    >>> main(["federate", "simulate", "bundles/tiny", "--clients", "4", "--rounds", "3", "--data", "d", "--out", "o"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import logging
from typing import Any


def add_parser(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add the ``federate`` command (``simulate``, ``app``) to the ``bitfit`` parser.

    Example:
        >>> import argparse
        >>> parser = argparse.ArgumentParser(prog="bitfit")
        >>> _ = add_parser(parser.add_subparsers(dest="command"))
        >>> args = parser.parse_args(["federate", "simulate", "b", "--rounds", "2", "--data", "d", "--out", "o",
        ...                           "--dp-noise", "0.5", "--dp-clip", "0.1"])
        >>> args.mode, args.rounds, args.dp_noise, args.clients
        ('simulate', 2, 0.5, None)
    """
    fe = sub.add_parser("federate", help="learn a population delta across devices with Flower (needs the 'fleet' extra)")
    modes = fe.add_subparsers(dest="mode", required=True, metavar="MODE", help="simulate | app")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("bundle")
    common.add_argument("--rounds", type=int, default=3)
    common.add_argument("--steps-per-round", type=int, default=10, help="each device's step budget per round")
    common.add_argument("--seconds-per-round", type=float, default=0.0, help="each device's time budget per round (0: none)")
    common.add_argument("--learning-rate", type=float, default=0.0, help="devices' peak learning rate (0: the bundle's)")
    common.add_argument("--min-clients", type=int, default=1, help="good updates a round needs, else it fails and saves nothing")
    common.add_argument("--fraction", type=float, default=1.0, help="share of the devices sampled per round")
    common.add_argument("--round-timeout", type=float, default=600.0, help="seconds to wait for the devices' replies")
    common.add_argument("--max-update-norm", type=float, default=100.0, help="updates moving further than this are dropped")
    common.add_argument("--dp-noise", type=float, default=0.0, help="Gaussian noise multiplier (0: no noise)")
    common.add_argument("--dp-clip", type=float, default=0.0, help="clipping norm of each update (turns DP on)")
    common.add_argument("--dp-side", default="server", choices=["server", "client"], help="where updates are clipped")
    common.add_argument("--population", default="population", help="the population delta's name in the store")
    common.add_argument("--encoding", default="fp32", choices=["fp32", "fp16", "int8"])
    common.add_argument("--eval-fraction", type=float, default=0.2, help="share of each device's data kept for evaluation")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--misbehave", default="", help=argparse.SUPPRESS)  # drills: "ID:KIND,..." (docs/fleet.md)

    si = modes.add_parser("simulate", parents=[common], help="run the fleet with Flower's simulation engine")
    si.add_argument("--clients", type=int, help="devices (default: one per data file)")
    si.add_argument("--data", required=True, help="directory with one .jsonl/.csv data file per device")
    si.add_argument("--out", required=True, help="output directory: store/ (population versions) and rounds.jsonl")
    si.add_argument("--cpus", type=int, default=2, help="CPUs Ray may use (one per concurrently training device)")

    ap = modes.add_parser("app", parents=[common], help="write a Flower app project for the deployment engine")
    ap.add_argument("--clients", type=int, default=2, help="devices to wait for before the first round")
    ap.add_argument("--store", required=True, help="the server's DeltaStore directory")
    ap.add_argument("--out", required=True, help="the app project directory to write")
    return fe


def _server_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"rounds": args.rounds, "steps_per_round": args.steps_per_round, "seconds_per_round": args.seconds_per_round,
            "learning_rate": args.learning_rate, "min_clients": args.min_clients, "fraction": args.fraction,
            "round_timeout": args.round_timeout, "max_update_norm": args.max_update_norm, "dp_noise": args.dp_noise,
            "dp_clip": args.dp_clip, "dp_side": args.dp_side, "population": args.population, "encoding": args.encoding}


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``bitfit federate`` command; the exit status (1 when no round succeeded).

    Example:
        >>> import argparse, tempfile
        >>> ns = argparse.Namespace(mode="app", bundle="/b", store="/s", out=tempfile.mkdtemp(), clients=2, rounds=2,
        ...     steps_per_round=5, seconds_per_round=0.0, learning_rate=0.0, min_clients=1, fraction=1.0,
        ...     round_timeout=600.0, max_update_norm=100.0, dp_noise=0.0, dp_clip=0.0, dp_side="server",
        ...     population="population", encoding="fp32", eval_fraction=0.2, seed=0, misbehave="")
        >>> run(ns)                                                          # doctest: +ELLIPSIS
        wrote the Flower app ...
        0
    """
    from .fleet_run import settings_for_simulation, simulate, write_app_project
    from .fleet_server import FleetSettings

    options = _server_options(args)
    if args.mode == "app":
        FleetSettings(bundle=args.bundle, store=args.store, clients=args.clients, **options)  # refuse bad values now
        config = {k.replace("_", "-"): v for k, v in options.items()}
        config.update({"bundle": args.bundle, "store": args.store, "clients": args.clients,
                       "eval-fraction": args.eval_fraction, "seed": args.seed, "misbehave": args.misbehave})
        path = write_app_project(args.out, config)
        print(f"wrote the Flower app {path}: start a SuperLink and SuperNodes, then `flwr run {path} CONNECTION` "
              "(docs/fleet.md)")
        return 0
    logging.basicConfig(level=logging.WARNING)
    server, client = settings_for_simulation(args.bundle, args.data, args.out, clients=args.clients,
                                             eval_fraction=args.eval_fraction, seed=args.seed, misbehave=args.misbehave,
                                             **options)
    reports = simulate(server, client, num_cpus=args.cpus)
    for r in reports:
        if r.ok:
            acc = r.evaluate_metrics.get("accuracy")
            print(f"round {r.round}: population v{r.version} from {len(r.clients)} clients ({', '.join(r.clients)})"
                  f"{f', holdout accuracy {acc:.3f}' if acc is not None else ''}, {r.seconds:.1f}s"
                  + (f", privacy {r.privacy}" if r.privacy else ""))
        else:
            print(f"round {r.round}: FAILED, {r.reason}")
        for d in r.dropped:
            print(f"  dropped {d.get('client', 'node ' + d['node'])}: {d['reason']}")
    print(f"population versions in {server.store} (name {server.population!r}); rounds in {server.out}/rounds.jsonl")
    return 0 if any(r.ok for r in reports) else 1


__all__ = ["add_parser", "run"]
