"""A population delta under each user's delta: base + population + user.

A fleet learns a shared *population delta* (``bitfit federate``); it is stored like any
delta, under a name of its own in a ``DeltaStore`` (e.g. ``"population"``), one version per
federated round. A user's delta trained on top of it is stored **relative to base +
population** and records which population version it was trained on in its info
(``{"population": {"name": ..., "version": ...}}``).

At inference a user's delta is applied on the population version it was trained on, never
on another one (a delta only means something over the values it was trained from): when the
fleet publishes a new population, a user keeps exactly the model they had until they
personalize again, which re-bases their delta onto the new population. A user without a delta
is served the current population. If the version a delta was trained on is no longer in the
store, the user is served the current population and reported (``on_bad_delta="raise"``:
DeltaMismatchError).

Example:
    >>> import numpy as np
    >>> from bitfit.sdk.delta import Delta
    >>> d = Delta.from_params({"b": np.ones(2, np.float32)}, {"b": np.zeros(2, np.float32)}, "sha256:" + "0" * 64,
    ...                       info={"population": {"name": "population", "version": 3}})
    >>> population_ref(d)
    PopulationRef(name='population', version=3)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .delta import Delta, check_delta_fits
from .errors import DeltaMismatchError, DeltaNotFoundError, InvalidArgumentError

INFO_KEY = "population"


@dataclass(frozen=True)
class PopulationRef:
    """Which population delta (its name in the store and its version) a user delta was trained on.

    Example:
        >>> PopulationRef("population", 2).as_info()
        {'name': 'population', 'version': 2}
    """

    name: str
    version: int

    def as_info(self) -> dict[str, Any]:
        """The form a delta's info records.

        Example:
            >>> PopulationRef("fleet", 1).as_info()["version"]
            1
        """
        return {"name": self.name, "version": self.version}


def check_population_name(name: Any) -> str | None:
    """``name`` if it can name a population delta in a store (None: no population).

    Example:
        >>> check_population_name("population"), check_population_name(None)
        ('population', None)
        >>> check_population_name("")
        Traceback (most recent call last):
        ...
        bitfit.sdk.errors.InvalidArgumentError: population must be None or the non-empty name of a population delta in the store, got ''
    """
    if name is None:
        return None
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"population must be None or the non-empty name of a population delta in the store, got {name!r}")
    return name


def population_ref(delta: Delta) -> PopulationRef | None:
    """The population a delta was trained on (from its info), None for a delta on the bare base.

    Example:
        >>> import numpy as np
        >>> d = Delta.from_params({"b": np.ones(1, np.float32)}, {"b": np.zeros(1, np.float32)}, "sha256:" + "0" * 64)
        >>> population_ref(d) is None
        True
    """
    raw = (delta.info or {}).get(INFO_KEY)
    if not isinstance(raw, dict):
        return None
    name, version = raw.get("name"), raw.get("version")
    if not isinstance(name, str) or not name or type(version) is not int or version < 1:
        raise DeltaMismatchError(f"the delta's info names population {raw!r}, which is not a name and a version >= 1")
    return PopulationRef(name, version)


def load_population(store: Any, name: str, manifest: Any, version: int | None = None) -> tuple[Delta, PopulationRef]:
    """A population delta (the current version, or ``version``) checked against the bundle.

    Raises DeltaNotFoundError when the store has no such population (version).

    Example:
        >>> delta, ref = load_population(store, "population", bundle.manifest)      # doctest: +SKIP
        >>> ref                                                                     # doctest: +SKIP
        PopulationRef(name='population', version=4)
    """
    delta = store.load(name, version)
    check_delta_fits(delta, base_fingerprint=manifest.base_fingerprint, shapes=manifest.trainable_shapes)
    if population_ref(delta) is not None:
        raise DeltaMismatchError(f"{name!r} v{version or 'current'} is itself trained on a population: a population "
                                 "delta must be relative to the base")
    resolved = version if version is not None else store.current_version(name)
    return delta, PopulationRef(name, int(resolved))


def offsets(delta: Delta, store: Any, manifest: Any) -> dict[str, np.ndarray]:
    """What a delta adds to the base: its own tensors, plus those of the population version it
    was trained on (training shapes).

    Raises DeltaNotFoundError (as DeltaMismatchError) when that population version is gone.

    Example:
        >>> offsets(store.load("alice"), store, bundle.manifest)["classifier.bias"]    # doctest: +SKIP
        array([ 0.12, -0.03,  0.01], dtype=float32)
    """
    ref = population_ref(delta)
    own = {name: np.asarray(value, np.float32) for name, value in delta.tensors.items()}
    if ref is None:
        return own
    if store is None:
        raise DeltaMismatchError(f"this delta was trained on population {ref.name!r} v{ref.version}, and there is no store to load it from")
    try:
        population, _ = load_population(store, ref.name, manifest, ref.version)
    except DeltaNotFoundError as err:
        raise DeltaMismatchError(
            f"this delta was trained on population {ref.name!r} v{ref.version}, which is not in the store ({err}); "
            "personalize again (it re-bases onto the current population)"
        ) from err
    return {name: own[name] + np.asarray(population.tensors[name], np.float32).reshape(own[name].shape) for name in own}


__all__ = ["INFO_KEY", "PopulationRef", "check_population_name", "population_ref", "load_population", "offsets"]
