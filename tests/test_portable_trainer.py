"""The portable training backend: the optimizer graph against the spec's formula and torch,
the PortableTrainingSession against a numpy reference on a hand-built bundle, its typed
errors, and the choice between the two backends.

The hand-built bundle (``linear_bundle``) is y = (x @ W1 + b1) @ W2 + b2 with a
cross-entropy loss: its gradients have a closed form, so the session is checked without
relying on ``bitfit.export.gradient_graph``. Parity with the ``ort-training`` backend on
exported bundles is in the second half.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bitfit.export.optimizer_graph import build_optimizer_model
from bitfit.export.optimizer_graph import OPTIMIZER_SETTINGS
from bitfit.sdk.bundle import (
    Bundle, IOSpec, Manifest, TrainableTensor, file_entry, fingerprint_tensors, write_manifest,
)
from bitfit.sdk.errors import (
    BackendUnavailableError, BundleInvalidError, ExportError, InvalidArgumentError, InvalidUserDataError,
    ProviderUnavailableError,
)
from bitfit.sdk.portable_trainer import PortableTrainingSession
from bitfit.sdk.runtime import cuda_available, has_training_api, ort
from bitfit.sdk.trainer import open_training_session

from sdk_fixtures import *  # noqa: F401,F403  (the tiny exported bundles)
from sdk_fixtures import QUICK, text_data

B1, B2 = 0.9, 0.999
EPS = 1e-6


def _run_optimizer(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _adamw_reference(w, g, m, v, lr, t, weight_decay=0.0):
    """The spec's formula (docs/portable-training.md), in float64."""
    w, g, m, v = (np.asarray(a, np.float64) for a in (w, g, m, v))
    m = B1 * m + (1 - B1) * g
    v = B2 * v + (1 - B2) * g * g
    w = w - lr * np.sqrt(1 - B2 ** t) / (1 - B1 ** t) * m / (np.sqrt(v) + EPS)
    w = w - lr * weight_decay * w
    return w, m, v


def _assert_float32_close(actual: np.ndarray, desired: np.ndarray, message: str) -> None:
    """float32 result vs float64 reference: 2e-5 relative (1 - beta2 rounds to float32 1.3e-5
    off 0.001, as in ORT's kernel), and 1e-6 of the tensor's scale where terms cancel."""
    np.testing.assert_allclose(actual, desired, rtol=2e-5, atol=1e-6 * float(np.abs(desired).max()), err_msg=message)


# -- the optimizer graph -----------------------------------------------------------------

SHAPES = [("enc.0.bias", [7]), ("head.weight", [3, 5]), ("ln.bias", [1])]


def _adamw_steps(model: onnx.ModelProto, steps: int, lr: float, seed: int = 0):
    """Run ``steps`` updates through the graph; yield (t, grads, outputs, inputs) per step."""
    rng = np.random.default_rng(seed)
    w = {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES}
    m = {n: np.zeros(s, np.float32) for n, s in SHAPES}
    v = {n: np.zeros(s, np.float32) for n, s in SHAPES}
    for t in range(1, steps + 1):
        g = {n: (rng.normal(size=s) * 10 ** rng.uniform(-4, 1)).astype(np.float32) for n, s in SHAPES}
        feeds = {"learning_rate": np.array(lr, np.float32), "step": np.array(t, np.int64)}
        for n, _ in SHAPES:
            feeds.update({n: w[n], f"{n}_grad": g[n], f"{n}_exp_avg": m[n], f"{n}_exp_avg_sq": v[n]})
        out = _run_optimizer(model, feeds)
        yield t, g, out, (dict(w), dict(m), dict(v))
        w = {n: out[f"{n}_out"] for n, _ in SHAPES}
        m = {n: out[f"{n}_exp_avg_out"] for n, _ in SHAPES}
        v = {n: out[f"{n}_exp_avg_sq_out"] for n, _ in SHAPES}


def test_adamw_graph_matches_the_spec_formula_step_by_step() -> None:
    model = build_optimizer_model(SHAPES, "adamw")
    for t, g, out, (w, m, v) in _adamw_steps(model, steps=6, lr=3e-3):
        for name, _ in SHAPES:
            ref_w, ref_m, ref_v = _adamw_reference(w[name], g[name], m[name], v[name], 3e-3, t)
            _assert_float32_close(out[f"{name}_exp_avg_out"], ref_m, f"{name} m, step {t}")
            _assert_float32_close(out[f"{name}_exp_avg_sq_out"], ref_v, f"{name} v, step {t}")
            _assert_float32_close(out[f"{name}_out"], ref_w, f"{name} w, step {t}")
            assert out[f"{name}_out"].shape == w[name].shape and out[f"{name}_out"].dtype == np.float32


def test_adamw_graph_matches_torch_adamw_with_the_hugging_face_epsilon() -> None:
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.torch_recipes import ORT_ADAMW, hf_adamw_epsilon

    lr = 1e-2
    model = build_optimizer_model(SHAPES, "adamw")
    params = None
    for t, g, out, (w, _, _) in _adamw_steps(model, steps=8, lr=lr, seed=1):
        if params is None:
            params = {n: torch.nn.Parameter(torch.from_numpy(w[n].copy())) for n, _ in SHAPES}
            opt = torch.optim.AdamW(list(params.values()), lr=lr, **ORT_ADAMW)
        hf_adamw_epsilon(opt, step=t)
        for n, p in params.items():
            p.grad = torch.from_numpy(g[n].copy())
        opt.step()
        for n, p in params.items():
            np.testing.assert_allclose(out[f"{n}_out"], p.detach().numpy(), rtol=1e-5, atol=2e-7, err_msg=f"{n}, step {t}")


def test_adamw_weight_decay_is_applied_after_the_step_the_hugging_face_way() -> None:
    settings = {**OPTIMIZER_SETTINGS["adamw"], "weight_decay": 0.1}
    model = build_optimizer_model(SHAPES, "adamw", settings=settings)
    for t, g, out, (w, m, v) in _adamw_steps(model, steps=3, lr=5e-2):
        for name, _ in SHAPES:
            ref_w, _, _ = _adamw_reference(w[name], g[name], m[name], v[name], 5e-2, t, weight_decay=0.1)
            _assert_float32_close(out[f"{name}_out"], ref_w, f"{name} w, step {t}")


