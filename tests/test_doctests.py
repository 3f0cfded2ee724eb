"""Every public docstring example runs as written (examples marked +SKIP need a bundle on disk)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import bitfit.export
import bitfit.sdk


def _modules() -> list[str]:
    names = []
    for package in (bitfit.sdk, bitfit.export):
        for info in pkgutil.iter_modules(package.__path__):
            names.append(f"{package.__name__}.{info.name}")
    return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def test_every_public_function_has_an_example() -> None:
    """Public functions and classes of the format and facade modules end with an example."""
    missing = []
    for name in ("bitfit.sdk.bundle", "bitfit.sdk.delta", "bitfit.sdk.store", "bitfit.sdk.personalizer",
                 "bitfit.sdk.predictor", "bitfit.export.pipeline", "bitfit.export.biases"):
        module = importlib.import_module(name)
        if "Example" not in (module.__doc__ or ""):
            missing.append(name)
    assert not missing, f"module docstrings without an Example: {missing}"
