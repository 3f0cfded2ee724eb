"""Every public docstring example runs as written (examples marked +SKIP need a bundle on disk),
and every public function, class and method of bitfit.sdk and bitfit.export has one.

(Until 2026-12-02 a ratchet list carried the names that still lacked an example, 132 at the
start; it is empty now and gone: every public name must show an example.)
"""

from __future__ import annotations

import doctest
import importlib
import inspect
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


def _public(module) -> list[tuple[str, object]]:
    """Functions, classes and their methods/properties a module offers: in ``__all__`` where the
    module has one, else every name not starting with ``_``; only those defined in the module."""
    names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    found = []
    for name in names:
        obj = getattr(module, name)
        if not (inspect.isfunction(obj) or inspect.isclass(obj)) or obj.__module__ != module.__name__:
            continue
        found.append((name, obj))
        if inspect.isclass(obj):
            for attr, value in vars(obj).items():
                member = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
                if not attr.startswith("_") and inspect.isfunction(member):
                    found.append((f"{name}.{attr}", member))
    return found


@pytest.mark.parametrize("name", _modules())
def test_every_public_function_has_an_example(name: str) -> None:
    """Every public function, class and method of bitfit.sdk and bitfit.export shows a ``>>>`` example."""
    module = importlib.import_module(name)
    missing = sorted(n for n, obj in _public(module) if ">>>" not in (inspect.getdoc(obj) or ""))
    assert not missing, f"{name}: public names whose docstring has no >>> example: {missing}"