def test_sgd_graph_is_w_minus_lr_g_and_matches_torch_sgd() -> None:
    torch = pytest.importorskip("torch")
    model = build_optimizer_model(SHAPES, "sgd")
    assert [i.name for i in model.graph.input][:3] == ["learning_rate", "enc.0.bias", "enc.0.bias_grad"]
    rng = np.random.default_rng(2)
    w = {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES}
    params = {n: torch.nn.Parameter(torch.from_numpy(w[n].copy())) for n, _ in SHAPES}
    opt = torch.optim.SGD(list(params.values()), lr=0.05)
    for _ in range(4):
        g = {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES}
        feeds = {"learning_rate": np.array(0.05, np.float32), **w, **{f"{n}_grad": g[n] for n in w}}
        out = _run_optimizer(model, feeds)
        for n, p in params.items():
            p.grad = torch.from_numpy(g[n].copy())
        opt.step()
        for n, p in params.items():
            np.testing.assert_allclose(out[f"{n}_out"], w[n] - np.float32(0.05) * g[n], rtol=1e-7, atol=1e-7)
            np.testing.assert_allclose(out[f"{n}_out"], p.detach().numpy(), rtol=1e-6, atol=1e-7)
        w = {n: out[f"{n}_out"] for n in w}


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_optimizer_graph_is_plain_onnx_for_any_onnxruntime(optimizer: str) -> None:
    many = [(f"layer.{i}.bias", [4]) for i in range(20)]
    model = build_optimizer_model(many, optimizer, opset=13)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 10, "onnxruntime 1.19.2 refuses IR versions above 10"
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 13)]
    assert {n.domain for n in model.graph.node} == {""}
    ops = [n.op_type for n in model.graph.node]
    # The bias corrections are computed once for all tensors, not once per tensor, and the
    # update runs once over all tensors packed together: the work per step does not grow
    # with the number of tensors (node launches dominate for small bias vectors).
    assert ops.count("Pow") == (2 if optimizer == "adamw" else 0)
    assert len(model.graph.output) == len(many) * (3 if optimizer == "adamw" else 1)
    assert len(model.graph.node) == len(build_optimizer_model(many[:2], optimizer, opset=13).graph.node)


def test_optimizer_graph_uses_the_settings_the_manifest_records() -> None:
    adamw = OPTIMIZER_SETTINGS["adamw"]
    assert (adamw["betas"], adamw["eps"], adamw["weight_decay"], adamw["bias_correction"]) == ([B1, B2], EPS, 0.0, True)
    default = build_optimizer_model(SHAPES, "adamw")
    explicit = build_optimizer_model(SHAPES, "adamw", settings=adamw)
    assert default.SerializeToString() == explicit.SerializeToString()
    constants = {i.name.split("/")[-1]: float(numpy_helper.to_array(i)) for i in default.graph.initializer if not i.dims}
    assert constants["beta1"] == pytest.approx(B1) and constants["beta2"] == pytest.approx(B2)
    assert constants["epsilon"] == pytest.approx(EPS)


@pytest.mark.parametrize("tensors, optimizer, opset, settings, match", [
    ([("b", [3])], "adam", 17, None, "unknown optimizer"),
    ([("b", [3])], "adamw", 12, None, "opset >= 13"),
    ([], "adamw", 17, None, "at least one trainable tensor"),
    ([("b", [0])], "sgd", 17, None, "bad name or shape"),
    ([("learning_rate", [3])], "sgd", 17, None, "collide"),
    ([("b", [3]), ("b", [3])], "sgd", 17, None, "duplicate value names"),
    ([("b", [3]), ("b_grad", [3])], "sgd", 17, None, "duplicate value names"),
    ([("b", [3])], "sgd", 17, {"momentum": 0.9}, "plain SGD only"),
    ([("b", [3])], "adamw", 17, {"betas": [0.9, 0.999], "eps": 1e-6, "bias_correction": False}, "bias correction"),
])
def test_optimizer_graph_refusals_say_what_is_wrong(tensors, optimizer, opset, settings, match) -> None:
    with pytest.raises(ExportError, match=match):
        build_optimizer_model(tensors, optimizer, opset, settings=settings)


# -- a hand-built portable bundle --------------------------------------------------------

IN_DIM, HIDDEN, CLASSES = 4, 5, 3
TRAINABLE = ["0.bias", "1.bias"]


def _linear_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"0.weight": rng.normal(size=(IN_DIM, HIDDEN)).astype(np.float32),
            "0.bias": rng.normal(size=HIDDEN).astype(np.float32) * 0.1,
            "1.weight": rng.normal(size=(HIDDEN, CLASSES)).astype(np.float32),
            "1.bias": rng.normal(size=CLASSES).astype(np.float32) * 0.1}


