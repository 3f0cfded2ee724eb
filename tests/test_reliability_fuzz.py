"""Property tests: garbage in, typed errors out.

- The manifest reader (``Manifest.from_json``, ``Bundle.open``) on mutated manifests raises
  only ``BundleInvalidError``.
- ``personalize`` on random ``user_data`` (nested lists, dicts, None, bytes, numbers, arrays
  of any shape and dtype) either trains or raises ``InvalidUserDataError`` /
  ``BudgetExceededError``, and writes nothing to the store when it raises.
- ``predict`` on random inputs and user ids either predicts or raises ``InvalidUserDataError``
  (the inputs) / ``InvalidArgumentError`` (the user ids).

200 examples per property normally, 1000 with ``BITFIT_STRESS=1``.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import reliability_fixtures as rf
from bitfit.sdk.bundle import Bundle, Manifest, manifest_checksum
from bitfit.sdk.errors import BudgetExceededError, BundleInvalidError, InvalidArgumentError, InvalidUserDataError
from bitfit.sdk.personalizer import Personalizer

text_bundle = rf.session_bundle("text")
numeric_bundle = rf.session_bundle("numeric")
EXAMPLES = 1000 if rf.stress() else 200
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

# ------------------------------------------------------------------------------ strategies

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
           | st.binary(max_size=12))
json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
nested = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
                      | st.dictionaries(st.sampled_from(["text", "label", "labels", "x", "input_ids"]) | st.text(max_size=6),
                                        inner, max_size=4), max_leaves=16)

words = st.lists(st.sampled_from(rf.WORDS), min_size=1, max_size=8).map(" ".join)
texts = words | st.text(max_size=30) | st.binary(max_size=20) | st.none() | st.integers() | st.just("")
text_labels = (st.sampled_from(["neg", "pos"]) | st.integers(-2, 3) | st.sampled_from(["neutral", "", "POS"])
               | st.floats() | st.none() | st.booleans() | st.lists(st.integers(0, 1), max_size=2) | st.binary(max_size=3))
records = (st.tuples(texts, text_labels) | st.fixed_dictionaries({"text": texts, "label": text_labels})
           | st.lists(texts, max_size=3) | nested)
mostly_valid_records = st.tuples(words, st.sampled_from(["neg", "pos"]))
text_user_data = (st.lists(records, max_size=40) | st.lists(mostly_valid_records, min_size=1, max_size=40)
                  | nested | st.dictionaries(st.sampled_from(["input_ids", "attention_mask", "token_type_ids", "labels"]),
                                             nested | hnp.arrays(np.int64, hnp.array_shapes(max_dims=2, max_side=6),
                                                                 elements=st.integers(-5, 80)), max_size=4))


@st.composite
def numeric_user_data(draw):
    kind = draw(st.sampled_from(["valid-shape", "valid-shape", "valid-shape", "any-array", "nested", "tuple"]))
    if kind == "nested":
        return draw(nested)
    if kind in ("valid-shape", "tuple"):
        n = draw(st.integers(0, 30) if draw(st.integers(0, 4)) else st.integers(31, 40))
        finite = st.floats(-1e6, 1e6, width=32)
        x = draw(hnp.arrays(np.float32, (n, rf.NUMERIC_WIDTH),
                            elements=finite if draw(st.integers(0, 3)) else finite | st.sampled_from([np.nan, np.inf])))
    else:
        x = draw(hnp.arrays(st.sampled_from([np.float32, np.float64, np.int64, np.bool_, np.complex64, np.dtype("U3"),
                                             np.uint64]),
                            hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=10)) | nested)
    rows = len(x) if isinstance(x, np.ndarray) and x.ndim else draw(st.integers(0, 41))
    if draw(st.integers(0, 2)):  # mostly one label per row, of a plausible kind
        labels = draw(hnp.arrays(np.int64, (rows,), elements=st.integers(0, 2))
                      | st.lists(st.sampled_from(["a", "b", "c"]), min_size=rows, max_size=rows)
                      | st.lists(st.integers(-1, 3) | st.sampled_from(["a", "z"]) | scalars, min_size=rows, max_size=rows))
    else:
        labels = draw(hnp.arrays(np.int64, (draw(st.integers(0, 41)),), elements=st.integers(-1, 3))
                      | st.lists(st.sampled_from(["a", "b", "c"]) | st.integers(-1, 3) | scalars, max_size=41) | nested)
    if kind == "tuple":
        return ({"x": x}, labels)
    data = {"x": x, "labels": labels}
    if draw(st.booleans()) and draw(st.booleans()):
        data[draw(st.text(max_size=4))] = draw(nested)
    return data


@st.composite
def mutated_manifest(draw, raw: dict) -> str:
    raw = copy.deepcopy(raw)
    for _ in range(draw(st.integers(1, 3))):
        node, key = None, None
        current = raw
        while isinstance(current, (dict, list)) and current and draw(st.integers(0, 3)) > 0:
            keys = sorted(current) if isinstance(current, dict) else list(range(len(current)))
            node, key = current, draw(st.sampled_from(keys))
            current = current[key]
        if node is None:
            node, key = raw, draw(st.sampled_from(sorted(raw)))
        action = draw(st.sampled_from(["replace", "delete", "add", "type"]))
        if action == "replace":
            node[key] = draw(json_values)
        elif action == "delete":
            del node[key]
        elif action == "add" and isinstance(node, dict):
            node[draw(st.text(max_size=10))] = draw(json_values)
        elif action == "add":
            node.insert(key, draw(json_values))
        else:
            value = node[key]
            node[key] = [value] if not isinstance(value, list) else {"x": value}
    if draw(st.integers(0, 4)) > 0:
        # Mostly re-seal the checksum, as someone rewriting the manifest would, so the
        # field checks behind it are what gets fuzzed; sometimes leave it stale.
        try:
            raw["checksum"] = manifest_checksum(raw)
        except BundleInvalidError:
            pass  # a value JSON cannot hold: the reader must refuse it anyway
    text = json.dumps(raw)
    if draw(st.integers(0, 9)) == 0:  # sometimes damage the text itself
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(max_size=3)) + text[at + draw(st.integers(0, 3)):]
    return text


# ------------------------------------------------------------------------------ manifest reader


@pytest.fixture(scope="module")
def manifest_raw(text_bundle):
    return json.loads((text_bundle / "manifest.json").read_text())


@FUZZ
@given(data=st.data())
def test_manifest_from_json_raises_only_bundle_invalid(manifest_raw, data):
    text = data.draw(mutated_manifest(manifest_raw))
    try:
        manifest = Manifest.from_json(text)
    except BundleInvalidError as err:
        assert str(err)
        return
    # What it accepts has the types every reader relies on.
    assert all(isinstance(t.name, str) and all(type(d) is int and d > 0 for d in t.shape) for t in manifest.trainable)
    assert all(isinstance(e.path, str) for e in manifest.files.values())


@pytest.fixture(scope="module")
def bundle_copy(numeric_bundle, tmp_path_factory):
    return rf.copy_bundle(numeric_bundle, tmp_path_factory.mktemp("fuzz") / "b")


@FUZZ
@given(data=st.data())
def test_bundle_open_on_mutated_manifests_raises_only_bundle_invalid(bundle_copy, numeric_bundle, data):
    raw = json.loads((numeric_bundle / "manifest.json").read_text())
    (bundle_copy / "manifest.json").write_text(data.draw(mutated_manifest(raw)))
    for verify in ("hashes", "none"):
        try:
            Bundle.open(bundle_copy, verify=verify)
        except BundleInvalidError:
            pass


# ------------------------------------------------------------------------------ user data


@pytest.fixture(scope="module")
def text_personalizer(text_bundle, tmp_path_factory):
    return Personalizer(text_bundle, tmp_path_factory.mktemp("fuzz-text") / "store")


@pytest.fixture(scope="module")
def numeric_personalizer(numeric_bundle, tmp_path_factory):
    return Personalizer(numeric_bundle, tmp_path_factory.mktemp("fuzz-numeric") / "store")


def _personalize_or_typed_error(p: Personalizer, user_data) -> str:
    before = rf.snapshot(p.store.root)
    try:
        result = p.personalize(user_data, user="fuzz", epochs=1, batch_size=16, max_examples=30, reset=True,
                               progress_bar=False)
    except (InvalidUserDataError, BudgetExceededError) as err:
        assert str(err)
        assert rf.snapshot(p.store.root) == before, "an invalid call must write nothing"
        return type(err).__name__
    assert p.store.current_version("fuzz") == result.version
    return "trained"


@FUZZ
@given(user_data=text_user_data)
def test_text_user_data_trains_or_raises_a_data_error(text_personalizer, user_data):
    _personalize_or_typed_error(text_personalizer, user_data)


@FUZZ
@given(user_data=numeric_user_data())
def test_numeric_user_data_trains_or_raises_a_data_error(numeric_personalizer, user_data):
    _personalize_or_typed_error(numeric_personalizer, user_data)


def test_the_strategies_reach_both_outcomes(text_personalizer, numeric_personalizer):
    """The properties above are only meaningful if valid data is generated too."""
    outcomes = set()
    for p, strategy in ((text_personalizer, text_user_data), (numeric_personalizer, numeric_user_data())):
        seen = set()

        @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)
        @given(strategy)
        def collect(user_data):
            seen.add(_personalize_or_typed_error(p, user_data))

        collect()
        outcomes |= {(p.bundle.manifest.text is not None, o) for o in seen}
        assert "trained" in seen and "InvalidUserDataError" in seen, seen
    assert len(outcomes) >= 4


@FUZZ
@given(inputs=nested | st.lists(texts, max_size=5) | st.dictionaries(st.sampled_from(["x", "input_ids"]), nested, max_size=2),
       user=st.none() | st.text(max_size=5) | st.lists(st.none() | st.text(max_size=3), max_size=5) | scalars)
def test_predict_on_random_inputs_predicts_or_raises_a_data_error(text_personalizer, numeric_personalizer, inputs, user):
    for p in (text_personalizer, numeric_personalizer):
        try:
            prediction = p.predict(inputs, user=user)
        except (InvalidUserDataError, InvalidArgumentError):
            continue
        assert np.all(np.isfinite(prediction.logits))


def test_fuzz_leaves_no_debris(text_personalizer, numeric_personalizer):
    for p in (text_personalizer, numeric_personalizer):
        leftovers = [f for f in p.store.root.rglob("*") if f.name.startswith(".tmp-")]
        assert not leftovers
        shutil.rmtree(p.store.root, ignore_errors=True)
