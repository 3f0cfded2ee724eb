"""The environment is what it claims: plain onnxruntime at or above bitfit's floor, no
training API, and none of the workstation's packages. Every other device test leans on this."""

from __future__ import annotations

import importlib.util
import re
import sys
from importlib.metadata import PackageNotFoundError, distributions, requires, version

import pytest

WORKSTATION_ONLY = ("torch", "onnx", "transformers", "optimum", "onnxscript")


def _numbers(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def test_onnxruntime_is_the_plain_package_at_or_above_the_floor():
    installed = {(d.metadata["Name"] or "").lower().replace("_", "-") for d in distributions()}
    assert "onnxruntime" in installed
    assert not {n for n in installed if n.startswith("onnxruntime-training")}, "the training package shares the module"
    floor = next(re.search(r">=\s*([\d.]+)", r).group(1) for r in requires("bitfit")
                 if r.startswith("onnxruntime") and 'extra == "device"' in r)
    import onnxruntime

    assert onnxruntime.__version__ == version("onnxruntime")
    assert _numbers(onnxruntime.__version__) >= _numbers(floor) >= (1, 20, 0)
    assert "CPUExecutionProvider" in onnxruntime.get_available_providers()


def test_no_training_api_and_no_workstation_packages():
    assert importlib.util.find_spec("onnxruntime.training") is None
    for name in WORKSTATION_ONLY:
        assert importlib.util.find_spec(name) is None, f"{name} is installed in the device environment"
    with pytest.raises(PackageNotFoundError):
        version("onnxruntime-training-cpu")


def test_the_sdk_imports_without_touching_the_workstation_side():
    from bitfit.sdk.runtime import has_training_api, ort

    import bitfit.sdk  # noqa: F401

    assert has_training_api() is False
    assert ort.__version__ == version("onnxruntime")
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in WORKSTATION_ONLY or m.startswith("bitfit.export"))
    assert leaked == []
