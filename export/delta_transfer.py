"""Take a delta back to the workstation, and bring trained biases from PyTorch into a store.

A delta holds ``trained - base`` under the bundle's tensor names. These functions map
those names back to the source model's own parameter names (recorded at export in
``manifest.source.parameter_names``; docs/bundle-format.md) and write:

- ``save_torch_state_dict``: a safetensors state dict of the trained tensors, so that
  ``model.load_state_dict(load_file(path), strict=False)`` personalizes the source model;
- ``save_merged_hf_model``: a Hugging Face model directory with the delta merged into its
  weights (``save_pretrained``), for bundles exported from one;
- ``save_beft_adapter``: a PEFT BEFT adapter (``adapter_config.json`` +
  ``adapter_model.safetensors``): one bias vector added to the output of each Linear;

and the reverse, ``delta_from_state_dict`` / ``delta_from_beft_adapter`` /
``import_delta`` (a PyTorch BitFit state dict or a BEFT adapter becomes a delta in a
store). Whatever cannot be mapped is listed, with the reason, in the returned
``TransferReport``. Every file is written atomically. docs/deltas.md has the commands.

Example:
    >>> import torch, tempfile, numpy as np
    >>> from safetensors.torch import load_file
    >>> from bitfit.export import export_bundle
    >>> from bitfit.sdk.delta import Delta
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> bundle = export_bundle(net, tempfile.mkdtemp() + "/b", example_inputs={"x": torch.randn(2, 4)})
    >>> delta = Delta({"0.bias": np.full(8, 0.5), "2.bias": np.zeros(3)}, bundle.manifest.base_fingerprint)
    >>> report = save_torch_state_dict(bundle, delta, tempfile.mkdtemp() + "/alice.safetensors")
    >>> before = net[0].bias.detach().clone()
    >>> net.load_state_dict(load_file(report.path), strict=False).unexpected_keys
    []
    >>> torch.allclose(net[0].bias, before + 0.5)
    True
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bitfit.sdk.bundle import Bundle
from bitfit.sdk.atomic_files import building_dir, write_file_atomic
from bitfit.sdk.delta import Delta, Encoding, check_delta_fits
from bitfit.sdk.errors import BundleInvalidError, DeltaMismatchError, ExportError, InvalidArgumentError
from bitfit.sdk.store import DeltaStore

BEFT_PREFIX = "base_model.model."
BEFT_SUFFIX = ".beft_bias"
BEFT_CONFIG = "adapter_config.json"
BEFT_WEIGHTS = "adapter_model.safetensors"
# Bias kinds that are a Linear layer's output bias (a BEFT vector is exactly that).
LINEAR_KINDS = frozenset({"gemm", "matmul-add", "linear"})
_HF_TASK_OF = {"classification": "text-classification", "regression": "text-classification",
               "multilabel": "text-classification", "token-classification": "token-classification",
               "causal-lm": "causal-lm"}
# PEFT's SEQ_CLS / TOKEN_CLS task types make the classifier a "module to save" whose full
# weights must sit in the adapter; a BEFT adapter carries the classifier's bias as a vector
# instead, so classification adapters get no task type (PEFT's generic PeftModel loads them).
_PEFT_TASK_TYPE = {"causal-lm": "CAUSAL_LM", "feature-extraction": "FEATURE_EXTRACTION"}


@dataclass
class TransferReport:
    """What a transfer wrote and what it could not map.

    Fields: ``path`` (the file or directory written; None for in-memory results),
    ``mapped`` (bundle tensor name -> the name it has in the target: a source parameter,
    a BEFT key, or for imports the source key it came from), ``skipped`` (bundle tensor
    name -> why it is not in the target).

    Example:
        >>> r = TransferReport(None, {"0.bias": "0.bias"}, {"ln.bias": "LayerNorm bias: BEFT has Linear biases only"})
        >>> print(r.summary())
        1 tensors mapped, 1 skipped:
          ln.bias: LayerNorm bias: BEFT has Linear biases only
    """

    path: Path | None
    mapped: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """A few lines for a terminal: counts, then each skipped tensor with its reason.

        Example:
            >>> print(TransferReport(Path("out.safetensors"), {"b": "b"}).summary())
            1 tensors mapped, 0 skipped -> out.safetensors
        """
        head = f"{len(self.mapped)} tensors mapped, {len(self.skipped)} skipped" + (f" -> {self.path}" if self.path else "")
        return "\n".join([head + (":" if self.skipped else ""), *(f"  {n}: {why}" for n, why in self.skipped.items())])


def parameter_names(bundle: Bundle) -> dict[str, str | None]:
    """Each trainable tensor's parameter name in the source model (None: it has none).

    Raises:
        BundleInvalidError: the bundle predates ``source.parameter_names``; re-export it.

    Example:
        >>> bundle, net = _example_bundle()          # Linear -> ReLU -> LayerNorm -> Linear
        >>> parameter_names(bundle)
        {'0.bias': '0.bias', '2.bias': '2.bias', '3.bias': '3.bias'}
    """
    names = bundle.manifest.source.get("parameter_names") if isinstance(bundle.manifest.source, dict) else None
    if not isinstance(names, dict):
        raise BundleInvalidError(
            f"the bundle at {bundle.path} was exported before bitfit recorded the source model's parameter names "
            "(manifest source.parameter_names), so its tensors cannot be mapped back to the model: re-export it with "
            "this bitfit (bitfit export ... / export_bundle) and use deltas trained on the new bundle")
    return {t.name: names.get(t.name) for t in bundle.manifest.trainable}


def trained_state_dict(bundle: Bundle, delta: Delta) -> tuple[dict[str, np.ndarray], TransferReport]:
    """``base + delta`` of every trainable tensor under its source parameter name.

    A bias the export split into copies (``x.bias.__copy1``) maps back only if every copy
    holds the same value within 1e-6 (the source model has one parameter for them); tensors without a
    source name (biases added by ``add_biases``, ``.onnx`` sources) are skipped.

    Raises:
        DeltaMismatchError: the delta belongs to another bundle.
        BundleInvalidError: the bundle predates ``source.parameter_names``.

    Example:
        >>> bundle, net = _example_bundle()
        >>> state, report = trained_state_dict(bundle, _example_delta(bundle))
        >>> sorted(state), bool(np.allclose(state["0.bias"], net[0].bias.detach().numpy() + 0.25))
        (['0.bias', '2.bias', '3.bias'], True)
    """
    names = parameter_names(bundle)
    manifest = bundle.manifest
    check_delta_fits(delta, base_fingerprint=manifest.base_fingerprint, shapes=manifest.trainable_shapes)
    trained = delta.apply_to(bundle.trainable_base())
    added = manifest.source.get("added_biases") or {}
    report = TransferReport(None)
    groups: dict[str, list[str]] = {}
    for name, source in names.items():
        if source is None:
            report.skipped[name] = (
                "a bias add_biases added: the source model has no such parameter (save_beft_adapter carries it as a "
                "BEFT bias)" if name in added else "no parameter of the source model (an .onnx source has no "
                "parameter names)" if manifest.source.get("kind") == "onnx" else "its name in the graph is none of "
                "the source model's parameter names (the exporter renamed or folded it)")
            continue
        groups.setdefault(source, []).append(name)
    out: dict[str, np.ndarray] = {}
    for source, members in groups.items():
        values = [trained[m] for m in members]
        if any(not np.allclose(values[0], v, rtol=0, atol=1e-6) for v in values[1:]):
            for m in members:
                report.skipped[m] = (f"{source} is one parameter shared by {len(members)} uses that trained apart; "
                                     "the source model cannot hold different values for them")
            continue
        out[source] = np.ascontiguousarray(np.mean(values, axis=0), dtype=np.float32)
        for m in members:
            report.mapped[m] = source
    return out, report


def save_torch_state_dict(bundle: Bundle, delta: Delta, path: str | os.PathLike, *, strict: bool = False) -> TransferReport:
    """Write the trained tensors as a safetensors state dict under the source model's
    parameter names (``model.load_state_dict(safetensors.torch.load_file(path), strict=False)``).

    Args:
        bundle: the bundle the delta was trained on.
        delta: the delta (``DeltaStore.load(user)``).
        path: the ``.safetensors`` file to write (atomically).
        strict: refuse (``ExportError``) when any tensor cannot be mapped instead of skipping it.

    Raises:
        ExportError: nothing maps, or ``strict`` and something does not.
        DeltaMismatchError / BundleInvalidError: as ``trained_state_dict``.

    Example:
        >>> bundle, _ = _example_bundle()
        >>> out = Path(tempfile.mkdtemp()) / "alice.safetensors"
        >>> save_torch_state_dict(bundle, _example_delta(bundle), out).mapped
        {'0.bias': '0.bias', '2.bias': '2.bias', '3.bias': '3.bias'}
    """
    from safetensors.numpy import save

    state, report = trained_state_dict(bundle, delta)
    _refuse_unmapped(report, strict, "a state dict")
    report.path = Path(path)
    metadata = {"format": "pt", "bitfit_base_fingerprint": bundle.manifest.base_fingerprint,
                "bitfit_delta_created": delta.created}
    write_file_atomic(report.path, save(state, metadata=metadata))
    return report


def save_merged_hf_model(bundle: Bundle, delta: Delta, model_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                         overwrite: bool = False, strict: bool = False) -> TransferReport:
    """Load the Hugging Face model the bundle was exported from (``model_dir``), merge the
    delta into its parameters and ``save_pretrained`` it (with its tokenizer files) to ``out_dir``.

    Raises:
        ExportError: the bundle was not exported from a Hugging Face directory, ``out_dir``
            exists without ``overwrite``, or (``strict``) a tensor cannot be mapped.
        DeltaMismatchError: ``model_dir`` holds other weights than the bundle's base.

    Example:
        >>> bundle, _ = _example_bundle()             # exported from a torch module, not a HF directory
        >>> save_merged_hf_model(bundle, _example_delta(bundle), "my-bert", tempfile.mkdtemp() + "/merged")
        Traceback (most recent call last):
        ...
        bitfit.sdk.errors.ExportError: to-hf needs a bundle exported from a Hugging Face directory; ...
    """
    import torch

    manifest = bundle.manifest
    if manifest.source.get("kind") != "hf":
        raise ExportError(
            f"to-hf needs a bundle exported from a Hugging Face directory; this one came from a "
            f"{manifest.source.get('kind')!r} source: use save_torch_state_dict (to-torch) and load_state_dict instead")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir} already exists: pass overwrite=True (--overwrite) to replace it")
    state, report = trained_state_dict(bundle, delta)
    model = _load_hf_model(Path(model_dir), manifest.source.get("hf_task") or _HF_TASK_OF.get(manifest.task, ""))
    params = dict(model.named_parameters())
    base = bundle.trainable_base()
    for bundle_name, source in list(report.mapped.items()):
        if source not in params:
            report.skipped[bundle_name] = (f"{source} is not a parameter of the Hugging Face model (bitfit's own "
                                           "classification head of a feature-extraction export)")
            del report.mapped[bundle_name]
            state.pop(source, None)
            continue
        theirs = params[source].detach().cpu().numpy()
        if theirs.shape != base[bundle_name].shape or not np.allclose(theirs, base[bundle_name], atol=1e-6):
            raise DeltaMismatchError(
                f"{model_dir} is not the model this bundle was exported from: its {source} differs from the bundle's "
                "base value; pass the directory given to export_bundle")
    _refuse_unmapped(report, strict, "the merged model")
    with torch.no_grad():
        for source, value in state.items():
            params[source].copy_(torch.from_numpy(value))
    with building_dir(out_dir) as work:
        model.save_pretrained(str(work))
        for extra in Path(model_dir).iterdir():
            if extra.is_file() and (extra.name.startswith("tokenizer") or extra.name in ("vocab.txt", "special_tokens_map.json",
                                                                                         "merges.txt", "vocab.json")):
                shutil.copyfile(extra, work / extra.name)
    report.path = out_dir
    return report


def beft_vectors(bundle: Bundle, delta: Delta, *, strip_prefix: str = "") -> tuple[dict[str, np.ndarray], TransferReport]:
    """The delta as BEFT bias vectors: module path -> ``[1, out_features]`` (the delta of a
    Linear's output bias, since BEFT adds its vector to the Linear's output).

    ``strip_prefix`` is removed from module paths (e.g. ``"inner."`` for a wrapper module
    around the Hugging Face model). LayerNorm/Conv biases, norm shifts and head weights have
    no BEFT counterpart and are skipped.

    Example:
        >>> bundle, _ = _example_bundle()
        >>> vectors, report = beft_vectors(bundle, _example_delta(bundle))
        >>> {m: v.shape for m, v in vectors.items()}, report.skipped
        ({'0': (1, 8), '3': (1, 3)}, {'2.bias': 'a layernorm tensor: BEFT has one bias vector per Linear layer only'})
    """
    names = parameter_names(bundle)
    manifest = bundle.manifest
    check_delta_fits(delta, base_fingerprint=manifest.base_fingerprint, shapes=manifest.trainable_shapes)
    kinds = manifest.source.get("bias_kinds") or {}
    added = manifest.source.get("added_biases") or {}
    report = TransferReport(None)
    out: dict[str, np.ndarray] = {}
    for t in manifest.trainable:
        module = _linear_module(t.name, names.get(t.name), kinds.get(t.name), added.get(t.name))
        if module is None:
            kind = kinds.get(t.name, t.role)
            report.skipped[t.name] = f"a {kind} tensor: BEFT has one bias vector per Linear layer only"
            continue
        if strip_prefix and module.startswith(strip_prefix):
            module = module[len(strip_prefix):]
        if module in out:
            report.skipped[t.name] = f"a second bias for Linear {module} (a split shared bias): BEFT has one per layer"
            continue
        out[module] = delta.tensors[t.name].reshape(1, -1).astype(np.float32)
        report.mapped[t.name] = BEFT_PREFIX + module + BEFT_SUFFIX
    return out, report


def save_beft_adapter(bundle: Bundle, delta: Delta, out_dir: str | os.PathLike, *, base_model_name_or_path: str | None = None,
                      strip_prefix: str = "", overwrite: bool = False, strict: bool = False) -> TransferReport:
    """Write a PEFT BEFT adapter directory (``adapter_config.json`` +
    ``adapter_model.safetensors``, as ``peft`` >= 0.20 saves one) from the delta's Linear biases.

    Load it with ``PeftModel.from_pretrained(model, out_dir)``; ``target_modules`` lists the
    full module paths. Tensors BEFT cannot carry are listed in the report's ``skipped``.

    Raises:
        ExportError: no Linear bias to write, ``out_dir`` exists without ``overwrite``, or
            (``strict``) a tensor cannot be carried.

    Example:
        >>> bundle, _ = _example_bundle()
        >>> report = save_beft_adapter(bundle, _example_delta(bundle), tempfile.mkdtemp() + "/alice-beft")
        >>> sorted(p.name for p in report.path.iterdir()), report.mapped["0.bias"]
        (['adapter_config.json', 'adapter_model.safetensors'], 'base_model.model.0.beft_bias')
    """
    from safetensors.numpy import save

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir} already exists: pass overwrite=True (--overwrite) to replace it")
    vectors, report = beft_vectors(bundle, delta, strip_prefix=strip_prefix)
    if not vectors:
        raise ExportError("no tensor of this delta is a Linear layer's bias, so a BEFT adapter would be empty: "
                          f"{report.summary()}")
    _refuse_unmapped(report, strict, "a BEFT adapter")
    task = bundle.manifest.source.get("hf_task") or _HF_TASK_OF.get(bundle.manifest.task)
    config = {"peft_type": "BEFT", "task_type": _PEFT_TASK_TYPE.get(task or ""), "target_modules": sorted(vectors),
              "base_model_name_or_path": base_model_name_or_path, "init_weights": True, "inference_mode": True,
              "modules_to_save": None, "revision": None, "auto_mapping": None}
    tensors = {BEFT_PREFIX + module + BEFT_SUFFIX: value for module, value in vectors.items()}
    with building_dir(out_dir) as work:
        (work / BEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (work / BEFT_WEIGHTS).write_bytes(save(tensors, metadata={"format": "pt"}))
    report.path = out_dir
    return report


def delta_from_state_dict(bundle: Bundle, state_dict: Mapping[str, Any], *, encoding: Encoding = "fp16",
                          strip_prefix: str = "", info: Mapping[str, Any] | None = None) -> tuple[Delta, TransferReport]:
    """A delta from trained parameters (a PyTorch BitFit run's state dict, full or biases
    only): for each trainable tensor, ``state_dict[source name] - base``; tensors the state
    dict lacks stay at the base (delta 0) and are listed as skipped.

    Raises:
        DeltaMismatchError: no tensor matches, or one has another shape.
        BundleInvalidError: the bundle predates ``source.parameter_names``.

    Example:
        >>> bundle, net = _example_bundle()
        >>> state = {k: v + 0.5 if k == "3.bias" else v for k, v in net.state_dict().items()}
        >>> delta, report = delta_from_state_dict(bundle, state, encoding="fp32")
        >>> delta.tensors["3.bias"].tolist(), float(abs(delta.tensors["0.bias"]).max())
        ([0.5, 0.5, 0.5], 0.0)
    """
    names = parameter_names(bundle)
    base = bundle.trainable_base()
    given = {(k[len(strip_prefix):] if strip_prefix and k.startswith(strip_prefix) else k): v for k, v in state_dict.items()}
    report = TransferReport(None)
    trained: dict[str, np.ndarray] = {}
    for name, source in names.items():
        if source is None or source not in given:
            trained[name] = base[name]
            report.skipped[name] = "not in the state dict: left at the base value" if source else "no source parameter name"
            continue
        value = _numpy(given[source]).astype(np.float32)
        if value.shape != base[name].shape:
            raise DeltaMismatchError(f"{source} has shape {value.shape} in the state dict, the bundle's {name} has "
                                     f"{base[name].shape}: the state dict is of another model")
        trained[name] = value
        report.mapped[name] = source
    if not report.mapped:
        raise DeltaMismatchError(
            f"no key of the state dict is a trainable tensor of this bundle (it wants e.g. "
            f"{[s for s in names.values() if s][:3]}; got e.g. {list(given)[:3]}); pass strip_prefix= if the keys carry one")
    facts = {"imported_from": "state-dict", "imported_tensors": len(report.mapped), **dict(info or {})}
    return Delta.from_params(trained, base, bundle.manifest.base_fingerprint, encoding=encoding, info=facts), report


def delta_from_beft_adapter(bundle: Bundle, adapter_dir: str | os.PathLike, *, encoding: Encoding = "fp16",
                            strip_prefix: str = "", info: Mapping[str, Any] | None = None) -> tuple[Delta, TransferReport]:
    """A delta from a PEFT BEFT adapter directory: each ``beft_bias`` of a Linear becomes the
    delta of that Linear's (existing or added) bias; other trainable tensors stay at 0.

    ``strip_prefix`` is what ``save_beft_adapter`` stripped (it is put back on the module paths).

    Raises:
        InvalidArgumentError: the directory is not a BEFT adapter.
        DeltaMismatchError: an adapter vector has no bias in the bundle, or another width.

    Example:
        >>> bundle, _ = _example_bundle()
        >>> adapter = save_beft_adapter(bundle, _example_delta(bundle), tempfile.mkdtemp() + "/beft").path
        >>> delta, report = delta_from_beft_adapter(bundle, adapter, encoding="fp32")
        >>> delta.tensors["0.bias"][:2].tolist(), delta.tensors["2.bias"][:2].tolist()   # LayerNorm: not in BEFT
        ([0.25, 0.25], [0.0, 0.0])
    """
    from safetensors.numpy import load_file

    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / BEFT_CONFIG, adapter_dir / BEFT_WEIGHTS
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InvalidArgumentError(f"{adapter_dir} is not a PEFT adapter directory ({config_path.name}: {err})") from err
    if not isinstance(config, dict) or config.get("peft_type") != "BEFT":
        raise InvalidArgumentError(f"{adapter_dir} holds a {config.get('peft_type') if isinstance(config, dict) else '?'} "
                                   "adapter, not BEFT: only BEFT bias vectors map onto a delta")
    if not weights_path.is_file():
        raise InvalidArgumentError(f"{adapter_dir} has no {BEFT_WEIGHTS} (a .bin adapter: re-save it with safe_serialization)")
    module_to_name = {key[len(BEFT_PREFIX):-len(BEFT_SUFFIX)]: name
                      for name, key in beft_vectors_names(bundle, strip_prefix).items()}
    base = bundle.trainable_base()
    diffs = {name: np.zeros_like(value) for name, value in base.items()}
    report = TransferReport(None)
    for key, value in load_file(str(weights_path)).items():
        module = key[len(BEFT_PREFIX):] if key.startswith(BEFT_PREFIX) else key
        module = module.removesuffix(".default").removesuffix(BEFT_SUFFIX)
        name = module_to_name.get(module)
        if name is None:
            raise DeltaMismatchError(f"the adapter's {key} has no Linear bias in this bundle (its Linear biases: "
                                     f"{sorted(module_to_name)[:4]}...); the adapter is of another model")
        if value.size != base[name].size:
            raise DeltaMismatchError(f"the adapter's {key} has {value.size} values, the bundle's {name} {base[name].size}")
        diffs[name] = value.reshape(base[name].shape).astype(np.float32)
        report.mapped[name] = key
    for name in base:
        if name not in report.mapped:
            report.skipped[name] = "not in the adapter: delta 0"
    trained = {n: base[n] + diffs[n] for n in base}
    facts = {"imported_from": "peft-beft", "imported_tensors": len(report.mapped), **dict(info or {})}
    return Delta.from_params(trained, base, bundle.manifest.base_fingerprint, encoding=encoding, info=facts), report


def beft_vectors_names(bundle: Bundle, strip_prefix: str = "") -> dict[str, str]:
    """Bundle tensor name -> the BEFT adapter key it maps to, for every Linear bias.

    Example:
        >>> beft_vectors_names(_example_bundle()[0])
        {'0.bias': 'base_model.model.0.beft_bias', '3.bias': 'base_model.model.3.beft_bias'}
    """
    zero = Delta.zeros_like(bundle.trainable_base(), bundle.manifest.base_fingerprint, "fp32")
    return beft_vectors(bundle, zero, strip_prefix=strip_prefix)[1].mapped


def import_delta(bundle: Bundle, source: str | os.PathLike, store: DeltaStore, user: str, *, encoding: Encoding = "fp16",
                 strip_prefix: str = "") -> tuple[int, TransferReport]:
    """Read trained biases from ``source`` and save them as ``user``'s new delta version.

    ``source`` is a BEFT adapter directory, a ``.safetensors`` state dict, or a torch
    ``.bin`` / ``.pt`` state dict (loaded with ``weights_only=True``). Returns the version.

    Raises:
        InvalidArgumentError: ``source`` is none of these.

    Example:
        >>> bundle, net = _example_bundle()
        >>> path = Path(tempfile.mkdtemp()) / "bitfit.safetensors"
        >>> save_torch_state_dict(bundle, _example_delta(bundle), path).path.name
        'bitfit.safetensors'
        >>> version, report = import_delta(bundle, path, DeltaStore(tempfile.mkdtemp()), "alice")
        >>> version, len(report.mapped)
        (1, 3)
    """
    path = Path(source)
    facts = {"imported_path": str(path)}
    if path.is_dir():
        delta, report = delta_from_beft_adapter(bundle, path, encoding=encoding, strip_prefix=strip_prefix, info=facts)
    elif path.is_file() and path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        delta, report = delta_from_state_dict(bundle, load_file(str(path)), encoding=encoding, strip_prefix=strip_prefix,
                                              info=facts)
    elif path.is_file() and path.suffix in (".bin", ".pt", ".pth"):
        import torch

        state = torch.load(str(path), map_location="cpu", weights_only=True)
        delta, report = delta_from_state_dict(bundle, state, encoding=encoding, strip_prefix=strip_prefix, info=facts)
    else:
        raise InvalidArgumentError(
            f"{path} is not a BEFT adapter directory, a .safetensors state dict or a torch .bin/.pt file")
    return store.save(user, delta), report


# -- helpers -------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _example_bundle() -> tuple[Bundle, Any]:
    """A tiny bundle (Linear -> ReLU -> LayerNorm -> Linear, exported once) and its torch module,
    for the docstring examples."""
    import torch

    from .pipeline import export_bundle

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3)).eval()
    bundle = export_bundle(net, Path(tempfile.mkdtemp(prefix="bitfit-doc-")) / "bundle", example_inputs={"x": torch.randn(2, 4)},
                           ort_training="never")
    return bundle, net


def _example_delta(bundle: Bundle) -> Delta:
    return Delta({t.name: np.full(t.shape, 0.25) for t in bundle.manifest.trainable}, bundle.manifest.base_fingerprint,
                 encoding="fp32")


def _linear_module(name: str, source: str | None, kind: str | None, added: Mapping[str, Any] | None) -> str | None:
    if added is not None:
        return added.get("module") if added.get("kind") == "linear" else None
    if kind not in LINEAR_KINDS or source is None or not source.endswith(".bias"):
        return None
    return source[: -len(".bias")]


def _refuse_unmapped(report: TransferReport, strict: bool, what: str) -> None:
    if not report.mapped:
        raise ExportError(f"no tensor of the delta maps onto {what}: {report.summary()}")
    if strict and report.skipped:
        raise ExportError(f"strict: {len(report.skipped)} tensors cannot be written to {what}: {report.summary()}")


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().float().numpy()
    return np.asarray(value)


def _load_hf_model(model_dir: Path, hf_task: str) -> Any:
    from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoModelForTokenClassification)

    loaders = {"text-classification": AutoModelForSequenceClassification,
               "token-classification": AutoModelForTokenClassification, "causal-lm": AutoModelForCausalLM,
               "feature-extraction": AutoModel}
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir} is not a Hugging Face model directory (no config.json): pass the directory the "
                          "bundle was exported from")
    if hf_task not in loaders:
        raise ExportError(f"cannot tell which Hugging Face model class to load for task {hf_task!r}")
    return loaders[hf_task].from_pretrained(str(model_dir), local_files_only=True).eval()


__all__ = ["TransferReport", "parameter_names", "trained_state_dict", "save_torch_state_dict", "save_merged_hf_model",
           "beft_vectors", "beft_vectors_names", "save_beft_adapter", "delta_from_state_dict", "delta_from_beft_adapter",
           "import_delta"]
