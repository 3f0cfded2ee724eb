"""Check that a virtual environment holds the ONNX Runtime it should, and nothing it must not.

Plain ``onnxruntime`` and ``onnxruntime-training(-cpu)`` both install the module
``onnxruntime``: with both installed, whichever was installed last silently wins. This
prints which ONNX Runtime distribution is installed (the record of what ``make install``
resolved) and exits 1 unless it is exactly the expected one and every ``--absent`` module
is not importable.

Usage:
    python tools/check_env.py --ort onnxruntime --absent torch onnx transformers optimum
    python tools/check_env.py --ort onnxruntime-training-cpu

Example:
    >>> problems("no-such-ort", absent=["no_such_module"])[0].startswith("expected no-such-ort")
    True
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from importlib.metadata import distributions


def ort_distributions() -> dict[str, str]:
    """Installed distributions that provide ONNX Runtime's module: name -> version."""
    found = {}
    for dist in distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith("onnxruntime") and "onnxruntime" in (dist.read_text("top_level.txt") or "onnxruntime").split():
            found[name] = dist.version
    return found


def problems(expected: str, absent: list[str]) -> list[str]:
    """What is wrong with this environment (empty when all is well)."""
    out = []
    installed = ort_distributions()
    if list(installed) != [expected]:
        out.append(f"expected {expected} as the only ONNX Runtime distribution, found {installed or 'none'}")
    out += [f"{m} is importable here but must not be" for m in absent if importlib.util.find_spec(m) is not None]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ort", required=True, help="the one ONNX Runtime distribution expected")
    parser.add_argument("--absent", nargs="*", default=[], help="modules that must not be importable")
    args = parser.parse_args(argv)
    found = problems(args.ort, args.absent)
    installed = ", ".join(f"{n} {v}" for n, v in ort_distributions().items()) or "no onnxruntime"
    print(f"{sys.prefix}: Python {sys.version.split()[0]}, {installed}")
    for problem in found:
        print(f"check_env: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
