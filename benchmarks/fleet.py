"""Federated BitFit on real tweets: a fleet of devices learns a population delta with Flower.

    python -m benchmarks.fleet [--bundle demo_out/bundle] [--out benchmarks/_work/fleet] [--rounds 4]
                               [--steps-per-round 8] [--train 120] [--holdout 80] [--no-write]

Tweets (demo/datasets.py) are split into devices by domain; four domains take part in the
fleet, two never do. Each configuration runs ``bitfit federate simulate``'s code on Flower's
simulation engine (Ray, 2 CPUs: two devices train at a time, one onnxruntime thread each):
no DP, then DP (server-side fixed clipping, equal weights) at two noise multipliers. Per round:
held-out accuracy of base + population on the participating and on the non-participating
devices' own held-out tweets, bytes sent per device per round, seconds per round. Then, for the
same users, personalization (``Personalizer.personalize``, the same budget) on top of the final
population vs on top of the base. Writes ``fleet.json`` into ``--out``, the "Federated BitFit"
section at the end of BENCHMARKS.md and ``benchmarks/fleet.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTICIPANTS = ("airline:united", "festival", "apple", "airline:usairways")
OUTSIDERS = ("self-driving-cars", "deflategate")
SECTION = "## Federated BitFit"


def _split(domains: dict, general: set, train: int, holdout: int) -> dict[str, tuple[list, list]]:
    from demo.datasets import sample

    out = {}
    for i, name in enumerate(PARTICIPANTS + OUTSIDERS):
        pool = [t for t in domains[name] if t.text not in general]  # never a tweet the base head was trained on
        picked = sample(pool, train + holdout, seed=100 + i)
        out[name] = ([(t.text, t.label) for t in picked[:train]], [(t.text, t.label) for t in picked[train:]])
    return out


def _write_clients(data: dict, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(PARTICIPANTS):
        rows = [{"text": t, "label": l} for t, l in data[name][0]]
        (directory / f"{i}-{name.replace(':', '-')}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _run_config(bundle: str, data: dict, work: Path, label: str, args: argparse.Namespace, **dp) -> dict:
    from bitfit.sdk.fleet_client import ValuesEvaluator
    from bitfit.sdk.fleet_run import settings_for_simulation, simulate
    from bitfit.sdk.store import DeltaStore

    out = work / label
    shutil.rmtree(out, ignore_errors=True)
    server, client = settings_for_simulation(bundle, str(work / "clients"), str(out), rounds=args.rounds,
                                             steps_per_round=args.steps_per_round, min_clients=len(PARTICIPANTS),
                                             eval_fraction=0.0, threads=1, **dp)
    started = time.perf_counter()
    reports = simulate(server, client, num_cpus=2)
    wall = time.perf_counter() - started
    store = DeltaStore(server.store)
    ev = ValuesEvaluator(bundle, threads=2)
    base = ev.personalizer.base_trainable
    curve = []
    for version in [0, *store.versions("population")]:
        values = None if version == 0 else store.load("population", version).apply_to(base)
        row = {"version": version}
        for group, names in (("participating", PARTICIPANTS), ("non_participating", OUTSIDERS)):
            accs = {n: ev.evaluate(data[n][1], values)["accuracy"] for n in names}
            row[group] = float(np.mean(list(accs.values())))
            row[group + "_by_domain"] = accs
        curve.append(row)
        print(f"  {label} v{version}: participating {row['participating']:.3f}, non-participating "
              f"{row['non_participating']:.3f}", flush=True)
    return {"label": label, "dp": dp, "wall_seconds": wall, "curve": curve,
            "rounds": [r.as_dict() for r in reports], "store": server.store}


def _personalize_compare(bundle: str, data: dict, store_dir: str, users: list[str], steps: int) -> list[dict]:
    """Personalize each user on top of the final population and on top of the base (same data, budget, seed)."""
    from bitfit.sdk import Personalizer
    from bitfit.sdk.store import DeltaStore

    rows = []
    for name in users:
        row = {"user": name, "participated": name in PARTICIPANTS}
        for start in ("base", "population"):
            scratch = tempfile.mkdtemp(prefix="bitfit-fleet-bench-")
            store = DeltaStore(scratch)
            if start == "population":
                src = DeltaStore(store_dir)
                store.save("population", src.load("population"))
            p = Personalizer(bundle, store, threads=2, population="population" if start == "population" else None,
                             verify="sizes")
            before = p.evaluate(data[name][1], user=name)["accuracy"]
            r = p.personalize(data[name][0], user=name, max_steps=steps, holdout=0.0, seed=0, progress_bar=False)
            after = p.evaluate(data[name][1], user=name)["accuracy"]
            row[start] = {"before": before, "after": after, "seconds": r.seconds}
            shutil.rmtree(scratch, ignore_errors=True)
        print(f"  {name}: on base {row['base']['before']:.3f} -> {row['base']['after']:.3f}; on population "
              f"{row['population']['before']:.3f} -> {row['population']['after']:.3f}", flush=True)
        rows.append(row)
    return rows


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, group, title in ((axes[0], "participating", "participating devices"),
                             (axes[1], "non_participating", "devices that never took part")):
        for cfg in results["configs"]:
            rounds = [row["version"] for row in cfg["curve"]]
            ax.plot(rounds, [row[group] for row in cfg["curve"]], marker="o", label=cfg["label"])
        ax.set_title(title)
        ax.set_xlabel("round (0 = base)")
        ax.set_xticks(range(len(results["configs"][0]["curve"])))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy, base + population")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _section(results: dict) -> str:
    a = results["args"]
    lines = [SECTION, "",
             f"Measured by `{results['command']}` ({results['when']}, {results['machine']}). The demo bundle "
             f"(MiniLM + sentiment head, {results['trainable_values']:,} trainable bias values); tweets split into "
             f"devices by domain, {a['train']} training tweets per device, {a['holdout']} other tweets of each domain held "
             f"out. Devices taking part: {', '.join(PARTICIPANTS)}; never taking part: {', '.join(OUTSIDERS)}. "
             f"{a['rounds']} rounds of FedAvg on Flower 1.42's simulation engine (Ray, 2 CPUs, two devices training at "
             f"a time), {a['steps_per_round']} local steps per device per round (`Personalizer.fit`, batch 16, the "
             "bundle's learning rate). Accuracy: base + population on the held-out tweets, averaged over domains.", ""]
    lines += ["| configuration | round | acc. participating | acc. non-participating | bytes down / up per device | "
              "s per round | privacy |", "|---|---|---|---|---|---|---|"]
    for cfg in results["configs"]:
        for row in cfg["curve"]:
            rep = next((r for r in cfg["rounds"] if r["version"] == row["version"]), None) if row["version"] else None
            bytes_ = f"{rep['bytes_down_per_client']:,} / {rep['bytes_up_per_client']:,}" if rep else "-"
            secs = f"{rep['seconds']:.1f}" if rep else "-"
            priv = rep.get("privacy") if rep else None
            ptxt = (f"eps {priv['epsilon']:.3g} at delta {priv['delta']:g}" if priv and "epsilon" in priv else "-")
            lines.append(f"| {cfg['label']} | {row['version']} | {row['participating']:.3f} | "
                         f"{row['non_participating']:.3f} | {bytes_} | {secs} | {ptxt} |")
    failed = [(c["label"], r["round"], r["reason"]) for c in results["configs"] for r in c["rounds"] if not r["ok"]]
    lines += ["", f"Failed rounds: {failed or 'none'}.", "",
              "Personalization of the same users on top of the final (no-DP) population vs on top of the base "
              f"(`personalize`, {a['personal_steps']} steps, no holdout, seed 0; accuracy on the user's held-out tweets):", "",
              "| user | took part | on base: before -> after | on population: before -> after |", "|---|---|---|---|"]
    for row in results["personalize"]:
        lines.append(f"| {row['user']} | {'yes' if row['participated'] else 'no'} | {row['base']['before']:.3f} -> "
                     f"{row['base']['after']:.3f} | {row['population']['before']:.3f} -> {row['population']['after']:.3f} |")
    lines += ["", "![federated rounds](benchmarks/fleet.png)", "", _notes(results), ""]
    return "\n".join(lines)


def _notes(results: dict) -> str:
    """What the numbers say, computed from them, with the caveats that bound them."""
    cfgs = results["configs"]
    plain = cfgs[0]["curve"]
    first, last = plain[0], plain[-1]
    held = results["args"]["holdout"]
    se = 100 * (0.7 * 0.3 / (held * len(PARTICIPANTS))) ** 0.5
    dp_eps = [(c["label"], c["rounds"][-1].get("privacy", {}).get("epsilon")) for c in cfgs[1:]]
    personal = results["personalize"]
    better_start = sum(r["population"]["before"] > r["base"]["before"] for r in personal)
    better_end = sum(r["population"]["after"] > r["base"]["after"] for r in personal)
    equal_end = sum(r["population"]["after"] == r["base"]["after"] for r in personal)
    return "\n".join([
        f"- Without DP the population lifts the participating devices' held-out accuracy from {first['participating']:.3f} "
        f"to {last['participating']:.3f} in {len(plain) - 1} rounds, and the devices that never took part from "
        f"{first['non_participating']:.3f} to {last['non_participating']:.3f}. Each point averages "
        f"{len(PARTICIPANTS)} or {len(OUTSIDERS)} domains of {held} held-out tweets: a standard error of about "
        f"{se:.1f} points (participating; more for the two outsiders), so round-to-round wiggles are noise.",
        "- DP (server-side fixed clipping at norm 1, equal weights, Gaussian noise of multiplier x clip / 4 devices "
        "per value): after the last round, participating / non-participating accuracy is "
        + "; ".join(f"{c['label']}: {c['curve'][-1]['participating']:.3f} / {c['curve'][-1]['non_participating']:.3f}"
                    for c in cfgs)
        + ". But the privacy the accountant reports (RDP, no sampling amplification, delta 1e-5) is no privacy "
        "at all here: "
        + ", ".join(f"epsilon {e:,.0f} after the last round at {lbl}" for lbl, e in dp_eps if e is not None)
        + ". Four devices cannot buy a meaningful epsilon; it needs noise multipliers near 1 and hundreds of devices "
        "per round, which this 2-core machine cannot simulate with MiniLM.",
        f"- Personalizing on top of the population vs on top of the base: the user starts higher on the population "
        f"for {better_start} of {len(personal)} users; after the same {results['args']['personal_steps']} steps it is "
        f"higher for {better_end} and equal for {equal_end} of {len(personal)} (same 80-tweet caveat).",
        "- Bytes are the raw float32 arrays of the trainable tensors each way (25,731 values), without Flower's "
        "message framing; a device sends the full values, as FedAvg averages values, not differences. Seconds per "
        "round include the devices' training, the server's checks, the evaluation request and the save; round 1 "
        "also includes Ray's actors opening the bundle.",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fleet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=str(ROOT / "demo_out" / "bundle"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "_work" / "fleet"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps-per-round", type=int, default=8)
    parser.add_argument("--train", type=int, default=120)
    parser.add_argument("--holdout", type=int, default=80)
    parser.add_argument("--dp-clip", type=float, default=1.0)
    parser.add_argument("--dp-noise", type=float, nargs=2, default=[0.02, 0.1])
    parser.add_argument("--personal-steps", type=int, default=20)
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md / benchmarks/fleet.png")
    parser.add_argument("--rerender", action="store_true", help="rewrite the section and plot from OUT/fleet.json, running nothing")
    args = parser.parse_args(argv)
    if args.rerender:
        results = json.loads((Path(args.out) / "fleet.json").read_text())
        _plot(results, ROOT / "benchmarks" / "fleet.png")
        _write_section(_section(results))
        return 0
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

    from demo.datasets import demo_tweets, general_slice
    from demo.story import FULL

    from bitfit.sdk.bundle import Bundle

    if not (Path(args.bundle) / "manifest.json").exists():
        raise SystemExit(f"{args.bundle} is not a bundle: run `make demo` first")
    started = time.perf_counter()
    domains = demo_tweets()
    general = {t.text for t in general_slice(domains, FULL.general_per_label)}
    data = _split(domains, general, args.train, args.holdout)
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    _write_clients(data, work / "clients")
    configs = [_run_config(args.bundle, data, work, "no DP", args)]
    for noise in args.dp_noise:
        configs.append(_run_config(args.bundle, data, work, f"DP noise {noise:g}, clip {args.dp_clip:g}", args,
                                   dp_noise=noise, dp_clip=args.dp_clip))
    users = [PARTICIPANTS[0], PARTICIPANTS[1], *OUTSIDERS]
    personal = _personalize_compare(args.bundle, data, configs[0]["store"], users, args.personal_steps)
    results = {
        "command": " ".join(["python -m benchmarks.fleet", *(argv if argv is not None else sys.argv[1:])]),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
        "args": vars(args), "configs": configs, "personalize": personal,
        "trainable_values": int(sum(v.size for v in Bundle.open(args.bundle, verify="sizes").trainable_base().values())),
        "seconds": time.perf_counter() - started,
    }
    (work / "fleet.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"done in {results['seconds']:.0f}s; {work / 'fleet.json'}")
    if not args.no_write:
        _plot(results, ROOT / "benchmarks" / "fleet.png")
        _write_section(_section(results))
    return 0


def _write_section(text: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    current = path.read_text(encoding="utf-8")
    if SECTION in current:  # replace this section only, keep any section after it
        start = current.index(SECTION)
        end = current.find("\n## ", start + len(SECTION))
        after = current[end:] if end >= 0 else ""
        path.write_text(current[:start] + text.rstrip() + "\n" + after, encoding="utf-8")
        return
    path.write_text(current.rstrip() + "\n\n" + text, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
