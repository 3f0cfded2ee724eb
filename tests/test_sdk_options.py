"""One set of option names and meanings across Personalizer, Predictor and DeltaStore
(``bitfit.sdk.options``): ``store``, ``providers`` (``device`` a deprecated alias), ``verify``,
wrong values as InvalidArgumentError, and the bundle's ``training_defaults``."""

from __future__ import annotations

import inspect
import json
import shutil
import warnings

import numpy as np
import pytest

from bitfit.sdk import DeltaStore, Personalizer, Predictor
from bitfit.sdk.bundle import Bundle, manifest_checksum
from bitfit.sdk.errors import BundleInvalidError, InvalidArgumentError
from bitfit.sdk.personalizer import DEFAULT_LEARNING_RATE
from bitfit.sdk.training_plan import learning_rate_for_size

from sdk_fixtures import *  # noqa: F401,F403  (fixtures and helpers)
from sdk_fixtures import PROBE_LABELS, PROBES, QUICK, numeric_data, text_data

TRAIN = {k: v for k, v in QUICK.items() if k != "learning_rate"}


@pytest.fixture
def data_home(tmp_path, monkeypatch):
    """The platform's data directory (platformdirs on Linux follows XDG_DATA_HOME), in tmp."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data-home"))
    return tmp_path / "data-home" / "bitfit" / "deltas"


def rewrite_manifest(bundle, out, change) -> Bundle:
    """A copy of ``bundle`` whose manifest fields went through ``change`` (checksum recomputed)."""
    shutil.copytree(bundle, out)
    raw = json.loads((out / "manifest.json").read_text())
    raw.pop("checksum")
    change(raw)
    raw["checksum"] = manifest_checksum(raw)
    (out / "manifest.json").write_text(json.dumps(raw))
    return Bundle.open(out)


# -- store ---------------------------------------------------------------------------------------------


def test_store_none_is_the_platform_data_directory_in_personalizer_and_predictor(text_bundle, data_home):
    p = Personalizer(text_bundle)
    p.personalize(text_data(32), user="alice", learning_rate=1e-2, **TRAIN)
    predictor = Predictor(text_bundle)
    assert p.store.root == predictor.store.root == data_home
    assert predictor.predict(PROBES, user="alice").labels == PROBE_LABELS  # found without naming the store


def test_store_false_is_no_store_in_predictor_only(text_bundle, tmp_path):
    base = Predictor(text_bundle, store=False)
    assert base.store is None and base.predict(PROBES).labels == ["neg"] * 4
    with pytest.raises(InvalidArgumentError, match="no delta store.*store=False"):
        base.predict(PROBES, user="alice")
    with pytest.raises(InvalidArgumentError, match="store must be a path, a DeltaStore, None"):
        Personalizer(text_bundle, store=False)  # a Personalizer saves deltas: it needs a store
    with pytest.raises(InvalidArgumentError, match="store=False"):
        Predictor(text_bundle, store=False, key=bytes(32))
    for bad in (3, True, b"dir"):
        with pytest.raises(InvalidArgumentError, match="store must be"):
            Predictor(text_bundle, store=bad)


def test_the_shared_options_have_the_same_defaults(text_bundle):
    personalizer = inspect.signature(Personalizer).parameters
    predictor = inspect.signature(Predictor).parameters
    for name in ("store", "providers", "threads", "key", "on_bad_delta", "verify"):
        assert personalizer[name].default == predictor[name].default, name
    assert predictor["providers"].default == "cpu" and predictor["verify"].default == "hashes"
    assert inspect.signature(DeltaStore).parameters["root"].default is None


# -- providers -----------------------------------------------------------------------------------------


def test_cpu_is_the_default_for_training_and_inference(text_bundle, tmp_path):
    p = Personalizer(text_bundle, store=tmp_path)
    assert p.providers == "cpu"
    p.personalize(text_data(12), user="u", max_steps=1, **TRAIN)
    # CPU even where this onnxruntime has CUDA: "auto" is the only value that picks CUDA by itself.
    assert p.predictor.session.get_providers() == ["CPUExecutionProvider"]
    assert Predictor(text_bundle, store=False).session.get_providers() == ["CPUExecutionProvider"]


def test_device_is_a_deprecated_alias_of_providers(text_bundle, tmp_path):
    with pytest.warns(DeprecationWarning, match=r"device='cpu' is deprecated: pass providers='cpu'"):
        p = Personalizer(text_bundle, store=tmp_path, device="cpu")
    assert p.providers == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert Personalizer(text_bundle, store=tmp_path, device="cuda").providers == "cuda"
        with pytest.raises(InvalidArgumentError, match="disagree"):
            Personalizer(text_bundle, store=tmp_path, device="cuda", providers="auto")
        with pytest.raises(InvalidArgumentError, match="device must be one of 'cpu', 'cuda'"):
            Personalizer(text_bundle, store=tmp_path, device="tpu")


@pytest.mark.parametrize(
    "cls, options, message",
    [
        (Personalizer, {"providers": "gpu"}, "providers must be 'cpu', 'cuda', 'auto'"),
        (Predictor, {"providers": "gpu"}, "providers must be 'cpu', 'cuda', 'auto'"),
        (Predictor, {"providers": ["CUDAExecutionProvider", 3]}, "providers must be"),
        (Personalizer, {"verify": "sha256"}, "verify must be one of 'hashes', 'sizes', 'none'"),
        (Predictor, {"verify": "sha256"}, "verify must be one of"),
        (Personalizer, {"backend": "onnx"}, "backend must be one of"),
        (Personalizer, {"on_bad_delta": "ignore"}, "on_bad_delta must be one of"),
        (Personalizer, {"graph_optimization": "max"}, "graph_optimization must be one of"),
        (Personalizer, {"threads": -1}, "threads must be an int"),
        (Predictor, {"threads": "2"}, "threads must be an int"),
        (Predictor, {"batch_size": 0}, "batch_size must be an int >= 1"),
        (Predictor, {"cache_size": -1}, "cache_size must be an int >= 0"),
        (Predictor, {"key": bytes(32), "store": DeltaStore("/tmp/unused")}, "does not use that key"),
    ],
)
def test_wrong_option_values_are_invalid_argument_errors(text_bundle, tmp_path, cls, options, message):
    options = {"store": tmp_path, **options}
    with pytest.raises(InvalidArgumentError, match=message):
        cls(text_bundle, **options)


def test_invalid_argument_error_is_a_value_error_and_bad_users_are_one_everywhere(text_bundle, tmp_path):
    assert issubclass(InvalidArgumentError, ValueError)
    p = Personalizer(text_bundle, store=tmp_path)
    for call in (lambda: p.personalize(text_data(8), user=""), lambda: p.predict(PROBES, user=[""] * 4),
                 lambda: p.store.load(""), lambda: p.personalize(text_data(8), user="u", holdout=2)):
        with pytest.raises(InvalidArgumentError):
            call()


# -- verify --------------------------------------------------------------------------------------------


def test_predictor_takes_verify_like_personalizer(text_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(text_bundle, copy)
    weights = copy / Bundle.open(copy).manifest.files["weights"].path
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # same size, another sha256
    weights.write_bytes(bytes(data))
    for cls in (Predictor, Personalizer):
        with pytest.raises(BundleInvalidError, match="sha256"):
            cls(copy, store=tmp_path / "s")
        assert cls(copy, store=tmp_path / "s", verify="sizes").bundle.manifest.labels == ["neg", "pos"]
        assert cls(copy, store=tmp_path / "s", verify="none").bundle.manifest.labels == ["neg", "pos"]


# -- training_defaults ---------------------------------------------------------------------------------


def test_personalize_takes_the_bundles_learning_rate(text_bundle, numeric_bundle, tmp_path):
    manifest = Bundle.open(text_bundle).manifest
    # A small model (21 k values): the rate for its size (docs/personalize.md), recorded at export.
    assert manifest.training_defaults == {"learning_rate": 0.0497}
    p = Personalizer(text_bundle, store=tmp_path)
    r = p.personalize(text_data(32), user="alice", **TRAIN)
    assert r.learning_rate == 0.0497 and p.predict(PROBES, user="alice").labels == PROBE_LABELS
    info = p.store.load("alice").info
    assert info["learning_rate"] == 0.0497 and info["learning_rate_from"] == "bundle"
    r = p.personalize(text_data(32), user="bob", learning_rate=3e-3, **TRAIN)
    info = p.store.load("bob").info
    assert r.learning_rate == 3e-3 and info["learning_rate"] == 3e-3 and info["learning_rate_from"] == "argument"


def test_a_format_2_manifest_without_training_defaults_uses_the_rate_for_its_size(numeric_bundle, tmp_path):
    old = rewrite_manifest(numeric_bundle, tmp_path / "old", lambda raw: raw.pop("training_defaults"))
    assert old.manifest.format_version == 2 and old.manifest.training_defaults == {}
    features, labels = numeric_data(16)
    p = Personalizer(old, store=tmp_path / "s")
    r = p.personalize({"features": features, "labels": labels}, user="u", holdout=0.0, **TRAIN)
    assert r.learning_rate == learning_rate_for_size(old.manifest.policy["total_values"]) == 0.1
    assert p.store.load("u").info["learning_rate_from"] == "model size"
    # Without the model's size either, the MiniLM-tuned constant.
    older = rewrite_manifest(old.path, tmp_path / "older", lambda raw: raw["policy"].pop("total_values"))
    r = Personalizer(older, store=tmp_path / "s2").personalize({"features": features, "labels": labels}, user="u",
                                                              holdout=0.0, **TRAIN)
    assert r.learning_rate == DEFAULT_LEARNING_RATE == 2e-3
    future = rewrite_manifest(numeric_bundle, tmp_path / "future",
                              lambda raw: raw["training_defaults"].update(epochs=5))  # a name this SDK does not know
    assert future.manifest.training_defaults["learning_rate"] == Bundle.open(numeric_bundle).manifest.training_defaults["learning_rate"]


@pytest.mark.parametrize("value", [None, [], {"learning_rate": -1.0}, {"learning_rate": "0.01"}, {"learning_rate": True}])
def test_a_malformed_training_defaults_is_refused(numeric_bundle, tmp_path, value):
    def change(raw):
        raw["training_defaults"] = value

    with pytest.raises(BundleInvalidError, match="training_defaults"):
        rewrite_manifest(numeric_bundle, tmp_path / "bad", change)


def test_export_records_the_learning_rate_and_prints_nothing_unless_asked(tmp_path, capsys):
    from bitfit.export import export_bundle
    from bitfit.export.pipeline import default_learning_rate
    from bitfit.sdk.errors import ExportError

    from sdk_fixtures import build_numeric_model

    model, example = build_numeric_model()
    bundle = export_bundle(model, tmp_path / "b", example_inputs=example, learning_rate=0.05)
    assert bundle.manifest.training_defaults == {"learning_rate": 0.05}
    assert capsys.readouterr().out == ""  # library code does not print unasked
    export_bundle(model, tmp_path / "b", example_inputs=example, overwrite=True, verbose=True)
    assert "trainable tensors" in capsys.readouterr().out
    assert default_learning_rate(22_566_531) == 4e-3 and default_learning_rate(20_866) == 0.0497
    for bad in (0, -1.0, float("nan"), "0.01"):
        with pytest.raises(ExportError, match="learning_rate must be a positive number"):
            export_bundle(model, tmp_path / "c", example_inputs=example, learning_rate=bad)
    assert np.isfinite(bundle.manifest.training_defaults["learning_rate"])


# ------------------------------------------------------------------------------ threads


@pytest.mark.parametrize("threads, total_values, training, inference", [
    (None, None, 0, 0),              # the size unknown: onnxruntime's default
    (None, 20_000, 1, 0),            # a small model trains on one thread; inference keeps the default
    (None, 22_600_000, 0, 0),        # MiniLM: onnxruntime's default
    (0, 20_000, 0, 0), (3, 20_000, 3, 3), (3, 22_600_000, 3, 3),  # given: as given, everywhere
])
def test_threads_for_training_and_inference(numeric_bundle, monkeypatch, threads, total_values, training, inference):
    bundle = Bundle.open(numeric_bundle)
    if total_values is None:
        monkeypatch.delitem(bundle.manifest.policy, "total_values")
    else:
        monkeypatch.setitem(bundle.manifest.policy, "total_values", total_values)
    assert bundle.manifest.total_values == total_values
    from bitfit.sdk.trainer import open_training_session

    session = open_training_session(bundle, backend="portable", threads=threads)
    assert session._gradient.get_session_options().intra_op_num_threads == training
    assert Predictor(bundle, store=False, threads=threads).session.get_session_options().intra_op_num_threads == inference


@pytest.mark.parametrize("threads", [-1, 1.5, "2", True])
def test_bad_threads_are_refused_naming_what_is_accepted(numeric_bundle, tmp_path, threads):
    for make in (lambda: Personalizer(numeric_bundle, tmp_path / "s", threads=threads),
                 lambda: Predictor(numeric_bundle, store=False, threads=threads)):
        with pytest.raises(InvalidArgumentError, match="threads must be an int >= 0 .0: onnxruntime's default, one per core. or None .the SDK's choice."):
            make()


def test_given_session_options_keep_their_threads_unless_threads_is_given(numeric_bundle):
    from bitfit.sdk.runtime import ort
    from bitfit.sdk.trainer import open_training_session

    bundle = Bundle.open(numeric_bundle)  # a small model: threads=None alone would mean 1
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = open_training_session(bundle, backend="portable", session_options=options)
    assert session._gradient.get_session_options().intra_op_num_threads == 2
    options = ort.SessionOptions()
    session = open_training_session(bundle, backend="portable", session_options=options, threads=3)
    assert session._gradient.get_session_options().intra_op_num_threads == 3


@pytest.mark.parametrize("total_values, optimized", [
    (20_000, False),        # a small model trains without graph optimizations
    (22_600_000, True),     # MiniLM keeps onnxruntime's
    (None, True),           # the size unknown: pretrained-size
])
def test_graph_optimizations_for_training_and_inference(numeric_bundle, monkeypatch, total_values, optimized):
    from bitfit.sdk.runtime import ort
    from bitfit.sdk.trainer import open_training_session

    bundle = Bundle.open(numeric_bundle)
    if total_values is None:
        monkeypatch.delitem(bundle.manifest.policy, "total_values")
    else:
        monkeypatch.setitem(bundle.manifest.policy, "total_values", total_values)
    session = open_training_session(bundle, backend="portable")
    levels = {s.get_session_options().graph_optimization_level for s in (session._gradient, session._eval, session._optimizer)}
    assert levels == {ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    # Inference always keeps onnxruntime's optimizations; given options are used as given.
    predictor = Predictor(bundle, store=False)
    assert predictor.session.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    given = ort.SessionOptions()
    given.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = open_training_session(bundle, backend="portable", session_options=given)
    assert session._gradient.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