def _linear_graphs(weights: dict[str, np.ndarray], opset: int = 17) -> dict[str, onnx.ModelProto]:
    """Inference, gradient and eval models of y = (x W1 + b1) W2 + b2 with mean cross-entropy."""
    f32 = TensorProto.FLOAT
    x = helper.make_tensor_value_info("x", f32, ["batch", IN_DIM])
    labels = helper.make_tensor_value_info("labels", TensorProto.INT64, ["batch"])
    biases = [helper.make_tensor_value_info(n, f32, [weights[n].size]) for n in TRAINABLE]
    logits = helper.make_tensor_value_info("logits", f32, ["batch", CLASSES])
    loss = helper.make_tensor_value_info("loss", f32, [])
    grads = [helper.make_tensor_value_info(f"{n}_grad", f32, [weights[n].size]) for n in TRAINABLE]
    frozen = [numpy_helper.from_array(weights[n], n) for n in ("0.weight", "1.weight")]
    forward = [helper.make_node("MatMul", ["x", "0.weight"], ["h0"]), helper.make_node("Add", ["h0", "0.bias"], ["h"]),
               helper.make_node("MatMul", ["h", "1.weight"], ["z"]), helper.make_node("Add", ["z", "1.bias"], ["logits"])]
    loss_node = helper.make_node("SoftmaxCrossEntropyLoss", ["logits", "labels"], ["loss"], reduction="mean")
    backward = [
        helper.make_node("Softmax", ["logits"], ["p"], axis=-1),
        helper.make_node("Constant", [], ["depth"], value=numpy_helper.from_array(np.array(CLASSES, np.int64))),
        helper.make_node("Constant", [], ["onehot_values"], value=numpy_helper.from_array(np.array([0, 1], np.float32))),
        helper.make_node("OneHot", ["labels", "depth", "onehot_values"], ["onehot"], axis=-1),
        helper.make_node("Sub", ["p", "onehot"], ["diff"]),
        helper.make_node("Shape", ["labels"], ["n_shape"]),
        helper.make_node("Cast", ["n_shape"], ["n_float"], to=f32),
        helper.make_node("Div", ["diff", "n_float"], ["dz"]),
        helper.make_node("Constant", [], ["axis0"], value=numpy_helper.from_array(np.array([0], np.int64))),
        helper.make_node("ReduceSum", ["dz", "axis0"], ["1.bias_grad"], keepdims=0),
        helper.make_node("Gemm", ["dz", "1.weight"], ["dh"], transB=1),
        helper.make_node("ReduceSum", ["dh", "axis0"], ["0.bias_grad"], keepdims=0),
    ]
    bias_inits = [numpy_helper.from_array(weights[n], n) for n in TRAINABLE]

    def model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
        m = helper.make_model(helper.make_graph(nodes, "linear", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = min(m.ir_version, 10)
        return m

    return {
        "inference_model": model(forward, [x], [logits], frozen + bias_inits),
        "portable_gradient_model": model(forward + [loss_node] + backward, [x, labels, *biases], [loss, logits, *grads], frozen),
        "portable_eval_model": model(forward + [loss_node], [x, labels, *biases], [loss, logits], frozen),
    }


def write_linear_bundle(out: Path, optimizer: str = "adamw", *, opset: int = 17, seed: int = 0) -> Path:
    """A portable-only format-2 bundle of the linear model; frozen weights as external data in weights.safetensors."""
    from safetensors.numpy import save_file

    from bitfit.export.inference_graph import point_at_weights

    out.mkdir(parents=True, exist_ok=True)
    weights = _linear_weights(seed)
    save_file(weights, str(out / "weights.safetensors"))
    paths = {"inference_model": "inference.onnx", "portable_gradient_model": "portable_gradient.onnx",
             "portable_eval_model": "portable_eval.onnx", "portable_optimizer_model": "portable_optimizer.onnx"}
    for key, graph in _linear_graphs(weights, opset).items():
        point_at_weights(graph, out / "weights.safetensors")
        onnx.save(graph, str(out / paths[key]))
    shapes = [(n, [weights[n].size]) for n in TRAINABLE]
    onnx.save(build_optimizer_model(shapes, optimizer, opset=max(opset, 13)), str(out / paths["portable_optimizer_model"]))
    paths["weights"] = "weights.safetensors"
    manifest = Manifest(
        base_fingerprint=fingerprint_tensors(weights), task="classification", loss="cross-entropy",
        optimizer=optimizer,  # type: ignore[arg-type]
        inputs=[IOSpec("x", "float32", ["batch", IN_DIM])], outputs=[IOSpec("logits", "float32", ["batch", CLASSES])],
        trainable=[TrainableTensor(n, [weights[n].size], "float32", "bias", [weights[n].size]) for n in TRAINABLE],
        files={k: file_entry(out, v) for k, v in paths.items()}, policy={"name": "all-biases"}, labels=["a", "b", "c"],
        source={"optimizer_settings": OPTIMIZER_SETTINGS[optimizer], "parameter_order": list(weights)}, opset=opset,
        training_backends={"portable": {"available": True, "reason": ""},
                           "ort-training": {"available": False, "reason": "this test bundle has no ORT training artifacts"}},
    )
    write_manifest(out, manifest)
    return out


def _reference_step(weights: dict[str, np.ndarray], biases: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray):
    """Loss, logits and bias gradients of the linear model, in float64."""
    w1, w2 = weights["0.weight"].astype(np.float64), weights["1.weight"].astype(np.float64)
    h = x @ w1 + biases["0.bias"]
    z = h @ w2 + biases["1.bias"]
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    loss = -np.log(p[np.arange(len(y)), y]).mean()
    dz = (p - np.eye(CLASSES)[y]) / len(y)
    return loss, z, {"1.bias": dz.sum(0), "0.bias": (dz @ w2.T).sum(0)}


def _batch(seed: int, rows: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rows, IN_DIM)).astype(np.float32), rng.integers(0, CLASSES, rows).astype(np.int64)


@pytest.fixture()
def linear_bundle(tmp_path: Path) -> Path:
    return write_linear_bundle(tmp_path / "linear")


def test_portable_session_follows_the_numpy_reference(linear_bundle: Path) -> None:
    session = PortableTrainingSession(Bundle.open(linear_bundle), learning_rate=0.05)
    assert session.backend == "portable"
    assert session.input_names == ["x", "labels"] and session.trainable == TRAINABLE
    weights = _linear_weights()
    biases = {n: weights[n].astype(np.float64) for n in TRAINABLE}
    m = {n: np.zeros_like(b) for n, b in biases.items()}
    v = {n: np.zeros_like(b) for n, b in biases.items()}
    for t in range(1, 6):
        x, y = _batch(t)
        ref_loss, ref_logits, grads = _reference_step(weights, biases, x.astype(np.float64), y)
        loss, logits = session.evaluate({"x": x}, y)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
        assert session.train_step({"x": x}, y) == pytest.approx(ref_loss, rel=1e-5)
        for n in TRAINABLE:
            biases[n], m[n], v[n] = _adamw_reference(biases[n], grads[n], m[n], v[n], 0.05, t)
        for n, value in session.trainable_values().items():
            np.testing.assert_allclose(value, biases[n], rtol=1e-5, atol=1e-6, err_msg=f"{n} after step {t}")


def test_gradients_are_the_closed_form_and_update_nothing(linear_bundle: Path) -> None:
    session = PortableTrainingSession(Bundle.open(linear_bundle), learning_rate=0.05)
    weights = _linear_weights()
    x, y = _batch(5)
    ref_loss, _, ref_grads = _reference_step(weights, {n: weights[n].astype(np.float64) for n in TRAINABLE},
                                             x.astype(np.float64), y)
    loss, grads = session.gradients({"x": x}, y)
    assert loss == pytest.approx(ref_loss, rel=1e-5) and sorted(grads) == sorted(TRAINABLE)
    for n in TRAINABLE:
        np.testing.assert_allclose(grads[n], ref_grads[n], rtol=1e-5, atol=1e-7, err_msg=n)
        np.testing.assert_array_equal(session.trainable_values()[n], weights[n])
    fresh = PortableTrainingSession(Bundle.open(linear_bundle), learning_rate=0.05)
    session.train_step({"x": x}, y)
    fresh.train_step({"x": x}, y)
    for n in TRAINABLE:  # no optimizer step was counted by gradients()
        np.testing.assert_array_equal(session.trainable_values()[n], fresh.trainable_values()[n])


def test_portable_sgd_session_is_w_minus_lr_g(tmp_path: Path) -> None:
    bundle = Bundle.open(write_linear_bundle(tmp_path / "sgd", "sgd"))
    session = PortableTrainingSession(bundle, learning_rate=0.3)
    weights = _linear_weights()
    x, y = _batch(7)
    _, _, grads = _reference_step(weights, {n: weights[n].astype(np.float64) for n in TRAINABLE}, x.astype(np.float64), y)
    session.train_step({"x": x}, y)
    for n, value in session.trainable_values().items():
        np.testing.assert_allclose(value, weights[n] - 0.3 * grads[n], rtol=1e-5, atol=1e-6)


def test_each_session_starts_with_fresh_optimizer_state_and_its_own_start(linear_bundle: Path) -> None:
    bundle = Bundle.open(linear_bundle)
    x, y = _batch(3)
    first = PortableTrainingSession(bundle, learning_rate=0.05)
    for _ in range(3):
        first.train_step({"x": x}, y)
    again = PortableTrainingSession(bundle, learning_rate=0.05)
    fresh = PortableTrainingSession(bundle, learning_rate=0.05)
    again.train_step({"x": x}, y)
    fresh.train_step({"x": x}, y)
    for n in TRAINABLE:  # user B's step does not depend on user A's moments
        np.testing.assert_array_equal(again.trainable_values()[n], fresh.trainable_values()[n])
    start = {"0.bias": np.full(HIDDEN, 0.5, np.float32)}
    started = PortableTrainingSession(bundle, start=start)
    np.testing.assert_array_equal(started.trainable_values()["0.bias"], start["0.bias"])
    np.testing.assert_array_equal(started.trainable_values()["1.bias"], _linear_weights()["1.bias"])
    start["0.bias"][:] = 9  # the session keeps its own copy
    assert started.trainable_values()["0.bias"][0] == 0.5


def test_restart_is_a_fresh_session_without_rebuilding_its_models(linear_bundle: Path) -> None:
    """What a retry relies on: restart = a new session (values, AdamW moments, step, rate),
    with the same onnxruntime sessions; a refused argument changes nothing."""
    bundle = Bundle.open(linear_bundle)
    x, y = _batch(3)
    start = {"0.bias": np.full(HIDDEN, 0.5, np.float32)}
    used = PortableTrainingSession(bundle, learning_rate=0.05)
    for _ in range(3):
        used.train_step({"x": x}, y)
    models = (used._gradient, used._eval, used._optimizer)
    used.restart(start=start, learning_rate=0.02)
    fresh = PortableTrainingSession(bundle, start=start, learning_rate=0.02)
    assert (used._gradient, used._eval, used._optimizer) == models  # not rebuilt
    for n in TRAINABLE:
        np.testing.assert_array_equal(used.trainable_values()[n], fresh.trainable_values()[n])
    for seed in (4, 5):  # the same steps: the moments and step count started over too
        xb, yb = _batch(seed)
        assert used.train_step({"x": xb}, yb) == fresh.train_step({"x": xb}, yb)
    for n in TRAINABLE:
        np.testing.assert_array_equal(used.trainable_values()[n], fresh.trainable_values()[n])
    before = used.trainable_values()
    with pytest.raises(InvalidArgumentError, match="learning_rate must be"):
        used.restart(learning_rate=-1.0)
    with pytest.raises(InvalidArgumentError, match="elements"):
        used.restart(start={"0.bias": np.zeros(HIDDEN + 1, np.float32)})
    for n in TRAINABLE:
        np.testing.assert_array_equal(used.trainable_values()[n], before[n])
    assert used.train_step({"x": x}, y) == fresh.train_step({"x": x}, y)  # moments and rate untouched as well


def test_values_in_and_out(linear_bundle: Path) -> None:
    session = PortableTrainingSession(Bundle.open(linear_bundle))
    session.set_trainable_values({"1.bias": [[1.0, 2.0, 3.0]]})  # reshaped to the training shape
    out = session.trainable_values()
    np.testing.assert_array_equal(out["1.bias"], [1, 2, 3])
    out["1.bias"][:] = 0  # a copy
    assert session.trainable_values()["1.bias"][0] == 1
    params = session.parameter_values(["1.weight", "1.bias"])
    np.testing.assert_array_equal(params["1.weight"], _linear_weights()["1.weight"])
    np.testing.assert_array_equal(params["1.bias"], [1, 2, 3])
    with pytest.raises(InvalidArgumentError, match="not trainable"):
        session.set_trainable_values({"1.weight": np.zeros((HIDDEN, CLASSES))})
    with pytest.raises(InvalidArgumentError, match="has 2 elements"):
        session.set_trainable_values({"1.bias": np.zeros(2)})
    with pytest.raises(InvalidArgumentError, match="learning_rate"):
        session.set_learning_rate(float("nan"))


@pytest.mark.parametrize("feeds, labels, match", [
    ({"x": np.zeros((2, IN_DIM), np.float64)}, np.array([0, 1]), r"input 'x' has dtype float64.*float32"),
    ({"x": np.zeros((2, IN_DIM), np.float32)}, np.array([0, 1], np.int32), r"input 'labels' has dtype int32.*int64"),
    ({"x": np.zeros((2, IN_DIM + 1), np.float32)}, np.array([0, 1]), r"input 'x' has size 5 on axis 1"),
    ({"x": np.zeros(IN_DIM, np.float32)}, np.array([0, 1]), r"input 'x' has shape \(4,\)"),
    ({"x": np.zeros((3, IN_DIM), np.float32)}, np.array([0, 1]), r"'labels' has 2 on its 'batch' axis but 'x' has 3"),
    ({}, np.array([0, 1]), r"input 'x' is missing"),
    ({"x": np.zeros((2, IN_DIM), np.float32)}, np.array([0, 7]), r"input 'labels' holds class indices 0..7.*3 classes"),
    ({"x": np.zeros((2, IN_DIM), np.float32)}, np.array([-1, 0]), r"input 'labels' holds class indices -1..0"),
])
def test_bad_arrays_are_invalid_user_data_naming_the_input(linear_bundle: Path, feeds, labels, match) -> None:
    session = PortableTrainingSession(Bundle.open(linear_bundle))
    before = session.trainable_values()
    for call in (session.train_step, session.evaluate):
        with pytest.raises(InvalidUserDataError, match=match):
            call(feeds, labels)
    for n, value in session.trainable_values().items():  # a refused step changes nothing
        np.testing.assert_array_equal(value, before[n])


def _rehash(bundle: Path) -> None:
    """Rewrite the manifest's file entries after a test changed files on purpose."""
    opened = Bundle.open(bundle, verify="none")
    opened.manifest.files = {k: file_entry(bundle, e.path) for k, e in opened.manifest.files.items()}
    write_manifest(bundle, opened.manifest)


def test_damaged_or_missing_files_are_bundle_invalid_and_say_which(linear_bundle: Path) -> None:
    opened = Bundle.open(linear_bundle)  # checked, then damaged on disk (a copy gone wrong, a full disk)
    gradient = linear_bundle / "portable_gradient.onnx"
    data = gradient.read_bytes()
    gradient.write_bytes(data[::-1])
    with pytest.raises(BundleInvalidError, match=r"portable_gradient.onnx does not match its sha256.*copy it again"):
        PortableTrainingSession(opened)
    gradient.write_bytes(data[: len(data) // 3])
    with pytest.raises(BundleInvalidError, match=r"portable_gradient.onnx has \d+ bytes, the manifest says"):
        PortableTrainingSession(opened)
    gradient.unlink()
    with pytest.raises(BundleInvalidError, match=r"portable_gradient.onnx.*is missing; copy the whole bundle"):
        PortableTrainingSession(opened)


def test_truncated_weights_file_is_bundle_invalid(tmp_path: Path) -> None:
    bundle = write_linear_bundle(tmp_path / "w")
    opened = Bundle.open(bundle)
    weights = bundle / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    with pytest.raises(BundleInvalidError, match="weights.safetensors has .* bytes"):
        PortableTrainingSession(opened)


def test_models_newer_than_this_onnxruntime_are_backend_unavailable(tmp_path: Path) -> None:
    bundle = write_linear_bundle(tmp_path / "new-opset")
    model = onnx.load(str(bundle / "portable_gradient.onnx"), load_external_data=False)
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", 99))
    onnx.save(model, str(bundle / "portable_gradient.onnx"))
    _rehash(bundle)
    with pytest.raises(BackendUnavailableError, match=rf"onnxruntime {ort.__version__} cannot run .*newer"):
        PortableTrainingSession(Bundle.open(bundle))


def test_models_that_do_not_match_the_manifest_are_bundle_invalid(tmp_path: Path) -> None:
    bundle = write_linear_bundle(tmp_path / "mixed")
    shutil.copy(bundle / "portable_eval.onnx", bundle / "portable_gradient.onnx")  # no gradients any more
    _rehash(bundle)
    with pytest.raises(BundleInvalidError, match="do not match manifest.json"):
        PortableTrainingSession(Bundle.open(bundle))
    other = write_linear_bundle(tmp_path / "sgd-opt", "sgd")
    bundle = write_linear_bundle(tmp_path / "wrong-opt")
    shutil.copy(other / "portable_optimizer.onnx", bundle / "portable_optimizer.onnx")  # SGD graph, manifest says adamw
    _rehash(bundle)
    with pytest.raises(BundleInvalidError, match="not the adamw update"):
        PortableTrainingSession(Bundle.open(bundle))


def test_providers(linear_bundle: Path) -> None:
    bundle = Bundle.open(linear_bundle)
    assert PortableTrainingSession(bundle).providers == ["CPUExecutionProvider"]
    with pytest.warns(RuntimeWarning, match="NoSuchExecutionProvider is not available"):
        session = PortableTrainingSession(bundle, providers=["NoSuchExecutionProvider"])
    assert session.providers == ["CPUExecutionProvider"]
    with pytest.raises(ProviderUnavailableError, match="unknown training device"):
        PortableTrainingSession(bundle, device="tpu")  # type: ignore[arg-type]


def test_cuda_device_without_cuda_is_refused(linear_bundle: Path) -> None:
    if cuda_available():
        pytest.skip("this onnxruntime has CUDA: the refusal cannot happen here")
    with pytest.raises(ProviderUnavailableError, match="device='cuda' was asked for.*use device='cpu'"):
        PortableTrainingSession(Bundle.open(linear_bundle), device="cuda")


@pytest.mark.cuda
def test_cuda_session_matches_cpu(linear_bundle: Path) -> None:
    if not cuda_available():
        pytest.skip("this onnxruntime build has no CUDA provider")
    bundle = Bundle.open(linear_bundle)
    cpu, gpu = PortableTrainingSession(bundle, learning_rate=0.05), PortableTrainingSession(bundle, device="cuda", learning_rate=0.05)
    assert gpu.providers[0] == "CUDAExecutionProvider"
    for t in range(3):
        x, y = _batch(t)
        assert gpu.train_step({"x": x}, y) == pytest.approx(cpu.train_step({"x": x}, y), rel=1e-5)
    for n in TRAINABLE:
        np.testing.assert_allclose(gpu.trainable_values()[n], cpu.trainable_values()[n], atol=1e-5)


def test_backend_choice_on_a_portable_only_bundle(linear_bundle: Path) -> None:
    bundle = Bundle.open(linear_bundle)
    assert open_training_session(bundle).backend == "portable"
    assert open_training_session(str(linear_bundle), backend="portable").backend == "portable"
    with pytest.raises(BackendUnavailableError, match="'ort-training' backend cannot run here: this test bundle has no ORT"):
        open_training_session(bundle, backend="ort-training")
    with pytest.raises(InvalidArgumentError, match="backend must be one of"):
        open_training_session(bundle, backend="onnx")  # type: ignore[arg-type]


# -- exported bundles: both backends side by side ----------------------------------------

needs_ort_training = pytest.mark.skipif(not has_training_api(), reason="needs onnxruntime-training 1.19.2 for the ort-training side")
_EXPORTS: dict[str, Path] = {}


def _export_tiny(name: str, root: Path) -> Path:
    """Tiny models of tests/tiny_models.py exported once per process (SGD MLP, BatchNorm CNN)."""
    if name not in _EXPORTS:
        from bitfit.export import export_bundle

        sys.path.insert(0, str(Path(__file__).parent))
        import tiny_models

        model, example = {"mlp-sgd": tiny_models.mlp, "cnn": tiny_models.cnn}[name]()
        export_bundle(model, root / name, example_inputs=example, labels=["a", "b", "c"],
                      optimizer="sgd" if name == "mlp-sgd" else "adamw")
        _EXPORTS[name] = root / name
    return _EXPORTS[name]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("portable-tiny")


@pytest.fixture(params=["numeric", "text", "text-head", "mlp-sgd", "cnn"])
def exported(request, tiny_root: Path) -> Bundle:
    fixture = {"numeric": "numeric_bundle", "text": "text_bundle", "text-head": "text_head_bundle"}.get(request.param)
    path = request.getfixturevalue(fixture) if fixture else _export_tiny(request.param, tiny_root)
    bundle = Bundle.open(path)
    if not bundle.manifest.backend_available("portable"):
        pytest.skip(f"{request.param}: the export wrote no portable model ({bundle.manifest.backend_reason('portable')})")
    return bundle


def _random_batch(bundle: Bundle, rng: np.random.Generator, rows: int = 4, length: int = 7):
    """Feeds and labels that fit the manifest: ids within the vocabulary, masks of ones."""
    manifest = bundle.manifest
    feeds = {}
    for spec in manifest.inputs:
        shape = [rows if i == 0 else (d if isinstance(d, int) else length) for i, d in enumerate(spec.shape)]
        if np.dtype(spec.dtype).kind == "f":
            feeds[spec.name] = rng.normal(size=shape).astype(spec.dtype)
        elif "mask" in spec.name:
            feeds[spec.name] = np.ones(shape, spec.dtype)
        elif "type" in spec.name:
            feeds[spec.name] = np.zeros(shape, spec.dtype)
        else:
            feeds[spec.name] = rng.integers(2, 40, size=shape).astype(spec.dtype)
    classes = manifest.outputs[0].shape[-1]
    return feeds, rng.integers(0, classes, rows).astype(np.int64)


@needs_ort_training
def test_both_backends_train_alike_step_by_step(exported: Bundle) -> None:
    """Same start, data and learning rate: per-step losses within 1e-5 relative, biases within 1e-5."""
    rng = np.random.default_rng(0)
    base = exported.trainable_base()
    start = {n: v + rng.normal(scale=0.05, size=v.shape).astype(np.float32) for n, v in base.items()}  # base + a delta
    lr = 0.05 if exported.manifest.optimizer == "sgd" else 1e-2
    sessions = [open_training_session(exported, backend=b, start=start, learning_rate=lr) for b in ("ort-training", "portable")]
    assert [s.backend for s in sessions] == ["ort-training", "portable"]
    assert sessions[0].input_names == sessions[1].input_names
    for step in range(6):
        feeds, labels = _random_batch(exported, rng)
        old, new = (s.train_step(feeds, labels) for s in sessions)
        assert new == pytest.approx(old, rel=1e-5), f"step {step}"
    feeds, labels = _random_batch(exported, rng)
    (old_loss, old_out), (new_loss, new_out) = (s.evaluate(feeds, labels) for s in sessions)
    assert new_loss == pytest.approx(old_loss, rel=1e-5)
    np.testing.assert_allclose(new_out, old_out, atol=1e-5)
    old_values, new_values = (s.trainable_values() for s in sessions)
    moved = 0
    for name in sessions[0].trainable:
        np.testing.assert_allclose(new_values[name], old_values[name], atol=1e-5, rtol=0, err_msg=name)
        moved += not np.array_equal(new_values[name], start[name])
    assert moved, "training changed nothing: the comparison would prove nothing"
    frozen = [n for n in exported.manifest.source["parameter_order"] if n not in base][:3]
    for name, value in sessions[1].parameter_values(frozen).items():
        np.testing.assert_array_equal(value, sessions[0].parameter_values([name])[name], err_msg=name)


@needs_ort_training
def test_both_backends_restart_like_a_new_session(numeric_bundle: Path) -> None:
    bundle = Bundle.open(numeric_bundle)
    rng = np.random.default_rng(1)
    start = {n: v + 0.1 for n, v in bundle.trainable_base().items()}
    for backend in ("ort-training", "portable"):
        used = open_training_session(bundle, backend=backend, learning_rate=5e-2)
        for _ in range(3):
            used.train_step(*_random_batch(bundle, rng))
        used.restart(start=start, learning_rate=1e-2)
        fresh = open_training_session(bundle, backend=backend, start=start, learning_rate=1e-2)
        batch = _random_batch(bundle, rng)
        assert used.train_step(*batch) == pytest.approx(fresh.train_step(*batch), rel=1e-6), backend
        for name, value in fresh.trainable_values().items():
            np.testing.assert_allclose(used.trainable_values()[name], value, rtol=0, atol=1e-7, err_msg=f"{backend} {name}")
        # A refused argument leaves the session as it was: same values, and it trains on like `fresh`.
        before = used.trainable_values()
        wrong = {name: np.zeros(value.size + 1, np.float32) for name, value in list(start.items())[:1]}
        for bad in ({"learning_rate": -1.0}, {"start": wrong}):
            with pytest.raises(InvalidArgumentError):
                used.restart(**bad)
        for name, value in before.items():
            np.testing.assert_array_equal(used.trainable_values()[name], value, err_msg=f"{backend} {name}")
        batch = _random_batch(bundle, rng)
        assert used.train_step(*batch) == pytest.approx(fresh.train_step(*batch), rel=1e-6), backend


@needs_ort_training
def test_both_backends_give_the_same_gradients_without_updating(numeric_bundle: Path) -> None:
    """OrtTrainingSession.gradients (what export validation reads) agrees with the portable
    model, and leaves no accumulated gradient behind for the next train_step."""
    bundle = Bundle.open(numeric_bundle)
    rng = np.random.default_rng(3)
    feeds, labels = _random_batch(bundle, rng)
    sessions = [open_training_session(bundle, backend=b, learning_rate=1e-2) for b in ("ort-training", "portable")]
    (old_loss, old), (new_loss, new) = (s.gradients(feeds, labels) for s in sessions)
    assert new_loss == pytest.approx(old_loss, rel=1e-5) and sorted(old) == sorted(new) == sorted(sessions[0].trainable)
    assert any(np.abs(g).max() > 0 for g in old.values()), "all-zero gradients would prove nothing"
    for name in old:
        np.testing.assert_allclose(new[name], old[name], atol=1e-6, err_msg=name)
    base = bundle.trainable_base()
    for name, value in sessions[0].trainable_values().items():
        np.testing.assert_array_equal(value, base[name].reshape(value.shape))
    fresh = open_training_session(bundle, backend="ort-training", learning_rate=1e-2)
    sessions[0].gradients(feeds, labels)  # twice: a second call must not double the gradients
    sessions[0].train_step(feeds, labels)
    fresh.train_step(feeds, labels)
    for name, value in sessions[0].trainable_values().items():
        np.testing.assert_allclose(value, fresh.trainable_values()[name], atol=1e-7, err_msg=name)


_X = np.zeros((2, 8), np.float32)  # the numeric bundle: features [batch, 8], 3 classes


@needs_ort_training
@pytest.mark.parametrize("feeds, labels, match", [
    ({"features": _X.astype(np.float64)}, np.array([0, 1]), r"input 'features' has dtype float64.*float32"),
    ({"features": _X}, np.array([0, 1], np.int32), r"input 'labels' has dtype int32.*int64"),
    ({"features": np.zeros((2, 9), np.float32)}, np.array([0, 1]), r"input 'features' has size 9 on axis 1"),
    ({"features": np.zeros((3, 8), np.float32)}, np.array([0, 1]), r"'labels' has 2 on its 'batch' axis but 'features' has 3"),
    ({}, np.array([0, 1]), r"input 'features' is missing"),
    ({"features": _X}, np.array([0, 7]), r"input 'labels' holds class indices 0..7; the model has 3 classes"),
])
def test_both_backends_refuse_the_same_arrays_with_the_same_message(numeric_bundle: Path, feeds, labels, match) -> None:
    """The ort-training backend used to pass bad arrays to onnxruntime (a KeyError, a bare
    RuntimeError) and trained silently on class indices beyond the classes."""
    bundle = Bundle.open(numeric_bundle)
    messages = set()
    for backend in ("ort-training", "portable"):
        session = open_training_session(bundle, backend=backend)
        before = session.trainable_values()
        for call in (session.train_step, session.evaluate, session.gradients):
            with pytest.raises(InvalidUserDataError, match=match) as err:
                call(feeds, labels)
            messages.add(str(err.value))
        for name, value in session.trainable_values().items():  # a refused step changes nothing
            np.testing.assert_array_equal(value, before[name])
    assert len(messages) == 1, messages


@needs_ort_training
@pytest.mark.parametrize("call, match", [
    (lambda s: s.set_learning_rate(float("nan")), "learning_rate must be a finite number >= 0, got nan"),
    (lambda s: s.set_learning_rate(-1e-3), "learning_rate must be a finite number >= 0"),
    (lambda s: s.set_trainable_values({"nope.bias": np.zeros(3)}), r"\['nope.bias'\] are not trainable tensors"),
    (lambda s: s.set_trainable_values({"4.bias": np.zeros(4)}), r"value for '4.bias' has 4 elements, the tensor has shape \[3\]"),
])
def test_both_backends_refuse_the_same_arguments_with_the_same_message(numeric_bundle: Path, call, match) -> None:
    bundle = Bundle.open(numeric_bundle)
    messages = set()
    for backend in ("ort-training", "portable"):
        session = open_training_session(bundle, backend=backend)
        with pytest.raises(InvalidArgumentError, match=match) as err:
            call(session)
        messages.add(str(err.value))
    assert len(messages) == 1, messages


@needs_ort_training
@pytest.mark.parametrize("start, match", [
    ({"4.bias": np.zeros(4)}, r"value for '4.bias' has 4 elements, the tensor has shape \[3\]"),
    ({"nope.bias": np.zeros(3)}, r"\['nope.bias'\] are not trainable tensors"),
])
def test_both_backends_refuse_a_bad_start_alike(numeric_bundle: Path, start, match) -> None:
    """Not "the weights file does not match" (the bundle blamed for the caller's array), not ignored."""
    bundle = Bundle.open(numeric_bundle)
    messages = set()
    for backend in ("ort-training", "portable"):
        with pytest.raises(InvalidArgumentError, match=match) as err:
            open_training_session(bundle, backend=backend, start=start)
        messages.add(str(err.value))
    assert len(messages) == 1, messages


@needs_ort_training
def test_default_learning_rate_is_the_training_api_default(numeric_bundle: Path) -> None:
    bundle = Bundle.open(numeric_bundle)
    sessions = [open_training_session(bundle, backend=b) for b in ("ort-training", "portable")]
    assert sessions[0].optimizer.get_learning_rate() == pytest.approx(1e-3)
    rng = np.random.default_rng(1)
    for _ in range(3):
        feeds, labels = _random_batch(bundle, rng)
        for s in sessions:
            s.train_step(feeds, labels)
    old, new = (s.trainable_values() for s in sessions)
    for name in old:
        np.testing.assert_allclose(new[name], old[name], atol=1e-6)


def test_token_ids_beyond_the_embeddings_are_invalid_user_data(text_bundle: Path) -> None:
    bundle = Bundle.open(text_bundle)
    session = open_training_session(bundle, backend="portable")
    feeds, labels = _random_batch(bundle, np.random.default_rng(0))
    feeds["input_ids"][0, 0] = 10_000
    with pytest.raises(InvalidUserDataError, match="onnxruntime refused the input arrays.*ids within its embeddings"):
        session.train_step(feeds, labels)


@needs_ort_training
def test_personalize_with_either_backend_saves_the_same_delta(text_bundle: Path, tmp_path: Path) -> None:
    from bitfit.sdk import Personalizer

    data = text_data(40)
    deltas = {}
    for backend in ("ort-training", "portable"):
        p = Personalizer(text_bundle, tmp_path / backend, backend=backend)
        result = p.personalize(data, user="alice", encoding="fp32", **QUICK)
        assert result.backend == backend
        delta = p.store.load("alice")
        assert delta.info["backend"] == backend
        assert result.accuracy_after is not None and result.accuracy_after > result.accuracy_before
        deltas[backend] = (result, delta)
    (old, old_delta), (new, new_delta) = deltas["ort-training"], deltas["portable"]
    assert (new.steps, new.kept_step, new.stopped_by) == (old.steps, old.kept_step, old.stopped_by)
    assert new.loss_after == pytest.approx(old.loss_after, rel=1e-5)
    for name, value in old_delta.tensors.items():
        np.testing.assert_allclose(new_delta.tensors[name], value, atol=1e-5, err_msg=name)
    auto = Personalizer(text_bundle, tmp_path / "auto").personalize(data[:12], user="bob", **QUICK)
    assert auto.backend == "portable"


def numeric_data_pairs():
    """12 numeric examples with label names, as personalize takes them."""
    from sdk_fixtures import numeric_data

    features, labels = numeric_data(12)
    return {"features": features, "labels": [["a", "b", "c"][i] for i in labels]}


def _as_format_1(source: Path, out: Path) -> Path:
    """A copy of an exported bundle as bitfit wrote it before the portable model (format 1)."""
    shutil.copytree(source, out)
    manifest = Bundle.open(out).manifest
    for key in ("portable_gradient_model", "portable_eval_model", "portable_optimizer_model"):
        (out / manifest.files.pop(key).path).unlink()
    manifest.format_version = 1
    manifest.training_backends = {}
    write_manifest(out, manifest)
    return out


def test_format_1_bundle_has_no_portable_backend(numeric_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    from bitfit.sdk import Personalizer
    from bitfit.sdk import trainer

    old = Bundle.open(_as_format_1(numeric_bundle, tmp_path / "v1"))
    for call in (lambda: open_training_session(old, backend="portable"), lambda: PortableTrainingSession(old)):
        with pytest.raises(BackendUnavailableError, match="bundle format 1 predates the portable training model; re-export"):
            call()
    with pytest.raises(BackendUnavailableError, match="format 1 predates"):
        Personalizer(old, tmp_path / "store", backend="portable").personalize(numeric_data_pairs(), user="u", **QUICK)
    if trainer.has_training_api():
        assert open_training_session(old).backend == "ort-training"  # auto falls back to the training build
    # On plain onnxruntime (no training API) nothing can train a format-1 bundle: say why and what to do.
    monkeypatch.setattr(trainer, "has_training_api", lambda: False)
    with pytest.raises(BackendUnavailableError) as caught:
        open_training_session(old)
    message = str(caught.value)
    assert "portable: bundle format 1 predates" in message
    assert "ort-training: onnxruntime" in message and "onnxruntime-training-cpu==1.19.2" in message
    assert "Re-export the bundle" in message
    with pytest.raises(BackendUnavailableError, match=r"'ort-training' backend cannot run here.*pip install 'bitfit\[ort-training\]'"):
        open_training_session(Bundle.open(numeric_bundle), backend="ort-training")


def test_personalizer_refuses_an_unknown_backend(numeric_bundle: Path, tmp_path: Path) -> None:
    from bitfit.sdk import Personalizer

    with pytest.raises(InvalidArgumentError, match="backend must be"):
        Personalizer(numeric_bundle, tmp_path, backend="onnx")  # type: ignore[arg-type]


def test_the_portable_backend_never_imports_the_training_api(numeric_bundle: Path) -> None:
    """Plain onnxruntime has no onnxruntime.training: the portable path must not touch it."""
    import subprocess

    code = f"""
import sys
sys.modules["onnxruntime.training.api"] = None  # as on plain onnxruntime: importing it fails
import numpy as np
from bitfit.sdk.trainer import open_training_session
session = open_training_session({str(numeric_bundle)!r})
loss = session.train_step({{"features": np.zeros((2, 8), np.float32)}}, np.array([0, 1], np.int64))
assert session.backend == "portable" and np.isfinite(loss)
assert "bitfit.sdk.ort_training" not in sys.modules and "torch" not in sys.modules
try:
    open_training_session({str(numeric_bundle)!r}, backend="ort-training")
except Exception as err:
    print(type(err).__name__, err)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("BackendUnavailableError"), done.stdout


def test_cli_personalize_backend(text_bundle: Path, tmp_path: Path, capsys) -> None:
    from bitfit.sdk.cli import main
    from sdk_fixtures import write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": label} for t, label in text_data(16)])
    code = main(["personalize", str(text_bundle), "--user", "al", "--data", str(data), "--store", str(tmp_path / "s"),
                 "--epochs", "1", "--backend", "portable"])
    assert code == 0 and "backend portable" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["personalize", str(text_bundle), "--user", "al", "--data", str(data), "--backend", "onnx"])


@pytest.mark.cuda
def test_personalize_on_cuda_with_the_portable_backend(text_bundle: Path, tmp_path: Path) -> None:
    if not cuda_available():
        pytest.skip("this onnxruntime build has no CUDA provider")
    from bitfit.sdk import Personalizer

    result = Personalizer(text_bundle, tmp_path, providers="cuda", backend="portable").personalize(text_data(24), user="g", **QUICK)
    assert result.backend == "portable" and result.steps > 0


@pytest.mark.integration
@needs_ort_training
def test_minilm_backends_agree(minilm_bundle) -> None:
    """The packaged MiniLM: a few AdamW steps of both backends on the same tokenized batches."""
    from bitfit.sdk.data import TextEncoder

    if not minilm_bundle.manifest.backend_available("portable"):
        pytest.skip(minilm_bundle.manifest.backend_reason("portable"))
    encoder = TextEncoder(minilm_bundle)
    texts = ["my flight was late again", "great crew, thank you", "lost my bag", "the seat was fine",
             "worst airline ever", "on time and friendly", "meh", "cancelled twice in a row"]
    feeds = encoder.pad(*encoder.encode(texts))
    labels = np.array([0, 2, 0, 1, 0, 2, 1, 0], np.int64)
    sessions = [open_training_session(minilm_bundle, backend=b, learning_rate=2e-3) for b in ("ort-training", "portable")]
    for step in range(3):
        old, new = (s.train_step(feeds, labels) for s in sessions)
        assert new == pytest.approx(old, rel=1e-5), f"step {step}"
    old_values, new_values = (s.trainable_values() for s in sessions)
    for name in old_values:
        np.testing.assert_allclose(new_values[name], old_values[name], atol=1e-5, rtol=0, err_msg=name)


def test_out_of_memory_in_a_step_is_resource_exhausted(numeric_bundle, monkeypatch):
    """An allocation failure inside onnxruntime is reported as memory, not as bad user data."""
    from bitfit.sdk.errors import ResourceExhaustedError
    from bitfit.sdk.trainer import open_training_session

    session = open_training_session(numeric_bundle, backend="portable")

    class FakeSession:
        def run(self, outputs, feeds):
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : std::bad_alloc")

    with pytest.raises(ResourceExhaustedError, match="out of memory"):
        session._run(FakeSession(), ["loss"], {})


@needs_ort_training
@pytest.mark.parametrize("change, match", [
    (lambda t: dataclasses.replace(t, name=t.name + "_renamed"), r"'[^']+_renamed' is missing"),
    (lambda t: dataclasses.replace(t, shape=[t.size, 1], inference_shape=[t.size, 1]), r"'[^']+' is \[\d+\], the manifest says \[\d+, 1\]"),
])
def test_ort_training_refuses_a_checkpoint_that_is_not_the_manifests(numeric_bundle: Path, change, match) -> None:
    """The ORT backend checks starts against the manifest's shapes and writes values into the
    checkpoint: a checkpoint holding other tensors is refused when it loads, naming the tensor,
    instead of a KeyError or a value of the wrong shape reaching onnxruntime."""
    bundle = Bundle.open(numeric_bundle)
    bundle.manifest.trainable = [change(bundle.manifest.trainable[0]), *bundle.manifest.trainable[1:]]
    with pytest.raises(BundleInvalidError, match=r"checkpoint does not hold the manifest's trainable tensors \(" + match):
        open_training_session(bundle, backend="ort-training")
