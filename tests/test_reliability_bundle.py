"""Bundle safety: file paths and ONNX external-data locations stay inside the bundle, and
every file is checked against the manifest's hashes.

``sdk/onnx_refs.py`` walks the protobuf wire format without onnx (a device has none); here
it is checked against onnx's own parser on exported and crafted models.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import onnx
import pytest

from bitfit.sdk.bundle import manifest_checksum
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import reliability_fixtures as rf
from bitfit.sdk.bundle import Bundle
from bitfit.sdk.errors import BundleInvalidError
from bitfit.sdk.onnx_refs import external_data_locations, external_data_refs

numeric_bundle = rf.session_bundle("numeric")
text_bundle = rf.session_bundle("text")
EXAMPLES = 1000 if rf.stress() else 200


# ------------------------------------------------------------------------------ the reference: onnx's parser


def _onnx_refs(model: onnx.ModelProto) -> list[tuple[str, str | None]]:
    """(tensor name, location) of every externally stored tensor, found through onnx's objects."""
    out: list[tuple[str, str | None]] = []

    def tensor(t: TensorProto) -> None:
        if t.data_location == TensorProto.EXTERNAL or len(t.external_data):
            locations = [e.value for e in t.external_data if e.key == "location"] or [None]
            out.extend((t.name, loc) for loc in locations)

    def sparse(s) -> None:
        if s.HasField("values"):
            tensor(s.values)
        if s.HasField("indices"):
            tensor(s.indices)

    def nodes(items) -> None:
        for node in items:
            for a in node.attribute:
                if a.HasField("t"):
                    tensor(a.t)
                if a.HasField("g"):
                    graph(a.g)
                for t in a.tensors:
                    tensor(t)
                for g in a.graphs:
                    graph(g)
                if a.HasField("sparse_tensor"):
                    sparse(a.sparse_tensor)
                for s in a.sparse_tensors:
                    sparse(s)

    def graph(g: onnx.GraphProto) -> None:
        nodes(g.node)
        for t in g.initializer:
            tensor(t)
        for s in g.sparse_initializer:
            sparse(s)

    if model.HasField("graph"):
        graph(model.graph)
    for info in model.training_info:
        graph(info.initialization)
        graph(info.algorithm)
    for function in model.functions:
        nodes(function.node)
    return out


def _walker(data: bytes) -> list[tuple[str, str | None]]:
    return [(r.tensor, r.location) for r in external_data_refs(data)]


def _external(name: str, location: str | None, dims=(2,)) -> TensorProto:
    t = helper.make_tensor(name, TensorProto.FLOAT, list(dims), np.zeros(dims, np.float32).ravel().tolist())
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    if location is not None:
        t.external_data.add(key="location", value=location)
        t.external_data.add(key="offset", value="0")
    return t


def _crafted(locations: dict[str, str | None]) -> onnx.ModelProto:
    """A model with an external tensor in every place a tensor can hide (keys of ``locations``)."""
    loc = locations.get
    const = helper.make_node("Constant", [], ["c"], value=_external("const", loc("attribute")))
    then_graph = helper.make_graph([helper.make_node("Identity", ["s"], ["o1"])], "then", [],
                                   [helper.make_tensor_value_info("o1", TensorProto.FLOAT, [2])],
                                   initializer=[_external("s", loc("subgraph"))])
    else_graph = helper.make_graph([helper.make_node("Identity", ["c"], ["o2"])], "else", [],
                                   [helper.make_tensor_value_info("o2", TensorProto.FLOAT, [2])])
    branch = helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)
    sparse = helper.make_sparse_tensor(_external("sp", loc("sparse")), helper.make_tensor("sp_i", TensorProto.INT64, [1], [0]), [2])
    graph = helper.make_graph(
        [const, branch], "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        initializer=[_external("w", loc("initializer")), helper.make_tensor("inline", TensorProto.FLOAT, [1], [1.0])],
        sparse_initializer=[sparse],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    function = helper.make_function("local", "f", [], ["fc"], [helper.make_node("Constant", [], ["fc"], value=_external("fconst", loc("function")))],
                                    [helper.make_opsetid("", 17)])
    model.functions.append(function)
    info = model.training_info.add()
    info.initialization.CopyFrom(helper.make_graph([], "init", [], [], initializer=[_external("ti", loc("training_info"))]))
    return model


# ------------------------------------------------------------------------------ the walker


@pytest.mark.parametrize("kind", ["numeric", "text"])
def test_walker_matches_onnx_on_exported_models(kind, request):
    bundle = request.getfixturevalue(f"{kind}_bundle")
    found_any = False
    for path in sorted(Path(bundle).glob("*.onnx")):
        data = path.read_bytes()
        expected = _onnx_refs(onnx.load_model_from_string(data))
        assert sorted(_walker(data), key=str) == sorted(expected, key=str), path.name
        assert external_data_locations(path) == [r.location for r in external_data_refs(data)]
        found_any |= bool(expected)
    assert found_any, "the inference model should keep its weights as external data"
    assert set(external_data_locations(Path(bundle) / "inference.onnx")) == {"weights.safetensors"}


def test_walker_finds_tensors_everywhere_onnx_can_hide_them():
    places = ["initializer", "attribute", "subgraph", "sparse", "function", "training_info"]
    model = _crafted({p: f"{p}.bin" for p in places})
    data = model.SerializeToString()
    got = _walker(data)
    assert sorted(got, key=str) == sorted(_onnx_refs(model), key=str)
    assert {loc for _, loc in got} == {f"{p}.bin" for p in places}
    # A tensor marked EXTERNAL without any location is reported with location None.
    assert ("w", None) in _walker(_crafted({"initializer": None}).SerializeToString())


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["initializer", "attribute", "subgraph", "sparse", "function", "training_info"]),
                       st.one_of(st.none(), st.text(min_size=0, max_size=40)), max_size=6))
