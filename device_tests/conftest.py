"""The device suite: runs in ``.venv-device`` (plain onnxruntime, no torch, onnx or
transformers) on bundles exported beforehand in ``.venv`` by ``make_bundles.py``.

``make test-device`` exports them and passes their folder in ``BITFIT_DEVICE_BUNDLES``.
The data helpers are the workstation suite's (``tests/sdk_fixtures.py``, torch-free at
import) and the device examples' (``device_examples/example_data.py``), imported, not copied.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "device_examples")]
ENV = "BITFIT_DEVICE_BUNDLES"


def pytest_report_header(config: pytest.Config) -> list[str]:
    try:
        import onnxruntime

        runtime = f"onnxruntime {onnxruntime.__version__}"
    except ImportError as err:
        runtime = f"no onnxruntime ({err})"
    return [f"device suite: Python {sys.version.split()[0]}, {runtime}, bundles from {os.environ.get(ENV, '(unset)')}"]


def _bundle(name: str) -> Path:
    folder = os.environ.get(ENV)
    if not folder:
        pytest.fail(f"{ENV} is not set: run the device suite with `make test-device`, which exports the bundles first")
    index = Path(folder) / "bundles.json"
    if not index.is_file():
        pytest.fail(f"{index} is missing: export the bundles with `.venv/bin/python device_tests/make_bundles.py {folder}`")
    return Path(folder) / json.loads(index.read_text(encoding="utf-8"))["bundles"][name]


@pytest.fixture(scope="session")
def text_bundle() -> Path:
    """The tiny BERT classifier (labels neg, pos; per-row users); its base says "neg" for every probe."""
    return _bundle("text")


@pytest.fixture(scope="session")
def numeric_bundle() -> Path:
    """The MLP over ``features: float32 [batch, 8]`` (labels a, b, c)."""
    return _bundle("numeric")


@pytest.fixture(scope="session")
def tiny_text_bundle() -> Path:
    """The device examples' embedding + LayerNorm classifier over the built-in messages."""
    return _bundle("tiny-text")


@pytest.fixture(scope="session")
def tiny_mlp_bundle() -> Path:
    """The device examples' MLP over ``x: float32 [batch, 8]`` (labels low, medium, high)."""
    return _bundle("tiny-mlp")


@pytest.fixture(scope="session")
def bitfit_command() -> Path:
    """The ``bitfit`` console script of the interpreter running the suite (the device venv's)."""
    command = Path(sys.executable).with_name("bitfit.exe" if os.name == "nt" else "bitfit")
    assert command.is_file(), f"{command} is missing: install bitfit into this environment (make install)"
    return command
