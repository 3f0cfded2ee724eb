"""BitFit for bias-free models: ``export_bundle(..., add_biases=...)`` adds zero biases at ONNX
graph level (export/added_biases.py); the base outputs stay the same, the added tensors train
like any bias, and personalization lowers a user's held-out loss on tiny Llama-style and
GPT-2-style causal LMs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

from bitfit.export import export_bundle
from bitfit.export.added_biases import add_biases, find_bias_free_outputs
from bitfit.export.delta_transfer import beft_vectors, trained_state_dict
from bitfit.sdk import DeltaStore, Personalizer
from bitfit.sdk.bundle import Bundle
from bitfit.sdk.delta import Delta
from bitfit.sdk.errors import PolicyError, UnsupportedModelError
from bitfit.sdk.predictor import Predictor
from bitfit.sdk.runtime import ort

from tiny_models import VOCAB, LogitsOnly, no_bias_net, text_inputs, tiny_gpt2

IGNORE = -100
STYLE_TOKENS = np.arange(40, 52)  # the user's "style": a dozen tokens the base model has no preference for


# -- graph level ------------------------------------------------------------------------

def _graph_with_every_case() -> onnx.ModelProto:
    """x -> MatMul(Transpose(a.weight)) -> RMSNorm scale -> Gemm(no C) -> MatMul + existing bias."""
    f = onnx.TensorProto.FLOAT
    nodes = [
        helper.make_node("Transpose", ["a.weight"], ["a_t"], perm=[1, 0], name="a.t"),
        helper.make_node("MatMul", ["x", "a_t"], ["h1"], name="a.mm"),
        helper.make_node("Mul", ["h1", "h1"], ["sq"], name="n.sq"),
        helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1], name="n.mean"),
        helper.make_node("Add", ["ms", "eps"], ["ms_eps"], name="n.eps"),
        helper.make_node("Sqrt", ["ms_eps"], ["rms"], name="n.sqrt"),
        helper.make_node("Div", ["h1", "rms"], ["normed"], name="n.div"),
        helper.make_node("Mul", ["normed", "norm.weight"], ["h2"], name="n.scale"),
        helper.make_node("Gemm", ["h2", "b.weight"], ["h3"], transB=1, name="b.gemm"),
        helper.make_node("MatMul", ["h3", "c.weight"], ["h4"], name="c.mm"),
        helper.make_node("Add", ["h4", "c.bias"], ["y"], name="c.add"),
    ]
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in [
        ("a.weight", rng.normal(size=(6, 4))), ("eps", np.array(1e-6)), ("norm.weight", rng.normal(size=6)),
        ("b.weight", rng.normal(size=(5, 6))), ("c.weight", rng.normal(size=(5, 3))), ("c.bias", rng.normal(size=3))]]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, ["batch", 4])],
                              [helper.make_tensor_value_info("y", f, ["batch", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_candidates_are_bias_free_linear_outputs_and_norm_scales():
    found = {c["name"]: (c["kind"], c["width"], c["module"]) for c in find_bias_free_outputs(_graph_with_every_case())}
    assert found == {"a.bias": ("linear", 6, "a"), "norm.bias": ("norm-shift", 6, "norm"), "b.bias": ("linear", 5, "b")}


def test_added_biases_leave_outputs_unchanged_and_act_as_biases():
    model = _graph_with_every_case()
    x = {"x": np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)}
    before = _run(model, x)
    added = add_biases(model, "all")
    assert [(a.name, a.kind, a.shape) for a in added] == [("a.bias", "linear", (6,)), ("norm.bias", "norm-shift", (6,)),
                                                          ("b.bias", "linear", (5,))]
    onnx.checker.check_model(model)
    np.testing.assert_array_equal(_run(model, x), before)
    # A non-zero value shifts the layer's output exactly like a bias: y(b) - y(0) == b @ W for the last layer.
    for init in model.graph.initializer:
        if init.name == "b.bias":
            init.CopyFrom(numpy_helper.from_array(np.full(5, 0.5, np.float32), "b.bias"))
    shifted = _run(model, x)
    assert not np.allclose(shifted, before)
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    np.testing.assert_allclose(shifted - before, np.full((3, 5), 0.5, np.float32) @ weights["c.weight"], atol=1e-5)


def test_selection_by_name_regex_and_exclude():
    assert [a.name for a in add_biases(_graph_with_every_case(), "linear")] == ["a.bias", "b.bias"]
    assert [a.name for a in add_biases(_graph_with_every_case(), "norms")] == ["norm.bias"]
    assert [a.name for a in add_biases(_graph_with_every_case(), r"^b\.")] == ["b.bias"]
    assert [a.name for a in add_biases(_graph_with_every_case(), "all", exclude=["norm"])] == ["a.bias", "b.bias"]
    with pytest.raises(PolicyError, match="selected no place"):
        add_biases(_graph_with_every_case(), "^nothing$")
    with pytest.raises(PolicyError, match="invalid"):
        add_biases(_graph_with_every_case(), "(")
    with pytest.raises(PolicyError, match="add_biases must be"):
        model, example = no_bias_net()
        export_bundle(model, "/tmp/bitfit-never-written", example_inputs=example, add_biases="")


def test_bias_free_mlp_exports_and_trains_on_the_portable_backend(tmp_path):
    model, example = no_bias_net()
    with pytest.raises(UnsupportedModelError, match="no biases"):
        export_bundle(model, tmp_path / "plain", example_inputs=example)
    bundle = export_bundle(model, tmp_path / "b", example_inputs=example, labels=["a", "b", "c"], add_biases="linear")
    manifest = bundle.manifest
    assert [t.name for t in manifest.trainable] == ["a.bias", "b.bias"] and manifest.policy["trainable_values"] == 11
    assert manifest.source["added_biases"]["a.bias"] == {"kind": "linear", "module": "a", "weight": "a.weight",
                                                          "node": "a.bias.__add", "shape": [8]}
    assert manifest.source["parameter_names"] == {"a.bias": None, "b.bias": None}
    assert manifest.backend_available("portable") and manifest.per_row
    assert manifest.validation["inference_vs_source_max_abs_diff"] < 1e-6
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    labels = np.full(60, 2, np.int64)  # a user who always means "c": the added output bias can learn that
    store = DeltaStore(tmp_path / "store")
    Personalizer(bundle, store, backend="portable").personalize((x, labels), user="u", epochs=5, learning_rate=0.1, seed=0)
    delta = store.load("u")
    assert np.abs(delta.tensors["b.bias"]).max() > 1e-2
    predictor = Predictor(bundle, store)
    assert (predictor.logits({"x": x}, ["u"] * 60).argmax(-1) == 2).mean() > (predictor.logits({"x": x}, [None] * 60).argmax(-1) == 2).mean()


class RMSNormSwiGLU(nn.Module):
    """Embedding -> RMSNorm -> SwiGLU MLP (residual) -> RMSNorm -> LM head, all without biases:
    a Llama block minus attention, whose ops the portable backend has rules for."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.norm1, self.norm2 = nn.Parameter(torch.ones(width) + 0.1), nn.Parameter(torch.ones(width) - 0.1)
        self.gate, self.up = nn.Linear(width, 2 * width, bias=False), nn.Linear(width, 2 * width, bias=False)
        self.down, self.head = nn.Linear(2 * width, width, bias=False), nn.Linear(width, VOCAB, bias=False)

    @staticmethod
    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        n = self.rms(h, self.norm1)
        h = h + self.down(torch.nn.functional.silu(self.gate(n)) * self.up(n))
        return self.head(self.rms(h, self.norm2)) + 0 * attention_mask.unsqueeze(-1)