def test_walker_agrees_with_onnx_on_random_crafted_models(locations):
    model = _crafted(locations)
    assert sorted(_walker(model.SerializeToString()), key=str) == sorted(_onnx_refs(model), key=str)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.data())
def test_walker_on_damaged_bytes_raises_only_bundle_invalid(data):
    clean = _crafted({"initializer": "weights.bin", "attribute": "../x", "subgraph": "/abs"}).SerializeToString()
    damaged = bytearray(clean)
    action = data.draw(st.sampled_from(["truncate", "flip", "overwrite"]))
    if action == "truncate":
        damaged = damaged[: data.draw(st.integers(0, len(clean) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(clean) - 1))
            damaged[i] = damaged[i] ^ (1 << data.draw(st.integers(0, 7))) if action == "flip" else data.draw(st.integers(0, 255))
    try:
        got = _walker(bytes(damaged))
    except BundleInvalidError:
        return
    try:
        reference = onnx.load_model_from_string(bytes(damaged))
    except Exception:
        return  # protobuf refuses it too; the walker was lenient but reported what it saw
    # Whatever protobuf (and so ORT) would read, the walker saw as well.
    assert {loc for _, loc in _onnx_refs(reference)} <= {loc for _, loc in got}


def test_walker_refuses_garbage():
    for data in (b"\x3a\xff\xff\xff\xff\x0f", b"\x3a\x05ab", b"\x07", b"\x3a\x02\x2a\x05", b"\xff" * 11):
        with pytest.raises(BundleInvalidError, match="not a well-formed protobuf"):
            external_data_refs(data)


def test_walker_module_does_not_import_onnx():
    import subprocess
    import sys

    code = "import sys; import bitfit.sdk.onnx_refs, bitfit.sdk.bundle; assert 'onnx' not in sys.modules, 'onnx imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------ Bundle.open refuses escapes


def _point_external_data(bundle_dir: Path, location: str, only_first: bool = False) -> None:
    path = bundle_dir / "inference.onnx"
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
        if only_first and len(t.external_data):
            break
    onnx.save(model, str(path))
    rf.rewrite_manifest(bundle_dir, lambda raw: None)  # the attacker re-hashes too


@pytest.mark.parametrize("location", [
    "../outside.bin", "/etc/passwd", "sub/../../outside.bin", "*/_ORT_MEM_ADDR_/*", "./weights.safetensors",
    "C:/weights.safetensors", "weights.safetensors\\..\\..\\x", "unlisted.bin", "",
])
def test_external_data_outside_the_bundle_is_refused(numeric_bundle, tmp_path, location):
    bundle_dir = rf.copy_bundle(numeric_bundle, tmp_path / "b")
    (tmp_path / "outside.bin").write_bytes((bundle_dir / "weights.safetensors").read_bytes())
    (bundle_dir / "unlisted.bin").write_bytes((bundle_dir / "weights.safetensors").read_bytes())
    _point_external_data(bundle_dir, location, only_first=True)
    for verify in ("hashes", "sizes", "none"):
        with pytest.raises(BundleInvalidError, match="reads external data from"):
            Bundle.open(bundle_dir, verify=verify)


def test_onnxruntime_itself_would_follow_an_escaping_location(numeric_bundle, tmp_path):
    """Why the check exists: ORT 1.19.2 reads ``../outside.bin`` without complaint."""
    from bitfit.sdk.runtime import ort

    bundle_dir = rf.copy_bundle(numeric_bundle, tmp_path / "b")
    (tmp_path / "outside.bin").write_bytes((bundle_dir / "weights.safetensors").read_bytes())
    _point_external_data(bundle_dir, "../outside.bin")
    session = ort.InferenceSession(str(bundle_dir / "inference.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.zeros((1, 8), np.float32)})[0].shape == (1, 3)


def test_external_data_into_another_listed_file_is_allowed(numeric_bundle, tmp_path):
    bundle_dir = rf.copy_bundle(numeric_bundle, tmp_path / "b")
    Bundle.open(bundle_dir)  # the exported layout passes
    model = onnx.load(str(bundle_dir / "inference.onnx"), load_external_data=False)
    assert {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"} == {"weights.safetensors"}


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../../x", "sub\\..\\x", "", "a//b", "x\0y", "."])
def test_manifest_paths_outside_the_bundle_are_refused(numeric_bundle, tmp_path, path):
    bundle_dir = rf.copy_bundle(numeric_bundle, tmp_path / "b")
    raw = json.loads((bundle_dir / "manifest.json").read_text())
    raw["files"]["tokenizer"] = {"path": path, "sha256": "0" * 64, "bytes": 1}
    raw["checksum"] = manifest_checksum(raw)  # a consistent manifest: the path check itself must refuse it
    (bundle_dir / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleInvalidError):
        Bundle.open(bundle_dir, verify="none")


def test_symlink_out_of_the_bundle_is_refused(numeric_bundle, tmp_path):
    bundle_dir = rf.copy_bundle(numeric_bundle, tmp_path / "b")
    outside = tmp_path / "outside.safetensors"
    os.replace(bundle_dir / "weights.safetensors", outside)
    os.symlink(outside, bundle_dir / "weights.safetensors")
    with pytest.raises(BundleInvalidError, match="outside the bundle"):
        Bundle.open(bundle_dir)


# ------------------------------------------------------------------------------ hashes


def test_flipped_byte_in_weights_is_refused(numeric_bundle, tmp_path):
    bundle_dir = rf.copy_bundle(numeric_bundle, tmp_path / "b")
    weights = bundle_dir / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleInvalidError, match="does not match its sha256"):
        Bundle.open(bundle_dir)
    Bundle.open(bundle_dir, verify="sizes")  # documented: "sizes" only catches a size change


def test_missing_file_is_refused(numeric_bundle, tmp_path):
    bundle_dir = rf.copy_bundle(numeric_bundle, tmp_path / "b")
    (bundle_dir / "optimizer_model.onnx").unlink()
    for verify in ("hashes", "sizes", "none"):
        with pytest.raises(BundleInvalidError, match="is missing"):
            Bundle.open(bundle_dir, verify=verify)


@pytest.mark.parametrize("change", ["append", "truncate"])
def test_size_change_is_refused(numeric_bundle, tmp_path, change):
    bundle_dir = rf.copy_bundle(numeric_bundle, tmp_path / "b")
    path = bundle_dir / "checkpoint"
    data = path.read_bytes()
    path.write_bytes(data + b"\0" if change == "append" else data[:-1])
    for verify in ("hashes", "sizes"):
        with pytest.raises(BundleInvalidError, match="bytes, manifest says"):
            Bundle.open(bundle_dir, verify=verify)


def test_every_onnx_file_of_a_bundle_is_walked(numeric_bundle, tmp_path):
    """Not only inference.onnx: an escaping location in the training model is refused as well."""
    bundle_dir = rf.copy_bundle(numeric_bundle, tmp_path / "b")
    path = bundle_dir / "eval_model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    model.graph.initializer.append(_external("stolen", "../../secret"))
    onnx.save(model, str(path))
    rf.rewrite_manifest(bundle_dir, lambda raw: None)
    with pytest.raises(BundleInvalidError, match="eval_model.onnx.*stolen"):
        Bundle.open(bundle_dir)


def test_random_bytes_as_an_onnx_file_are_refused(numeric_bundle, tmp_path):
    """Garbage in place of a model (re-hashed into the manifest) never trains: refused by the
    open's walk when it could name external data (it holds the bytes ``location``), else by
    the session that loads it, with the bundle named as the cause."""
    from bitfit.sdk.trainer import open_training_session

    bundle_dir = rf.copy_bundle(numeric_bundle, tmp_path / "b")
    rng = random.Random(5)
    outcomes = []
    for i in range(20):
        garbage = bytes(rng.randrange(256) for _ in range(300))
        if i % 2:  # the walker's path: bytes that could hold an external-data location
            garbage = garbage[:150] + b"location" + garbage[150:]
        (bundle_dir / "portable_optimizer.onnx").write_bytes(garbage)
        rf.rewrite_manifest(bundle_dir, lambda raw: None)
        try:
            bundle = Bundle.open(bundle_dir)
        except BundleInvalidError:
            outcomes.append("refused at open")
            continue
        with pytest.raises(BundleInvalidError, match="portable_optimizer"):
            open_training_session(bundle, backend="portable")
        outcomes.append("refused by the session")
    assert "refused at open" in outcomes and "refused by the session" in outcomes


def test_the_open_walks_only_what_can_name_another_file(numeric_bundle, tmp_path, monkeypatch):
    """Bundle.open looks for located refs only: a file without the bytes ``location`` is not
    walked at all, and in one with them no node is parsed (the numeric bundle's locations are
    all initializers'); an escape is still refused."""
    import bitfit.sdk.onnx_refs as onnx_refs
    from bitfit.sdk.bundle import forget_checked_files

    walked: list[str] = []
    real = onnx_refs._walk
    monkeypatch.setattr(onnx_refs, "_walk", lambda buf, start, end, kind, *rest: walked.append(kind) or real(buf, start, end, kind, *rest))
    bundle_dir = rf.copy_bundle(numeric_bundle, tmp_path / "b")
    forget_checked_files()
    Bundle.open(bundle_dir)
    onnx_files = sorted(p for p in bundle_dir.iterdir() if p.suffix == ".onnx")
    with_key = [p for p in onnx_files if b"location" in p.read_bytes()]
    assert 0 < len(with_key) < len(onnx_files)  # the numeric bundle has both kinds
    assert walked.count("model") == len(with_key) and "node" not in walked and "tensor" in walked
    _point_external_data(bundle_dir, "../outside.bin", only_first=True)
    with pytest.raises(BundleInvalidError, match="reads external data from"):
        Bundle.open(bundle_dir)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["initializer", "attribute", "subgraph", "sparse", "function", "training_info"]),
                       st.one_of(st.none(), st.text(min_size=0, max_size=40)), max_size=6))
