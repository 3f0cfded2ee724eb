"""``python -m demo [--out DIR] [--quick]``: the whole story on the packaged MiniLM and real tweets.

Example:
    >>> main(["--help"])                                                               # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse the options and run the story; 0 on success.

    Example:
        >>> main(["--out", "/tmp/demo", "--quick"])                                    # doctest: +SKIP
        0
    """
    parser = argparse.ArgumentParser(prog="python -m demo",
                                     description="bitfit demo: on-device personalization of the packaged MiniLM on real tweets")
    parser.add_argument("--out", default="demo_out", help="where the bundle, the delta store, report.md and accuracy.png go")
    parser.add_argument("--quick", action="store_true", help="2 users with 80 examples each (about a minute)")
    args = parser.parse_args(argv)
    from .story import run_demo

    run_demo(out_dir=args.out, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
