"""``bitfit deltas STORE ACTION``: manage, inspect, combine and convert a store's deltas.

    bitfit deltas STORE list [--user U] [--key-file F]
    bitfit deltas STORE show --user U
    bitfit deltas STORE rollback --user U [--version N]
    bitfit deltas STORE rm --user U [--version N]
    bitfit deltas STORE inspect --user U [--user U2 ...] [--version V] [--bundle B] [--top K] [--plot FILE.png] [--json]
    bitfit deltas STORE compare --user U [--version V] [--other U2] [--other-version V2] [--json]
    bitfit deltas STORE combine --user U1 --user U2 [...] [--weights 1,2] [--mode mean|sum|subtract] --out NAME
    bitfit deltas STORE to-torch --user U --bundle B --out FILE.safetensors        (workstation)
    bitfit deltas STORE to-hf --user U --bundle B --model-dir HF_DIR --out DIR     (workstation)
    bitfit deltas STORE to-peft --user U --bundle B --out DIR                      (workstation)
    bitfit deltas STORE import --user U --bundle B --from FILE_OR_ADAPTER_DIR      (workstation)

Every action takes ``--key-file F`` for an encrypted store. The workstation actions import
``bitfit.export`` (torch) only when run; the rest is numpy. docs/deltas.md has examples.

Example:
    >>> from bitfit.sdk.cli import main
    >>> main(["deltas", "/tmp/no-such-store", "list"])      # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from .errors import InvalidArgumentError, MissingDependencyError
from .options import key_from_file

ACTIONS = ("list", "show", "rollback", "rm", "inspect", "compare", "combine", "to-torch", "to-hf", "to-peft", "import")
WORKSTATION_ACTIONS = ("to-torch", "to-hf", "to-peft", "import")


def add_parser(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add the ``deltas`` command (one sub-command per action) to the ``bitfit`` parser.

    Example:
        >>> import argparse
        >>> parser = argparse.ArgumentParser(prog="bitfit")
        >>> _ = add_parser(parser.add_subparsers(dest="command"))
        >>> parser.parse_args(["deltas", "store", "list"]).action
        'list'
        >>> parser.parse_args(["deltas", "store", "combine", "--user", "a", "--user", "b", "--out", "ab"]).user
        ['a', 'b']
    """
    de = sub.add_parser("deltas", help="inspect, combine, convert and manage a delta store")
    de.add_argument("store")
    actions = de.add_subparsers(dest="action", required=True, metavar="ACTION", help=", ".join(ACTIONS))
    key = argparse.ArgumentParser(add_help=False)
    key.add_argument("--key-file", help="file holding the store's AES key (16, 24 or 32 bytes)")

    def action(name: str, text: str) -> argparse.ArgumentParser:
        return actions.add_parser(name, help=text, parents=[key])

    ls = action("list", "users with their current and kept versions")
    ls.add_argument("--user")
    for name, text in (("show", "every version of a user, as JSON lines"), ("rollback", "make an older version current"),
                       ("rm", "delete a version, or the user")):
        p = action(name, text)
        p.add_argument("--user")
        p.add_argument("--version", type=int)

    ins = action("inspect", "how far a delta moved, per tensor and per layer")
    ins.add_argument("--user", action="append", help="repeat for a heat map across users")
    ins.add_argument("--version", type=int, help="default: the current version")
    ins.add_argument("--bundle", help="the bundle, for changes relative to the base values (else absolute only)")
    ins.add_argument("--top", type=int, default=5, help="how many most-moved tensors to list (default 5)")
    ins.add_argument("--plot", help="write a PNG: per-layer bars (one user) or a heat map (several); needs matplotlib")
    ins.add_argument("--json", action="store_true")

    cmp = action("compare", "cosine similarity per layer between two users or two versions")
    cmp.add_argument("--user")
    cmp.add_argument("--version", type=int)
    cmp.add_argument("--other", help="the other user (default: the same user)")
    cmp.add_argument("--other-version", type=int, help="default: the other user's current version")
    cmp.add_argument("--json", action="store_true")

    comb = action("combine", "average, weighted-sum or subtract deltas of one base into a new delta")
    comb.add_argument("--user", action="append", help="a user whose current delta enters (repeat)")
    comb.add_argument("--weights", help="comma-separated, one per --user (default: equal)")
    comb.add_argument("--mode", default="mean", choices=["mean", "sum", "subtract"],
                      help="mean (default), sum (task arithmetic), subtract (first minus second)")
    comb.add_argument("--out", help="the name to save the result under in this store")
    comb.add_argument("--encoding", choices=["fp32", "fp16", "int8"], help="default: the most precise of the inputs")

    for name, text in (("to-torch", "a safetensors state dict under the source model's parameter names"),
                       ("to-hf", "a Hugging Face model directory with the delta merged in"),
                       ("to-peft", "a PEFT BEFT adapter (Linear biases)")):
        p = action(name, text)
        p.add_argument("--user")
        p.add_argument("--version", type=int)
        p.add_argument("--bundle", help="the bundle the delta was trained on")
        p.add_argument("--out", help="the file (to-torch) or directory to write")
        p.add_argument("--strict", action="store_true", help="fail if any tensor cannot be mapped")
        if name == "to-hf":
            p.add_argument("--model-dir", help="the Hugging Face directory the bundle was exported from")
        if name == "to-peft":
            p.add_argument("--base-model", help="base_model_name_or_path for adapter_config.json")
        if name in ("to-hf", "to-peft"):
            p.add_argument("--overwrite", action="store_true")
        if name == "to-peft":
            p.add_argument("--strip-prefix", default="", help="remove this prefix from module paths (e.g. 'inner.')")

    imp = action("import", "a PyTorch BitFit state dict or a BEFT adapter -> a new delta version")
    imp.add_argument("--user")
    imp.add_argument("--bundle", help="the bundle the weights belong to")
    imp.add_argument("--from", dest="source", help=".safetensors / .bin / .pt state dict, or a BEFT adapter directory")
    imp.add_argument("--encoding", default="fp16", choices=["fp32", "fp16", "int8"])
    imp.add_argument("--strip-prefix", default="", help="prefix the keys carry that the model's names do not")
    return de


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``bitfit deltas`` command; the exit status.

    Example:
        >>> import argparse, tempfile
        >>> run(argparse.Namespace(store=tempfile.mkdtemp(), action="list", user=None, version=None, key_file=None))
        0
    """
    from .store import DeltaStore

    store = DeltaStore(args.store, key=key_from_file(args.key_file) if getattr(args, "key_file", None) else None)
    if args.action == "list":
        users = [args.user] if args.user else store.users()
        for user in users:
            print(f"{user}\tcurrent v{store.current_version(user)}\tversions {store.versions(user)}")
        return 0
    handler = _HANDLERS[args.action]
    return handler(store, args)


def _show(store: Any, args: argparse.Namespace) -> int:
    user = _one_user(args)
    for row in store.info(user):
        print(json.dumps(row, default=str))
    return 0


def _rollback(store: Any, args: argparse.Namespace) -> int:
    user = _one_user(args)
    print(f"{user}: current version is now v{store.rollback(user, args.version)}")
    return 0


def _rm(store: Any, args: argparse.Namespace) -> int:
    user = _one_user(args)
    store.delete(user, args.version)
    print(f"{user}: deleted {'v' + str(args.version) if args.version else 'all versions'}")
    return 0


def _inspect(store: Any, args: argparse.Namespace) -> int:
    from .bundle import Bundle
    from .delta import check_delta_fits
    from .delta_tools import format_inspection, inspect_delta, plot_layers

    users = _users(args, at_least=1)
    if args.version is not None and len(users) > 1:
        raise InvalidArgumentError("--version picks one version of one user; drop it to inspect several users' current deltas")
    bundle = Bundle.open(args.bundle) if args.bundle else None
    base = bundle.trainable_base() if bundle else None
    reports: dict[str, dict[str, Any]] = {}
    for user in users:
        version = args.version if args.version is not None else store.current_version(user)
        delta = store.load(user, version)
        if bundle is not None:
            check_delta_fits(delta, base_fingerprint=bundle.manifest.base_fingerprint, shapes=bundle.manifest.trainable_shapes)
        report = inspect_delta(delta, base, top=args.top)
        reports[f"{user} v{version}"] = {"user": user, "version": version, **report}
    if args.json:
        rows = list(reports.values())
        print(json.dumps(rows[0] if len(rows) == 1 else rows, default=str))
    else:
        print("\n\n".join(format_inspection(r, title=label) for label, r in reports.items()))
    if args.plot:
        path = plot_layers(reports, args.plot)
        if not args.json:
            print(f"plot: {path}")
    return 0


def _compare(store: Any, args: argparse.Namespace) -> int:
    from .delta_tools import compare_deltas, format_comparison

    user = _one_user(args)
    other = args.other or user
    version = args.version if args.version is not None else store.current_version(user)
    other_version = args.other_version if args.other_version is not None else store.current_version(other)
    if other == user and other_version == version:
        raise InvalidArgumentError(
            f"compare needs two deltas: give --other USER, or --version/--other-version for two versions of {user!r}")
    result = compare_deltas(store.load(user, version), store.load(other, other_version))
    label = f"{user} v{version} vs {other} v{other_version}"
    if args.json:
        print(json.dumps({"a": {"user": user, "version": version}, "b": {"user": other, "version": other_version}, **result}))
    else:
        print(format_comparison(result, title=label))
    return 0


def _combine(store: Any, args: argparse.Namespace) -> int:
    from .delta_tools import combine_deltas, subtract_deltas

    users = _users(args, at_least=1)
    if not args.out:
        raise InvalidArgumentError("--out NAME is required: the name the combined delta is saved under in this store")
    sources = [(u, store.current_version(u)) for u in users]
    deltas = [store.load(u, v) for u, v in sources]
    facts = {"sources": [{"user": u, "version": v} for u, v in sources]}
    if args.mode == "subtract":
        if len(deltas) != 2 or args.weights:
            raise InvalidArgumentError("--mode subtract takes exactly two --user (first minus second) and no --weights")
        result = subtract_deltas(deltas[0], deltas[1], encoding=args.encoding, info=facts)
    else:
        weights = _weights(args.weights, len(deltas))
        result = combine_deltas(deltas, weights, mode=args.mode, encoding=args.encoding, info=facts)
    version = store.save(args.out, result)
    print(f"{args.out}: saved v{version} ({args.mode} of {', '.join(f'{u} v{v}' for u, v in sources)}, {result.encoding})")
    return 0


def _to_torch(store: Any, args: argparse.Namespace) -> int:
    transfer, bundle, delta = _workstation(store, args, needs_out=True)
    print(transfer.save_torch_state_dict(bundle, delta, args.out, strict=args.strict).summary())
    return 0


def _to_hf(store: Any, args: argparse.Namespace) -> int:
    if not args.model_dir:
        raise InvalidArgumentError("--model-dir is required: the Hugging Face directory the bundle was exported from")
    transfer, bundle, delta = _workstation(store, args, needs_out=True)
    print(transfer.save_merged_hf_model(bundle, delta, args.model_dir, args.out, overwrite=args.overwrite,
                                        strict=args.strict).summary())
    return 0


def _to_peft(store: Any, args: argparse.Namespace) -> int:
    transfer, bundle, delta = _workstation(store, args, needs_out=True)
    print(transfer.save_beft_adapter(bundle, delta, args.out, base_model_name_or_path=args.base_model,
                                     strip_prefix=args.strip_prefix, overwrite=args.overwrite, strict=args.strict).summary())
    return 0


def _import(store: Any, args: argparse.Namespace) -> int:
    if not args.source:
        raise InvalidArgumentError("--from is required: a .safetensors/.bin/.pt state dict or a BEFT adapter directory")
    transfer, bundle, _ = _workstation(store, args, needs_out=False, load=False)
    version, report = transfer.import_delta(bundle, args.source, store, _one_user(args), encoding=args.encoding,
                                            strip_prefix=args.strip_prefix)
    print(f"{args.user}: saved v{version}; {report.summary()}")
    return 0


def _workstation(store: Any, args: argparse.Namespace, *, needs_out: bool, load: bool = True) -> tuple[Any, Any, Any]:
    """The transfer module (imported now: it needs the workstation install), the bundle and the delta."""
    from .bundle import Bundle

    user = _one_user(args)
    if not args.bundle:
        raise InvalidArgumentError(f"--bundle is required for {args.action}: the bundle the delta was trained on")
    if needs_out and not args.out:
        raise InvalidArgumentError(f"--out is required for {args.action}: where to write")
    try:
        from bitfit.export import delta_transfer
    except ImportError as err:
        raise MissingDependencyError(
            f"bitfit deltas {args.action} runs on the workstation: pip install 'bitfit[export]' (torch, onnx) ({err})") from err
    bundle = Bundle.open(args.bundle)
    delta = store.load(user, getattr(args, "version", None)) if load else None
    return delta_transfer, bundle, delta


def _one_user(args: argparse.Namespace) -> str:
    user = args.user
    if isinstance(user, list):
        if len(user) != 1:
            raise InvalidArgumentError(f"{args.action} takes one --user, got {len(user)}")
        user = user[0]
    if not user:
        raise InvalidArgumentError(f"--user is required for {args.action}")
    return user


def _users(args: argparse.Namespace, at_least: int) -> list[str]:
    users = args.user or []
    if len(users) < at_least:
        raise InvalidArgumentError(f"--user is required for {args.action} (repeat it for several users)")
    return users


def _weights(text: str | None, count: int) -> list[float] | None:
    if text is None:
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise InvalidArgumentError(f"--weights must be comma-separated numbers, got {text!r}") from None
    if len(weights) != count:
        raise InvalidArgumentError(f"--weights has {len(weights)} numbers for {count} users: give one per --user")
    return weights


_HANDLERS = {"show": _show, "rollback": _rollback, "rm": _rm, "inspect": _inspect, "compare": _compare,
             "combine": _combine, "to-torch": _to_torch, "to-hf": _to_hf, "to-peft": _to_peft, "import": _import}