def test_rmsnorm_swiglu_trains_its_added_biases_on_the_portable_backend(tmp_path):
    torch.manual_seed(0)
    bundle = export_bundle(RMSNormSwiGLU().eval(), tmp_path / "b", example_inputs=text_inputs(), task="causal-lm",
                           add_biases="all")
    manifest = bundle.manifest
    assert manifest.backend_available("portable"), manifest.backend_reason("portable")
    assert {v["kind"] for v in manifest.source["added_biases"].values()} == {"linear", "norm-shift"}
    store = DeltaStore(tmp_path / "store")
    train, held = style_sequences(48, seed=0), style_sequences(16, seed=1)
    Personalizer(bundle, store, backend="portable").personalize(train, user="w", epochs=4, learning_rate=0.05,
                                                                batch_size=8, seed=0)
    delta = store.load("w")
    assert delta.info.get("backend") in (None, "portable")
    assert all(np.abs(v).max() > 1e-4 for v in delta.tensors.values())  # every added bias and shift trained
    predictor = Predictor(bundle, store)
    assert held_out_loss(predictor, held, ["w"] * 16) < held_out_loss(predictor, held, [None] * 16) - 0.5


# -- causal LMs -----------------------------------------------------------------------------

def tiny_llama(seed: int = 0) -> nn.Module:
    """A 2-layer Llama (RMSNorm, SwiGLU, rotary, grouped-query attention, no biases) returning logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager", use_cache=False,
                         tie_word_embeddings=False)
    return LogitsOnly(LlamaForCausalLM(config).eval()).eval()


def style_sequences(count: int, seed: int, length: int = 12) -> dict[str, np.ndarray]:
    """Token sequences drawn from the user's dozen style tokens, some padded; labels are the next
    token (shifted already), IGNORE at the last position and on padding."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(STYLE_TOKENS, size=(count, length)).astype(np.int64)
    mask = np.ones((count, length), np.int64)
    for row in range(0, count, 3):
        cut = rng.integers(length // 2, length)
        mask[row, cut:] = 0
        ids[row, cut:] = 0
    labels = np.full((count, length), IGNORE, np.int64)
    labels[:, :-1] = ids[:, 1:]
    labels[:, :-1][mask[:, 1:] == 0] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def held_out_loss(predictor: Predictor, data: dict[str, np.ndarray], users) -> float:
    logits = predictor.logits({k: data[k] for k in ("input_ids", "attention_mask")}, users).astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    keep = data["labels"] != IGNORE
    picked = np.take_along_axis(logp, np.where(keep, data["labels"], 0)[..., None], -1)[..., 0]
    return float(-(picked * keep).sum() / keep.sum())


@pytest.fixture(scope="module")
def llama_bundle(tmp_path_factory) -> Bundle:
    example = {k: v for k, v in text_inputs().items()}
    return export_bundle(tiny_llama(), tmp_path_factory.mktemp("llama") / "bundle", example_inputs=example,
                         task="causal-lm", add_biases="all")


def test_llama_export_adds_counted_trainable_biases_and_keeps_the_outputs(llama_bundle):
    manifest = llama_bundle.manifest
    added = manifest.source["added_biases"]
    names = [t.name for t in manifest.trainable]
    assert set(added) == set(names)  # a Llama has no bias of its own
    kinds = {v["kind"] for v in added.values()}
    assert kinds == {"linear", "norm-shift"}
    assert sum(v["kind"] == "norm-shift" for v in added.values()) == 5  # 2 per layer + the final norm
    assert added["inner.model.layers.0.self_attn.k_proj.bias"]["shape"] == [16]  # grouped-query: 2 heads of 8
    assert manifest.policy["trainable_values"] == sum(int(np.prod(v["shape"])) for v in added.values())
    assert manifest.validation["inference_vs_source_max_abs_diff"] < 1e-5
    assert "inner.model.rotary_emb.inv_freq" in dict(tiny_llama().named_buffers())  # a stock model, rotary buffer and all
    assert manifest.per_row
    base = llama_bundle.trainable_base()
    assert all(not base[n].any() for n in names)  # zero-initialised


def test_llama_has_a_portable_model_whose_gradients_were_validated(llama_bundle):
    # rotate_half's Slice (x[..., x.shape[-1] // 2:]) has starts computed at run time.
    manifest = llama_bundle.manifest
    assert manifest.backend_available("portable"), manifest.backend_reason("portable")
    checked = manifest.validation["portable"]
    assert checked["gradient_reference"] in ("onnxruntime-training gradient builder", "finite-differences")
    assert checked["worst_gradient_error_relative"] <= checked["gradient_tolerance"]
    assert manifest.source["portable"]["zero_gradient"] == []


def test_llama_portable_gradients_equal_the_ort_training_ones(llama_bundle):
    if not llama_bundle.manifest.backend_available("ort-training"):
        pytest.skip("exported without onnxruntime-training: no gradient builder to compare with")
    from bitfit.sdk.trainer import OrtTrainingSession

    data = style_sequences(4, seed=3)
    feeds, labels = {k: data[k] for k in ("input_ids", "attention_mask")}, data["labels"]
    base = llama_bundle.trainable_base()
    session = ort.InferenceSession(str(llama_bundle.file("portable_gradient_model")), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outs = dict(zip(names, session.run(None, {**feeds, "labels": labels, **base})))
    loss, grads = OrtTrainingSession(llama_bundle).gradients(feeds, labels)
    assert float(outs["loss"]) == pytest.approx(loss, rel=1e-5)
    largest = max(float(np.abs(g).max()) for g in grads.values())
    for name, expected in grads.items():
        np.testing.assert_allclose(outs[name + "_grad"], expected, atol=1e-4 * largest, err_msg=name)


def test_llama_personalization_lowers_held_out_loss_and_serves_per_row(llama_bundle, tmp_path):
    store = DeltaStore(tmp_path / "store")
    train, held = style_sequences(48, seed=0), style_sequences(16, seed=1)
    result = Personalizer(llama_bundle, store, backend="portable").personalize(train, user="writer", epochs=6,
                                                                               learning_rate=0.05, batch_size=8, seed=0)
    assert result.backend == "portable"
    predictor = Predictor(llama_bundle, store)
    before = held_out_loss(predictor, held, [None] * 16)
    after = held_out_loss(predictor, held, ["writer"] * 16)
    assert after < before - 0.5, (before, after)  # perplexity exp(before) -> exp(after)
    assert np.exp(after) < 0.6 * np.exp(before)
    delta = store.load("writer")
    moved = [n for n, v in delta.tensors.items() if np.abs(v).max() > 1e-4]
    assert any("norm.bias" in n for n in moved) and any("proj.bias" in n for n in moved)
    # One pass, one user per row, equals each user's own pass.
    feeds = {k: held[k][:4] for k in ("input_ids", "attention_mask")}
    mixed = predictor.logits(feeds, ["writer", None, "writer", None])
    alone = predictor.logits(feeds, ["writer"] * 4), predictor.logits(feeds, [None] * 4)
    np.testing.assert_allclose(mixed[[0, 2]], alone[0][[0, 2]], atol=1e-5)
    np.testing.assert_allclose(mixed[[1, 3]], alone[1][[1, 3]], atol=1e-5)


def test_llama_added_biases_go_to_beft_not_to_the_state_dict(llama_bundle):
    rng = np.random.default_rng(0)
    delta = Delta({t.name: rng.normal(size=t.shape) for t in llama_bundle.manifest.trainable},
                  llama_bundle.manifest.base_fingerprint, encoding="fp32")
    vectors, report = beft_vectors(llama_bundle, delta, strip_prefix="inner.")
    assert "model.layers.0.self_attn.q_proj" in vectors and vectors["model.layers.1.mlp.down_proj"].shape == (1, 32)
    assert len(vectors) == 15 and len(report.skipped) == 5  # 7 Linear per layer + lm_head; the norm shifts cannot go
    assert all("norm-shift" in why for why in report.skipped.values())
    with pytest.raises(Exception, match="no tensor of the delta maps"):
        from bitfit.export.delta_transfer import save_torch_state_dict

        save_torch_state_dict(llama_bundle, delta, "/tmp/never.safetensors")
    state, report = trained_state_dict(llama_bundle, delta)
    assert state == {} and all("add_biases added" in why for why in report.skipped.values())


def test_llama_beft_adapter_predicts_like_the_sdk(llama_bundle, tmp_path):
    peft = pytest.importorskip("peft")
    from bitfit.export.delta_transfer import beft_vectors_names, save_beft_adapter

    linear = beft_vectors_names(llama_bundle)
    rng = np.random.default_rng(3)
    delta = Delta({t.name: (rng.normal(size=t.shape) * 0.3 if t.name in linear else np.zeros(t.shape))
                   for t in llama_bundle.manifest.trainable}, llama_bundle.manifest.base_fingerprint, encoding="fp32")
    store = DeltaStore(tmp_path / "store")
    store.save("u", delta)
    save_beft_adapter(llama_bundle, delta, tmp_path / "beft", strip_prefix="inner.")
    adapted = peft.PeftModel.from_pretrained(tiny_llama().inner, tmp_path / "beft").eval()
    data = style_sequences(4, seed=2)
    ours = Predictor(llama_bundle, store).logits({k: data[k] for k in ("input_ids", "attention_mask")}, ["u"] * 4)
    with torch.no_grad():
        theirs = adapted(input_ids=torch.from_numpy(data["input_ids"]),
                         attention_mask=torch.from_numpy(data["attention_mask"])).logits.numpy()
    keep = data["attention_mask"] == 1  # padded positions are not compared
    assert np.abs(ours[keep] - theirs[keep]).max() < 1e-5


def test_gpt2_gets_an_lm_head_bias_and_learns_a_style(tmp_path):
    model, example = tiny_gpt2()
    bundle = export_bundle(model, tmp_path / "gpt2", example_inputs=example, task="causal-lm", add_biases="linear")
    manifest = bundle.manifest
    assert list(manifest.source["added_biases"]) == ["inner.transformer.wte.bias"]  # the tied LM head's output
    assert "inner.transformer.wte.bias" in {t.name for t in manifest.trainable}
    assert manifest.validation["inference_vs_source_max_abs_diff"] < 1e-5
    store = DeltaStore(tmp_path / "store")
    train, held = style_sequences(48, seed=0), style_sequences(16, seed=1)
    Personalizer(bundle, store).personalize(train, user="writer", epochs=6, learning_rate=0.05, batch_size=8, seed=0)
    predictor = Predictor(bundle, store)
    before, after = held_out_loss(predictor, held, [None] * 16), held_out_loss(predictor, held, ["writer"] * 16)
    assert after < before - 0.5, (before, after)
    assert np.abs(store.load("writer").tensors["inner.transformer.wte.bias"]).max() > 1e-2


def test_an_onnx_file_source_gets_biases_too(tmp_path):
    model, example = no_bias_net()
    path = tmp_path / "nobias.onnx"
    torch.onnx.export(model, (example["x"],), str(path), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False, opset_version=17)
    bundle = export_bundle(path, tmp_path / "b", labels=["a", "b", "c"], add_biases="linear")
    manifest = bundle.manifest
    added = manifest.source["added_biases"]
    # The exporter folded each weight's transpose into a new initializer (onnx::MatMul_N), so the
    # added biases are named after those, and have no module name to map back to.
    assert manifest.source["kind"] == "onnx" and len(added) == 2
    assert all(name == v["weight"] + ".bias" and v["module"] is None and v["kind"] == "linear" for name, v in added.items())
    assert sorted(v["shape"] for v in added.values()) == [[3], [8]]
    assert set(manifest.source["parameter_names"].values()) == {None}
    assert manifest.validation["inference_vs_source_max_abs_diff"] < 1e-6
    assert manifest.backend_available("portable")


# -- validation of added biases -------------------------------------------------------------

class BiasedThenBiasFree(nn.Module):
    """Linear (own bias) -> RMSNorm whose scale is a bare Parameter ``norm1`` -> Linear without
    bias: ``add_biases='all'`` adds ``norm1.bias`` (no module has it: ``norm1`` is a Parameter)
    and ``out.bias``."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(4, 8)
        self.norm1 = nn.Parameter(torch.ones(8) + 0.1)
        self.out = nn.Linear(8, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(RMSNormSwiGLU.rms(self.hidden(x), self.norm1))


@pytest.fixture(scope="module")
def mixed_bundle(tmp_path_factory):
    torch.manual_seed(0)
    model = BiasedThenBiasFree().eval()
    example = {"x": torch.randn(2, 4)}
    bundle = export_bundle(model, tmp_path_factory.mktemp("mixed") / "b", example_inputs=example, labels=["a", "b", "c"],
                           add_biases="all")
    from bitfit.export.sources import from_torch

    return bundle, from_torch(model, example)


def test_validation_checks_module_parameters_by_torch_and_added_biases_otherwise(mixed_bundle, monkeypatch):
    from bitfit.export import validate

    bundle, src = mixed_bundle
    assert sorted(t.name for t in bundle.manifest.trainable) == ["hidden.bias", "norm1.bias", "out.bias"]
    # The source's own torch forward, not one told which names to leave out: overriding
    # norm1.bias by name would be a TypeError (norm1 is a Parameter, not a module).
    with pytest.raises(TypeError):
        src.torch_logits({"norm1.bias": torch.zeros(8)}, src.example_inputs)
    checks = validate.validate_bundle(bundle, src.example_inputs, src.reference, src.torch_logits)["portable"]
    expected_rest = "onnxruntime-training gradient builder" if bundle.manifest.backend_available("ort-training") else "finite-differences"
    assert checks["gradient_reference"] == f"torch-autograd + {expected_rest}"
    assert checks["gradient_checks"]["torch-autograd"]["tensors"] == 1
    assert checks["gradient_checks"][expected_rest]["tensors"] == 2
    # Without the gradient builder the added biases are checked by finite differences.
    monkeypatch.setattr(validate, "_ort_gradients", lambda *args: None)
    checks = validate.validate_bundle(bundle, src.example_inputs, src.reference, src.torch_logits)["portable"]
    assert checks["gradient_reference"] == "torch-autograd + finite-differences"
    assert checks["worst_gradient_error_relative"] <= checks["gradient_tolerance"]


def test_validation_says_so_when_nothing_can_check_the_added_biases(mixed_bundle, monkeypatch):
    from bitfit.export import validate
    from bitfit.sdk.errors import ExportError

    bundle, src = mixed_bundle
    feeds, labels, base = src.example_inputs, np.array([0, 2], np.int64), bundle.trainable_base()
    gradient = ort.InferenceSession(str(bundle.file("portable_gradient_model")), providers=["CPUExecutionProvider"])
    loss, _, *values = gradient.run(None, {**feeds, "labels": labels, **base})
    grads = dict(zip([o.name[: -len("_grad")] for o in gradient.get_outputs()[2:]], values))
    monkeypatch.setattr(validate, "_ort_gradients", lambda *args: None)
    monkeypatch.delitem(bundle.manifest.files, "portable_eval_model")  # no finite differences either
    with pytest.raises(ExportError, match=r"nothing can check the portable gradients of \['(norm1|out).bias', '(norm1|out).bias'\]"):
        validate._check_gradients(bundle, feeds, labels, base, float(loss), grads, src.torch_logits)
