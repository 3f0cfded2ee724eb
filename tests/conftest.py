"""Shared fixtures: the exported MiniLM bundle (once per session) and the bundle checks
every export test applies."""

from __future__ import annotations

import hashlib
import math
import sys
from pathlib import Path

import numpy as np
import pytest

# The demo's data and base recipe (demo/) and the benchmarks live beside the library, not in
# it: importable from the repository root however pytest is started.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

MINILM_LABELS = ["negative", "neutral", "positive"]


@pytest.fixture(scope="session")
def minilm_bundle(tmp_path_factory):
    """The built-in ``minilm`` exported once per session with three sentiment labels (~15 s).

    Read-only: tests that change a bundle should copy it first. Needs the packaged model
    (``make install``); without it the export raises ExportError saying how to install it.
    """
    from bitfit.export import export_bundle

    out = tmp_path_factory.mktemp("minilm") / "bundle"
    return export_bundle("minilm", out, labels=MINILM_LABELS)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_bundle(bundle, *, trainable: list[str] | None = None, weights: dict[str, np.ndarray] | None = None) -> None:
    """Assert what every exported bundle must satisfy.

    ``trainable``: the expected trainable names, in order. ``weights``: tensors whose
    values the bundle's base weights must hold exactly (e.g. the torch parameters).
    """
    import onnx

    from bitfit.sdk.bundle import Bundle, fingerprint_tensors
    from bitfit.sdk.runtime import ort

    manifest = bundle.manifest
    reopened = Bundle.open(bundle.path)  # re-hashes every listed file
    assert reopened.manifest.to_json() == manifest.to_json()

    # Files: listed ones exist with the recorded sha256 and size; nothing unlisted is shipped.
    listed = set()
    for key, entry in manifest.files.items():
        path = bundle.path / entry.path
        assert path.is_file(), key
        assert _sha256(path) == entry.sha256, key
        assert path.stat().st_size == entry.bytes, key
        listed.add(Path(entry.path).as_posix())
    on_disk = {p.relative_to(bundle.path).as_posix() for p in bundle.path.rglob("*") if p.is_file()}
    assert on_disk - {"manifest.json"} == listed, "files in the bundle that the manifest does not list (or v.v.)"

    # Trainable set and the recorded counts.
    names = [t.name for t in manifest.trainable]
    if trainable is not None:
        assert names == trainable
    assert len(set(names)) == len(names)
    base = bundle.base_weights()
    for t in manifest.trainable:
        assert list(base[t.name].shape) == t.shape, t.name
        assert t.dtype == "float32"
        assert t.role in ("bias", "head-weight", "other")
        assert t.inference_shape == ([1, *t.shape] if manifest.per_row else t.shape), t.name
    policy = manifest.policy
    assert policy["trainable_values"] == sum(math.prod(t.shape) for t in manifest.trainable)
    assert policy["total_values"] == sum(v.size for v in base.values())
    assert policy["fraction"] == pytest.approx(policy["trainable_values"] / policy["total_values"])
    assert 0 < policy["fraction"] < 1
    assert manifest.base_fingerprint == fingerprint_tensors(base)
    if weights is not None:
        for name, value in weights.items():
            np.testing.assert_array_equal(base[name], value, err_msg=name)

    # Validation numbers, recorded by the export.
    v = manifest.validation
    assert v["inference_vs_source_max_abs_diff"] <= 1e-4
    assert v["inference_vs_training_max_abs_diff"] <= 1e-4
    assert v["one_step_frozen_unchanged"] is True
    assert v["frozen_excluded_from_gradients"] is True
    assert 1 <= v["one_step_trainable_changed"] <= len(names)
    assert math.isfinite(v["first_loss"])
    if manifest.per_row:
        assert manifest.source["per_row_reason"] == ""
        assert v["per_row_vs_row_by_row_max_abs_diff"] is not None and v["per_row_vs_row_by_row_max_abs_diff"] <= 1e-5
    else:
        assert manifest.source["per_row_reason"], "a bundle that is not per-row must say why"
        assert v["per_row_vs_row_by_row_max_abs_diff"] is None

    # The training graph has gradient buffers for exactly the trainable tensors, and the
    # inference graph takes each of them as an overridable input.
    training = onnx.load(str(bundle.file("training_model")), load_external_data=False)
    suffix = "_grad.accumulation.buffer"
    assert {i.name[: -len(suffix)] for i in training.graph.input if i.name.endswith(suffix)} == set(names)
    session = ort.InferenceSession(str(bundle.file("inference_model")), providers=["CPUExecutionProvider"])
    assert set(names) <= {i.name for i in session.get_overridable_initializers()}
    assert [o.name for o in session.get_outputs()][0] == manifest.logits_output


@pytest.fixture(scope="session")
def check_bundle():
    """``check_bundle(bundle, trainable=None, weights=None)``: the checks every bundle must pass."""
    return _check_bundle