def test_located_refs_are_every_ref_that_names_a_location(locations):
    data = _crafted(locations).SerializeToString()
    every = external_data_refs(data)
    assert external_data_refs(data, located_only=True) == [r for r in every if r.location is not None]
def test_a_file_path_is_the_fully_resolved_one_with_or_without_links(tmp_path):
    """Bundle paths skip resolving the root's components again, and give what a full resolve
    gives: for plain files, links inside, a linked folder, a missing file and a linked root."""
    from bitfit.sdk.bundle import _inside

    real = tmp_path / "deep" / "er" / "bundle"
    (real / "sub").mkdir(parents=True)
    (real / "plain.onnx").write_bytes(b"x")
    (real / "sub" / "inner.bin").write_bytes(b"y")
    (real / "link.bin").symlink_to(real / "sub" / "inner.bin")
    (real / "linked").symlink_to(real / "sub", target_is_directory=True)
    (tmp_path / "root-link").symlink_to(real, target_is_directory=True)
    for root in (real, tmp_path / "root-link"):
        for relative in ("plain.onnx", "sub/inner.bin", "link.bin", "linked/inner.bin", "missing.onnx", "sub/missing"):
            assert _inside(root.resolve(), relative) == (root / relative).resolve(), (root, relative)
    (real / "escape.bin").symlink_to(tmp_path / "outside.bin")
    with pytest.raises(BundleInvalidError, match="outside the bundle"):
        _inside(real.resolve(), "escape.bin")
