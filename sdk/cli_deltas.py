"""``bitfit deltas STORE ACTION``: manage a delta store from the command line.

    bitfit deltas STORE list [--user U] [--key-file F]
    bitfit deltas STORE show --user U
    bitfit deltas STORE rollback --user U [--version N]
    bitfit deltas STORE rm --user U [--version N]

Example:
    >>> from bitfit.sdk.cli import main
    >>> main(["deltas", "/tmp/no-such-store", "list"])      # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import json

from .errors import InvalidArgumentError
from .options import key_from_file

ACTIONS = ("list", "show", "rollback", "rm")


def add_parser(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add the ``deltas`` command to the ``bitfit`` parser's subcommands.

    Example:
        >>> import argparse
        >>> parser = argparse.ArgumentParser(prog="bitfit")
        >>> _ = add_parser(parser.add_subparsers(dest="command"))
        >>> parser.parse_args(["deltas", "store", "list"]).action
        'list'
    """
    de = sub.add_parser("deltas", help="inspect and manage a delta store")
    de.add_argument("store")
    de.add_argument("action", choices=list(ACTIONS))
    de.add_argument("--user")
    de.add_argument("--version", type=int)
    de.add_argument("--key-file", help="file holding the store's AES key (16, 24 or 32 bytes)")
    return de


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``bitfit deltas`` command; the exit status.

    Example:
        >>> import argparse, tempfile
        >>> run(argparse.Namespace(store=tempfile.mkdtemp(), action="list", user=None, version=None, key_file=None))
        0
    """
    from .store import DeltaStore

    store = DeltaStore(args.store, key=key_from_file(args.key_file) if args.key_file else None)
    if args.action == "list":
        users = [args.user] if args.user else store.users()
        for user in users:
            print(f"{user}\tcurrent v{store.current_version(user)}\tversions {store.versions(user)}")
        return 0
    if not args.user:
        raise InvalidArgumentError("--user is required for show, rollback and rm")
    if args.action == "show":
        for row in store.info(args.user):
            print(json.dumps(row, default=str))
    elif args.action == "rollback":
        print(f"{args.user}: current version is now v{store.rollback(args.user, args.version)}")
    else:
        store.delete(args.user, args.version)
        print(f"{args.user}: deleted {'v' + str(args.version) if args.version else 'all versions'}")
    return 0
