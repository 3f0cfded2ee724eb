"""Deltas back to the workstation and in again (bitfit.export.delta_transfer): a state dict under
the source model's parameter names, a merged Hugging Face directory, a PEFT BEFT adapter, and
imports of each; round trips compare the SDK's predictions with PyTorch's on real inputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file, save_file

from bitfit.export import export_bundle
from bitfit.export.delta_transfer import (
    beft_vectors_names, delta_from_beft_adapter, delta_from_state_dict, parameter_names, save_beft_adapter,
    save_merged_hf_model, save_torch_state_dict, trained_state_dict,
)
from bitfit.sdk import DeltaStore, Personalizer
from bitfit.sdk.bundle import Bundle, write_manifest
from bitfit.sdk.cli import main
from bitfit.sdk.delta import Delta
from bitfit.sdk.errors import BundleInvalidError, DeltaMismatchError, ExportError, InvalidArgumentError
from bitfit.sdk.predictor import Predictor

from sdk_fixtures import *  # noqa: F401,F403  (fixtures)
from sdk_fixtures import PROBES, build_numeric_model, build_text_model, numeric_data, text_data
from tiny_models import save_tiny_bert_hf_dir

TOLERANCE = 1e-5


def random_delta(bundle: Bundle, seed: int = 0, scale: float = 0.2) -> Delta:
    rng = np.random.default_rng(seed)
    return Delta({t.name: rng.normal(size=t.shape) * scale for t in bundle.manifest.trainable},
                 bundle.manifest.base_fingerprint, encoding="fp32")


def sdk_logits(bundle: Bundle, store: DeltaStore, user: str, inputs) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    predictor = Predictor(bundle, store)
    feeds, rows = predictor.encode(inputs)
    return predictor.logits(feeds, [user] * rows), feeds


def torch_text_logits(model, feeds) -> np.ndarray:
    with torch.no_grad():
        return model(*(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))).numpy()


@pytest.fixture(scope="module")
def hf_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    save_tiny_bert_hf_dir(root / "tiny-bert")
    export_bundle(root / "tiny-bert", root / "bundle", hf_task="text-classification", max_length=16)
    return root / "tiny-bert", Bundle.open(root / "bundle")


def test_manifest_records_source_parameter_names(text_bundle):
    bundle = Bundle.open(text_bundle)
    names = parameter_names(bundle)
    model, _ = build_text_model()
    params = dict(model.named_parameters())
    assert set(names) == {t.name for t in bundle.manifest.trainable}
    assert all(source in params for source in names.values())
    assert names["head.bias"] == "head.bias" and "encoder.encoder.layer.0.attention.self.query.bias" in names
    kinds = bundle.manifest.source["bias_kinds"]
    assert kinds["encoder.embeddings.LayerNorm.bias"] == "layernorm" and kinds["head.bias"] in ("gemm", "matmul-add")


def test_personalized_text_delta_to_torch_predicts_like_the_sdk(text_bundle, tmp_path, capsys):
    """Train on device, write the state dict with the CLI, load it into the PyTorch model: same logits."""
    store = DeltaStore(tmp_path / "store")
    Personalizer(text_bundle, store).personalize(text_data(48), user="alice", epochs=3, seed=0)
    out = tmp_path / "alice.safetensors"
    assert main(["deltas", str(store.root), "to-torch", "--user", "alice", "--bundle", str(text_bundle), "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"{len(Bundle.open(text_bundle).manifest.trainable)} tensors mapped, 0 skipped")
    model, _ = build_text_model()
    base, _ = sdk_logits(Bundle.open(text_bundle), store, None, PROBES)
    result = model.load_state_dict(load_file(out), strict=False)
    assert result.unexpected_keys == []
    ours, feeds = sdk_logits(Bundle.open(text_bundle), store, "alice", PROBES)
    theirs = torch_text_logits(model, feeds)
    assert np.abs(ours - base).max() > 1e-2, "training should have changed the predictions"
    assert np.abs(ours - theirs).max() < TOLERANCE


def test_numeric_delta_round_trips_through_a_state_dict(numeric_bundle, tmp_path):
    bundle = Bundle.open(numeric_bundle)
    store = DeltaStore(tmp_path / "store")
    store.save("bob", random_delta(bundle))
    report = save_torch_state_dict(bundle, store.load("bob"), tmp_path / "bob.safetensors")
    assert report.skipped == {} and sorted(report.mapped.values()) == ["0.bias", "2.bias", "4.bias"]
    model, _ = build_numeric_model()
    model.load_state_dict(load_file(report.path), strict=False)
    features, _ = numeric_data(16, seed=3)
    ours, _ = sdk_logits(bundle, store, "bob", {"features": features})
    with torch.no_grad():
        theirs = model(torch.from_numpy(features)).numpy()
    assert np.abs(ours - theirs).max() < TOLERANCE
    assert load_numpy(str(report.path)).keys() == {"0.bias", "2.bias", "4.bias"}


def test_import_a_pytorch_bitfit_state_dict(text_bundle, tmp_path, capsys):
    """BitFit in PyTorch (biases only, a few Adam steps), then `bitfit deltas import`: the SDK predicts the same."""
    model, _ = build_text_model()
    bundle = Bundle.open(text_bundle)
    predictor = Predictor(bundle, False)
    feeds, _ = predictor.encode([t for t, _ in text_data(16)])
    labels = torch.tensor([1 if label == "pos" else 0 for _, label in text_data(16)])
    biases = [p for n, p in model.named_parameters() if n.endswith(".bias")]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in biases:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(biases, lr=0.05)
    inputs = [torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask", "token_type_ids")]
    for _ in range(5):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(*inputs), labels).backward()
        optimizer.step()
    model.eval()
    sd = tmp_path / "bitfit.safetensors"
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if n.endswith(".bias")}, str(sd))
    store = tmp_path / "store"
    assert main(["deltas", str(store), "import", "--user", "carol", "--bundle", str(text_bundle), "--from", str(sd),
                 "--encoding", "fp32"]) == 0
    assert "carol: saved v1" in capsys.readouterr().out
    ours, feeds = sdk_logits(bundle, DeltaStore(store), "carol", PROBES)
    assert np.abs(ours - torch_text_logits(model, feeds)).max() < TOLERANCE
    pt = tmp_path / "bitfit.pt"  # a torch.save'd full state dict works too
    torch.save(model.state_dict(), pt)
    assert main(["deltas", str(store), "import", "--user", "dave", "--bundle", str(text_bundle), "--from", str(pt),
                 "--encoding", "fp32"]) == 0
    carol, dave = DeltaStore(store).load("carol"), DeltaStore(store).load("dave")
    assert all(np.array_equal(carol.tensors[n], dave.tensors[n]) for n in carol.tensors)


def test_state_dict_of_another_model_is_refused(text_bundle):
    bundle = Bundle.open(text_bundle)
    with pytest.raises(DeltaMismatchError, match="no key of the state dict"):
        delta_from_state_dict(bundle, {"fc.bias": np.zeros(3, np.float32)})
    with pytest.raises(DeltaMismatchError, match="shape"):
        delta_from_state_dict(bundle, {"head.bias": np.zeros(5, np.float32)})
    delta, report = delta_from_state_dict(bundle, {"module.head.bias": np.ones(2, np.float32)}, strip_prefix="module.")
    assert report.mapped == {"head.bias": "head.bias"} and len(report.skipped) == len(bundle.manifest.trainable) - 1
    assert np.count_nonzero(np.concatenate([v for n, v in delta.tensors.items() if n != "head.bias"])) == 0


def test_delta_of_another_bundle_is_refused(text_bundle, numeric_bundle, tmp_path):
    with pytest.raises(DeltaMismatchError, match="does not fit"):
        save_torch_state_dict(Bundle.open(text_bundle), random_delta(Bundle.open(numeric_bundle)), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_bundle_without_parameter_names_is_refused_with_re_export(numeric_bundle, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(numeric_bundle, old)
    manifest = Bundle.open(old).manifest
    del manifest.source["parameter_names"]
    write_manifest(old, manifest)
    bundle = Bundle.open(old)
    with pytest.raises(BundleInvalidError, match="re-export"):
        save_torch_state_dict(bundle, random_delta(bundle), tmp_path / "x.safetensors")
    store = DeltaStore(tmp_path / "store")
    store.save("u", random_delta(bundle))
    assert main(["deltas", str(store.root), "to-torch", "--user", "u", "--bundle", str(old), "--out",
                 str(tmp_path / "x.safetensors")]) == 2
    assert not (tmp_path / "x.safetensors").exists()


def test_merged_hf_model_predicts_like_the_sdk(hf_bundle, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model_dir, bundle = hf_bundle
    store = DeltaStore(tmp_path / "store")
    store.save("erin", random_delta(bundle, seed=2))
    assert main(["deltas", str(store.root), "to-hf", "--user", "erin", "--bundle", str(bundle.path), "--model-dir",
                 str(model_dir), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    texts = ["w1 w2 w3", "w5 w9 w11 w12 w3", "w30"]
    ours, feeds = sdk_logits(bundle, store, "erin", texts)
    with torch.no_grad():
        theirs = merged(input_ids=torch.from_numpy(feeds["input_ids"]), attention_mask=torch.from_numpy(feeds["attention_mask"]),
                        **({"token_type_ids": torch.from_numpy(feeds["token_type_ids"])} if "token_type_ids" in feeds else {})
                        ).logits.numpy()
    base, _ = sdk_logits(bundle, store, None, texts)
    assert np.abs(ours - base).max() > 1e-2 and np.abs(ours - theirs).max() < TOLERANCE
    with pytest.raises(ExportError, match="already exists"):
        save_merged_hf_model(bundle, store.load("erin"), model_dir, tmp_path / "merged")


def test_to_hf_refuses_another_model_and_non_hf_bundles(hf_bundle, text_bundle, tmp_path):
    model_dir, bundle = hf_bundle
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(other, local_files_only=True)
    with torch.no_grad():
        m.classifier.bias.add_(1.0)
    m.save_pretrained(other)
    with pytest.raises(DeltaMismatchError, match="not the model this bundle was exported from"):
        save_merged_hf_model(bundle, random_delta(bundle), other, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    text = Bundle.open(text_bundle)
    with pytest.raises(ExportError, match="Hugging Face directory"):
        save_merged_hf_model(text, random_delta(text), model_dir, tmp_path / "out")


def test_beft_adapter_has_peft_keys_and_skips_layernorm_biases(hf_bundle, tmp_path):
    _, bundle = hf_bundle
    delta = random_delta(bundle, seed=4)
    report = save_beft_adapter(bundle, delta, tmp_path / "beft", base_model_name_or_path="tiny-bert")
    config = json.loads((tmp_path / "beft" / "adapter_config.json").read_text())
    tensors = load_numpy(str(tmp_path / "beft" / "adapter_model.safetensors"))
    kinds = bundle.manifest.source["bias_kinds"]
    linear = {n for n in kinds if kinds[n] in ("gemm", "matmul-add")}
    assert set(report.mapped) == linear and set(report.skipped) == set(kinds) - linear
    assert all("BEFT has one bias vector per Linear" in why for why in report.skipped.values())
    assert "bert.embeddings.LayerNorm.bias" in report.skipped
    assert config["peft_type"] == "BEFT" and config["task_type"] is None and config["base_model_name_or_path"] == "tiny-bert"
    key = "base_model.model.bert.encoder.layer.0.attention.self.query.beft_bias"
    assert key in tensors and tensors[key].shape == (1, 32)
    np.testing.assert_array_equal(tensors[key][0], delta.tensors["bert.encoder.layer.0.attention.self.query.bias"])
    assert sorted(config["target_modules"]) == sorted(k[len("base_model.model."):-len(".beft_bias")] for k in tensors)
    back, back_report = delta_from_beft_adapter(bundle, tmp_path / "beft", encoding="fp32")
    for name in bundle.manifest.source["bias_kinds"]:
        expected = delta.tensors[name] if name in linear else np.zeros_like(delta.tensors[name])
        np.testing.assert_array_equal(back.tensors[name], expected)
    assert set(back_report.mapped) == linear
    with pytest.raises(ExportError, match="strict"):
        save_beft_adapter(bundle, delta, tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict").exists()


def test_beft_adapter_loads_in_peft_and_predicts_like_the_sdk(hf_bundle, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    model_dir, bundle = hf_bundle
    store = DeltaStore(tmp_path / "store")
    names = beft_vectors_names(bundle)
    rng = np.random.default_rng(5)
    delta = Delta({t.name: (rng.normal(size=t.shape) * 0.2 if t.name in names else np.zeros(t.shape))
                   for t in bundle.manifest.trainable}, bundle.manifest.base_fingerprint, encoding="fp32")
    store.save("frank", delta)
    save_beft_adapter(bundle, delta, tmp_path / "beft")
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True).eval()
    adapted = peft.PeftModel.from_pretrained(model, tmp_path / "beft").eval()
    texts = ["w1 w2 w3", "w5 w9 w11 w12 w3"]
    ours, feeds = sdk_logits(bundle, store, "frank", texts)
    with torch.no_grad():
        theirs = adapted(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    assert np.abs(ours - theirs).max() < TOLERANCE


def test_import_refuses_what_is_not_a_beft_adapter_or_state_dict(hf_bundle, tmp_path):
    _, bundle = hf_bundle
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(InvalidArgumentError, match="not BEFT"):
        delta_from_beft_adapter(bundle, tmp_path / "lora")
    save_beft_adapter(bundle, random_delta(bundle), tmp_path / "beft")
    from safetensors.numpy import save_file as save_numpy

    save_numpy({"base_model.model.decoder.fc.beft_bias": np.zeros((1, 32), np.float32)},
               str(tmp_path / "beft" / "adapter_model.safetensors"))
    with pytest.raises(DeltaMismatchError, match="no Linear bias in this bundle"):
        delta_from_beft_adapter(bundle, tmp_path / "beft")
    (tmp_path / "notes.txt").write_text("x")
    store = tmp_path / "store"
    assert main(["deltas", str(store), "import", "--user", "u", "--bundle", str(bundle.path), "--from",
                 str(tmp_path / "notes.txt")]) == 2
    assert DeltaStore(store).users() == []


def test_split_copies_that_trained_apart_are_skipped_not_guessed(numeric_bundle, tmp_path):
    old = tmp_path / "copies"
    shutil.copytree(numeric_bundle, old)
    manifest = Bundle.open(old).manifest
    # Pretend two biases of one shape were one shared parameter the export split in two.
    names = manifest.source["parameter_names"]
    shapes = manifest.trainable_shapes
    a, b = [n for n in names if shapes[n] == shapes["2.bias"]][:2]
    names[b] = names[a]
    write_manifest(old, manifest)
    bundle = Bundle.open(old)
    state, report = trained_state_dict(bundle, random_delta(bundle))
    assert names[a] not in state and set(report.skipped) == {a, b}
    assert "trained apart" in report.skipped[a]
    base, apart = bundle.trainable_base(), random_delta(bundle).tensors
    same = Delta({**apart, b: base[a] + apart[a] - base[b]}, bundle.manifest.base_fingerprint, encoding="fp32")
    state, report = trained_state_dict(bundle, same)
    assert report.mapped[a] == report.mapped[b] == names[a] and names[a] in state


def test_cli_to_peft_writes_the_adapter_and_strict_refuses_skips(hf_bundle, tmp_path, capsys):
    _, bundle = hf_bundle
    store = DeltaStore(tmp_path / "store")
    store.save("gus", random_delta(bundle, seed=6))
    base = ["deltas", str(store.root), "to-peft", "--user", "gus", "--bundle", str(bundle.path)]
    assert main([*base, "--out", str(tmp_path / "strict"), "--strict"]) == 2
    assert "strict" in capsys.readouterr().err and not (tmp_path / "strict").exists()
    assert main([*base, "--out", str(tmp_path / "beft"), "--base-model", "tiny-bert"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("14 tensors mapped, 5 skipped") and "LayerNorm.bias: a layernorm tensor" in out
    assert json.loads((tmp_path / "beft" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-bert"
    assert main([*base, "--out", str(tmp_path / "beft")]) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
