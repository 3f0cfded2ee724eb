"""Can the device install (``pip install 'bitfit[device]'``) be had on every platform we claim?

For each target platform and Python version, ``pip download --only-binary=:all:`` resolves
and downloads the whole device install: bitfit's base dependencies plus the ``device``
extra, read from ``pyproject.toml`` so the requirements live in one place. Each target is
tried twice: with ONNX Runtime at the floor the extra names (``onnxruntime==FLOOR``) and
at the newest release pip finds. Binary wheels only, as a device without a compiler would
install. Prints a table (platform x Python -> versions resolved, or why not) and exits 1
if any target fails. Needs network access to the package index; takes a few minutes.

pip's limit: ``--platform`` and ``--python-version`` choose wheel tags and check
``Requires-Python``, but environment markers in the dependencies (``sys_platform``,
``platform_machine``) are evaluated for the machine running this script. Today those only
add small pure-Python packages (e.g. tqdm's ``colorama`` on Windows).

Usage:
    python tools/platform_check.py [--jobs N] [--only linux-aarch64] [--python 3.13]

Example:
    >>> reqs = device_requirements(Path(__file__).resolve().parents[1] / "pyproject.toml")
    >>> any(r.startswith("onnxruntime>=") for r in reqs), "numpy>=1.24" in reqs
    (True, True)
    >>> pin_floor(["numpy>=1.24", "onnxruntime>=1.20.0"])
    ['numpy>=1.24', 'onnxruntime==1.20.0']
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]


def _manylinux(arch: str, newest_glibc_minor: int = 28) -> list[str]:
    # pip does not expand a manylinux_2_28 tag to older glibc tags (it does for macOS), so a
    # glibc-2.28 device is described by every tag it accepts, down to manylinux2014 (2.17).
    return [f"manylinux_2_{m}_{arch}" for m in range(newest_glibc_minor, 16, -1)] + [f"manylinux2014_{arch}"]


# name -> the platform tags that device accepts (pip expands macOS versions and universal2 itself).
PLATFORMS: dict[str, list[str]] = {
    "linux-x86_64 (glibc 2.28)": _manylinux("x86_64"),
    "linux-aarch64 (glibc 2.28)": _manylinux("aarch64"),
    "macos-arm64 (14)": ["macosx_14_0_arm64"],
    "macos-x86_64 (14)": ["macosx_14_0_x86_64"],
    "windows-amd64": ["win_amd64"],
}
_WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)-.*\.whl$")


def device_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """bitfit's base dependencies plus its ``device`` extra, as written in ``pyproject``."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["device"]]


def pin_floor(requirements: list[str]) -> list[str]:
    """``onnxruntime>=X`` -> ``onnxruntime==X``; every other requirement unchanged."""
    out = []
    for req in requirements:
        match = re.fullmatch(r"onnxruntime\s*>=\s*([\w.]+)", req.strip())
        out.append(f"onnxruntime=={match.group(1)}" if match else req)
    if out == requirements:
        raise SystemExit(f"no 'onnxruntime>=FLOOR' among the device requirements {requirements}")
    return out


@dataclass
class Outcome:
    ok: bool
    versions: dict[str, str]
    error: str = ""

    def cell(self) -> str:
        if not self.ok:
            return f"FAIL ({self.error})"
        return f"ok ort {self.versions.get('onnxruntime', '?')}, numpy {self.versions.get('numpy', '?')}"


def download(requirements: list[str], platforms: list[str], python: str) -> Outcome:
    """``pip download`` the requirements with their dependencies for one target."""
    with tempfile.TemporaryDirectory(prefix="bitfit-platform-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--implementation", "cp",
                   "--python-version", python, "-d", tmp]
        for platform in platforms:
            command += ["--platform", platform]
        done = subprocess.run([*command, *requirements], capture_output=True, text=True)
        if done.returncode != 0:
            lines = [ln.strip() for ln in done.stderr.splitlines() if ln.strip().startswith("ERROR")]
            return Outcome(False, {}, (lines[0] if lines else done.stderr.strip()[-200:])[:160])
        versions = {}
        for wheel in Path(tmp).glob("*.whl"):
            match = _WHEEL.match(wheel.name)
            if match:
                versions[match["name"].lower().replace("_", "-")] = match["version"]
        return Outcome(True, versions)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=4, help="downloads at once (network-bound)")
    parser.add_argument("--only", action="append", help="platform name prefix to check (repeatable)")
    parser.add_argument("--python", action="append", help="Python version to check (repeatable)")
    args = parser.parse_args(argv)
    newest = device_requirements()
    floor = pin_floor(newest)
    platforms = {n: t for n, t in PLATFORMS.items() if not args.only or any(n.startswith(o) for o in args.only)}
    pythons = args.python or PYTHONS
    print(f"device install: {' '.join(newest)}")
    print(f"floor:          {' '.join(floor)}")
    started = time.perf_counter()
    jobs = {(name, py, kind): (reqs, tags) for name, tags in platforms.items() for py in pythons
            for kind, reqs in (("floor", floor), ("newest", newest))}
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {key: pool.submit(download, reqs, tags, key[1]) for key, (reqs, tags) in jobs.items()}
        results = {key: f.result() for key, f in futures.items()}
    print(f"\n| platform | python | floor | newest |\n|---|---|---|---|")
    for name in platforms:
        for py in pythons:
            print(f"| {name} | {py} | {results[name, py, 'floor'].cell()} | {results[name, py, 'newest'].cell()} |")
    failed = [key for key, outcome in results.items() if not outcome.ok]
    print(f"\n{len(results) - len(failed)} ok, {len(failed)} failed, in {time.perf_counter() - started:.0f} s "
          f"(pip download --only-binary=:all:, with dependencies)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
