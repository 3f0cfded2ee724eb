"""``export_bundle``: one call from a frozen model to a bias-only training bundle.

Example:
    >>> import torch
    >>> from bitfit.export import export_bundle
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    >>> bundle = export_bundle(net, "/tmp/bitfit-doc-mlp", example_inputs={"x": torch.randn(2, 4)},
    ...                        labels=["a", "b", "c"], overwrite=True)
    >>> [t.name for t in bundle.manifest.trainable], bundle.manifest.per_row
    (['0.bias', '2.bias'], True)
    >>> bundle.manifest.training_defaults          # a small model: a larger peak learning rate (by size)
    {'learning_rate': 0.1}
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import onnx

from bitfit.sdk.bundle import (
    Bundle, IOSpec, LossName, Manifest, OptimizerName, Task, TextSpec, TrainableTensor,
    file_entry, fingerprint_tensors, write_manifest,
)
from bitfit.sdk.errors import BackendUnavailableError, ExportError, PolicyError
from bitfit.sdk.runtime import has_training_api
from bitfit.sdk.atomic_files import replace_dir
from bitfit.sdk.training_plan import learning_rate_for_size

from . import sources
from .artifacts import LABEL_INPUT, generate_training_artifacts, loss_for
from .added_biases import AddedBias
from .added_biases import add_biases as add_bias_tensors
from .biases import BasePolicy, BiasInfo, BiasUse, bias_uses_by_name, cross_check, find_biases, select_trainable
from .inference_graph import INFERENCE_FILE, WEIGHTS_FILE, build_inference_model
from .optimizer_graph import OPTIMIZER_SETTINGS
from .portable import write_portable_models
from .repairs import ensure_named_nodes, refuse_unsupported, repair_for_training, split_shared_biases
from .validate import validate_bundle

log = logging.getLogger("bitfit.export")
BITFIT_VERSION = "0.2.0"
OrtTrainingArtifacts = Literal["auto", "required", "never"]
NO_TRAINING_API = (
    "onnxruntime-training was not installed where this bundle was exported (plain onnxruntime has no "
    "gradient builder); export with `pip install 'bitfit[export,ort-training]'` for these artifacts"
)


def resolve_source(
    model: Any,
    *,
    example_inputs: Any = None,
    labels: list[str] | None = None,
    hf_task: str | None = None,
    max_length: int = 128,
    output_names: list[str] | None = None,
) -> sources.SourceGraph:
    """Turn any accepted model form into a SourceGraph (see ``export_bundle``).

    Example:
        >>> import torch
        >>> src = resolve_source(torch.nn.Linear(3, 2), example_inputs={"x": torch.ones(1, 3)})
        >>> src.kind, src.param_names
        ('torch', ['weight', 'bias'])
    """
    if isinstance(model, sources.SourceGraph):
        return model
    if isinstance(model, str) and model == "minilm":
        from .minilm import MeanPoolClassifier, example_text_inputs, minilm_dir

        if not labels:
            raise ExportError("the built-in 'minilm' needs labels=[...] for its classification head")
        module = MeanPoolClassifier.from_packaged(labels)
        tokenizer = minilm_dir() / "tokenizer.json"
        src = sources.from_torch(module, example_inputs or example_text_inputs(tokenizer, max_length), name="minilm")
        src.kind, src.tokenizer_file, src.head_weight = "minilm", tokenizer, "head.weight"
        src.text = TextSpec(tokenizer="tokenizer.json", max_length=max_length, token_type_ids="token_type_ids")
        return src
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if path.is_dir():
            if hf_task is None:
                raise ExportError("a Hugging Face directory needs hf_task= text-classification, token-classification or feature-extraction")
            return sources.from_hf_dir(path, hf_task, labels=labels, max_length=max_length)  # type: ignore[arg-type]
        if path.suffix == ".onnx":
            return sources.from_onnx_file(path, example_inputs=example_inputs)
        raise ExportError(f"{model!r} is neither 'minilm', a Hugging Face model directory, nor an .onnx file")
    if example_inputs is None:
        raise ExportError("a torch module needs example_inputs= (a dict or tuple of tensors for one batch)")
    return sources.from_torch(model, example_inputs, output_names=output_names)


def export_bundle(
    model: Any,
    out_dir: str | os.PathLike,
    *,
    example_inputs: Any = None,
    task: Task | None = None,
    labels: list[str] | None = None,
    policy: str = "all-biases",
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    loss: LossName | None = None,
    optimizer: OptimizerName = "adamw",
    ignore_index: int = -100,
    tokenizer: str | os.PathLike | None = None,
    max_length: int = 128,
    hf_task: str | None = None,
    ort_format: bool = False,
    ort_training: OrtTrainingArtifacts = "auto",
    overwrite: bool = False,
    verbose: bool = False,
    learning_rate: float | None = None,
    add_biases: str | None = None,
) -> Bundle:
    """Export ``model`` to a bundle directory at ``out_dir`` and return it, validated.

    ``model`` is a ``torch.nn.Module`` (with ``example_inputs``), a Hugging Face model
    directory (with ``hf_task``), an ``.onnx`` file, or ``"minilm"`` (with ``labels``).
    Nothing is left at ``out_dir`` unless every step and check passed. The summary line
    (trainable count and fraction, backends) is logged to ``bitfit.export``; with
    ``verbose=True`` (``bitfit export`` passes it) it is also printed.

    ``learning_rate`` is recorded in the manifest's ``training_defaults`` and used by
    ``personalize`` when its caller gives none (the peak of its schedule); None picks it by the
    model's size (``default_learning_rate``: 4e-3 for MiniLM, 0.1 for a 3 k-value model;
    docs/personalize.md).

    ``add_biases`` gives a bias-free model (Llama-style) zero-initialised biases to train
    before the policy is applied: ``"linear"`` after every MatMul/Gemm with a weight and no
    bias, ``"norms"`` a shift after every RMSNorm-style scale, ``"all"`` both, or a regex
    over the names they would get (``export/added_biases.py``). The base outputs do not
    change (validated); the manifest lists them under ``source.added_biases``.

    Every bundle gets the portable training model (plain onnxruntime) where the graph
    allows; ``ort_training`` decides the onnxruntime-training 1.19.2 artifacts: ``"auto"``
    writes them where that package is installed, ``"required"`` fails without it,
    ``"never"`` skips them. The manifest's ``training_backends`` says which backends the
    bundle has and why one is missing.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> b = export_bundle(net, "/tmp/bitfit-doc-export", example_inputs=(torch.randn(2, 4),), labels=["no", "yes"],
        ...                   ort_training="never", overwrite=True)
        >>> [i.name for i in b.manifest.inputs], b.manifest.backend_available("portable"), b.manifest.policy["trainable_values"]
        (['input'], True, 10)
    """
    out_dir = Path(out_dir)
    _check_options(out_dir, overwrite=overwrite, policy=policy, loss=loss, optimizer=optimizer, ort_training=ort_training,
                   learning_rate=learning_rate, add_biases=add_biases)
    write_ort_training = ort_training != "never" and has_training_api()
    started = time.perf_counter()
    src = resolve_source(model, example_inputs=example_inputs, labels=labels, hf_task=hf_task, max_length=max_length)
    task = task or src.task or "classification"
    loss = loss or loss_for(task)
    labels = labels or src.labels
    forward = src.model
    chosen = _choose_trainable(forward, src, policy, include, exclude, add_biases)
    trainable = chosen.names

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        graph_inputs = {i.name for i in forward.graph.input}
        feeds = {k: v for k, v in src.example_inputs.items() if k in graph_inputs}
        plan, base = build_inference_model(forward, trainable, chosen.uses, work, feeds)
        token_ignore = ignore_index if loss == "token-cross-entropy" else None
        models = _write_training_models(forward, trainable, base, work, feeds, loss=loss, optimizer=optimizer,
                                        token_ignore=token_ignore, ort_training=ort_training,
                                        write_ort_training=write_ort_training)
        files = models.files
        files.update({"inference_model": INFERENCE_FILE, "weights": WEIGHTS_FILE})
        text = _write_text_files(src, forward, work, files, tokenizer, max_length)
        if ort_format:
            files.update(_write_ort_format(models, trainable, work, loss=loss, optimizer=optimizer, token_ignore=token_ignore))
        manifest = _build_manifest(
            src, forward, chosen, plan, base, work, files, models, task=task, loss=loss, optimizer=optimizer,
            labels=labels, text=text, ignore_index=ignore_index, learning_rate=learning_rate,
            hf_task=hf_task)
        bundle = Bundle(work, manifest)
        manifest.validation = validate_bundle(bundle, src.example_inputs, src.reference, src.torch_logits)
        write_manifest(work, manifest)
        _log_summary(out_dir, manifest, chosen, plan, started, verbose)
        _move_into_place(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return Bundle.open(out_dir)


@dataclass
class _TrainableChoice:
    """What the policy chose, with the facts the manifest records about it."""

    names: list[str]
    selection: Any
    uses: dict[str, list[BiasUse]]
    roles: dict[str, str]
    copies: dict[str, list[str]]
    unmatched: list[str]
    added: list[AddedBias]
    kinds: dict[str, str]


@dataclass
class _TrainingModels:
    """The training models written into the work directory and what the manifest says of them."""

    files: dict[str, str]
    portable: Any
    backends: dict[str, dict[str, Any]]
    repairs: dict[str, Any]
    order: list[str]
    training_graph: onnx.ModelProto | None
    frozen: list[str]


def _check_options(out_dir: Path, *, overwrite: bool, policy: str, loss: Any, optimizer: Any, ort_training: Any,
                   learning_rate: Any, add_biases: Any) -> None:
    """Refuse bad arguments before any work starts."""
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir} already exists: pass overwrite=True (or --overwrite) to replace it")
    if policy and "+" not in policy and policy not in get_args(BasePolicy):
        select_trainable(None, [], policy)  # raises the PolicyError with the list of policies
    for name, value, choices in (("loss", loss, get_args(LossName)), ("optimizer", optimizer, get_args(OptimizerName)),
                                 ("ort_training", ort_training, get_args(OrtTrainingArtifacts))):
        if (value is not None or name != "loss") and value not in choices:
            raise ExportError(f"unknown {name} {value!r}: use {', '.join(choices)}")
    if learning_rate is not None and (type(learning_rate) not in (int, float) or not 0 < learning_rate < float("inf")):
        raise ExportError(f"learning_rate must be a positive number or None (chosen by the model's size), got {learning_rate!r}")
    if add_biases is not None and (not isinstance(add_biases, str) or not add_biases):
        raise PolicyError(f"add_biases must be None, 'linear', 'norms', 'all' or a regex, got {add_biases!r}")
    if ort_training == "required" and not has_training_api():
        raise BackendUnavailableError(
            "ort_training='required' but this environment has plain onnxruntime, without the gradient builder of "
            "onnxruntime-training: install `pip install 'bitfit[export,ort-training]'` (not beside plain onnxruntime), "
            "or pass ort_training='auto' for a portable-only bundle")


def _choose_trainable(forward: onnx.ModelProto, src: sources.SourceGraph, policy: str, include: list[str] | None,
                      exclude: list[str] | None, add_biases: str | None) -> _TrainableChoice:
    """Add biases where asked, find every bias, apply the policy, split shared biases."""
    refuse_unsupported(forward)
    ensure_named_nodes(forward)
    added = add_bias_tensors(forward, add_biases) if add_biases else []
    biases = _with_norm_shifts(find_biases(forward), added)
    unmatched = cross_check(biases, src.param_names)
    selection = select_trainable(forward, biases, policy, include=include, exclude=exclude, head_weight=src.head_weight)
    copies = split_shared_biases(forward, selection.names, bias_uses_by_name(biases))
    biases = _with_norm_shifts(find_biases(forward), added)
    names = [n for name in selection.names for n in [name, *copies.get(name, [])]]
    kinds = {b.name: b.kind for b in biases}
    kinds.update({a.name: a.kind for a in added})
    return _TrainableChoice(names, selection, bias_uses_by_name(biases), {b.name: "bias" for b in biases}, copies,
                            unmatched, added, kinds)


def _with_norm_shifts(biases: list[BiasInfo], added: list[AddedBias]) -> list[BiasInfo]:
    # A shift added after an RMSNorm scale is an Add after a Mul, which the structural search
    # (an Add after MatMul/Conv/Gemm) does not call a bias; it is one all the same.
    known = {b.name for b in biases}
    extra = [BiasInfo(a.name, a.shape, "layernorm", (BiasUse(a.node, "Add", 1),))
             for a in added if a.kind == "norm-shift" and a.name not in known]
    return biases + extra


def _write_training_models(forward: onnx.ModelProto, trainable: list[str], base: dict[str, np.ndarray], work: Path,
                           feeds: dict[str, np.ndarray], *, loss: str, optimizer: str, token_ignore: int | None,
                           ort_training: str, write_ort_training: bool) -> _TrainingModels:
    """The portable models, and the ORT training artifacts where asked and possible."""
    portable = write_portable_models(forward, trainable, {n: list(base[n].shape) for n in trainable}, work, loss=loss,
                                     optimizer=optimizer, example_inputs=feeds, ignore_index=token_ignore)
    files: dict[str, str] = dict(portable.files)
    repairs: dict[str, Any] = {}
    order: list[str] = []
    training_graph = None
    frozen: list[str] = []
    if write_ort_training:
        training_graph = onnx.ModelProto.FromString(forward.SerializeToString())
        repairs = repair_for_training(training_graph)
        float_params = [i.name for i in training_graph.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
        frozen = [n for n in float_params if n not in trainable]
        files.update(generate_training_artifacts(training_graph, trainable, frozen, work, loss=loss, optimizer=optimizer,
                                                 ignore_index=token_ignore))
        order = [i.name for i in onnx.load(str(work / files["training_model"]), load_external_data=False).graph.input
                 if i.name in base]
    if not portable.available and not write_ort_training:
        raise ExportError(
            f"this model cannot have a portable training model ({portable.reason}) and "
            + (NO_TRAINING_API if ort_training == "auto" else "ort_training='never' was asked") + ": no backend could train it"
        )
    backends = {
        "portable": {"available": portable.available, "reason": portable.reason},
        "ort-training": {"available": write_ort_training,
                         "reason": "" if write_ort_training else ("ort_training='never' was asked" if ort_training == "never" else NO_TRAINING_API)},
    }
    return _TrainingModels(files, portable, backends, repairs, order, training_graph, frozen)


def _write_text_files(src: sources.SourceGraph, forward: onnx.ModelProto, work: Path, files: dict[str, str],
                      tokenizer: str | os.PathLike | None, max_length: int) -> TextSpec | None:
    """Copy the tokenizer in (text models); the text spec the manifest records."""
    text = src.text
    tokenizer_file = Path(tokenizer) if tokenizer else src.tokenizer_file
    if tokenizer_file is not None:
        files["tokenizer"] = sources.copy_tokenizer(tokenizer_file, work)
        text = text or _text_spec_for(forward, max_length)
    return text


def _write_ort_format(models: _TrainingModels, trainable: list[str], work: Path, *, loss: str, optimizer: str,
                      token_ignore: int | None) -> dict[str, str]:
    """The ORT-format copies for mobile runtimes (``ort_format=True``)."""
    files: dict[str, str] = {}
    if models.training_graph is not None:
        files.update(generate_training_artifacts(models.training_graph, trainable, models.frozen, work, loss=loss,
                                                 optimizer=optimizer, ignore_index=token_ignore, ort_format=True))
    files["mobile_inference_model"] = _inference_to_ort(work)
    # A reduced-operator mobile build must include the inference model's operators too.
    if (work / "mobile" / "inference.required_operators.config").is_file():
        files["mobile_inference_model_required_operators"] = "mobile/inference.required_operators.config"
    return files


def _build_manifest(src: sources.SourceGraph, forward: onnx.ModelProto, chosen: _TrainableChoice, plan: Any,
                    base: dict[str, np.ndarray], work: Path, files: dict[str, str], models: _TrainingModels, *,
                    task: Task, loss: LossName, optimizer: OptimizerName, labels: list[str] | None, text: TextSpec | None,
                    ignore_index: int, learning_rate: float | None, hf_task: str | None) -> Manifest:
    """The manifest of the bundle in ``work`` (validation is filled in afterwards)."""
    trainable, selection = chosen.names, chosen.selection
    inference = onnx.load(str(work / INFERENCE_FILE), load_external_data=False)
    total = int(sum(v.size for v in base.values()))
    trainable_values = int(sum(base[n].size for n in trainable))
    manifest = Manifest(
        base_fingerprint=fingerprint_tensors(base),
        task=task, loss=loss, optimizer=optimizer,
        inputs=_io_specs(inference.graph.input, exclude=set(trainable) | {i.name for i in inference.graph.initializer}),
        outputs=_io_specs(inference.graph.output),
        trainable=[TrainableTensor(n, list(base[n].shape), "float32",
                                   chosen.roles.get(n, "head-weight" if n == selection.head_weight else "other"),
                                   plan.inference_shapes[n]) for n in trainable],
        files={},
        policy={"name": selection.policy, "include": selection.include, "exclude": selection.exclude,
                "trainable_values": trainable_values, "total_values": total,
                "fraction": trainable_values / total, "unmatched_framework_biases": chosen.unmatched,
                "split_shared_biases": chosen.copies},
        labels=list(labels) if labels else None, text=text,
        ignore_index=ignore_index if loss == "token-cross-entropy" else None,
        per_row=plan.per_row, label_input=LABEL_INPUT,
        source={"kind": src.kind, "name": src.name, "parameter_order": models.order, "repairs": models.repairs,
                "per_row_reason": plan.reason, "bitfit_version": BITFIT_VERSION,
                "optimizer_settings": OPTIMIZER_SETTINGS[optimizer], "portable": models.portable.stats,
                "parameter_names": source_parameter_names(trainable, chosen.copies, src.param_names, chosen.added),
                "bias_kinds": {n: chosen.kinds[n] for n in trainable if n in chosen.kinds},
                "added_biases": {a.name: a.as_dict() for a in chosen.added if a.name in trainable},
                **({"hf_task": hf_task} if src.kind == "hf" and hf_task else {})},
        opset=next((o.version for o in forward.opset_import if o.domain in ("", "ai.onnx")), 17),
        ort_version=_ort_version(), created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        training_backends=models.backends,
        training_defaults={"learning_rate": float(learning_rate) if learning_rate is not None else default_learning_rate(total)},
    )
    manifest.files = {k: file_entry(work, v) for k, v in files.items()}
    return manifest


def source_parameter_names(trainable: list[str], copies: dict[str, list[str]], param_names: list[str] | None,
                           added: tuple[AddedBias, ...] | list[AddedBias] = ()) -> dict[str, str | None]:
    """Each trainable tensor's parameter name in the source model (``manifest.source.parameter_names``).

    A split copy (``x.bias.__copy1``) maps to the parameter it was split from; a tensor the
    source model does not have (a bias ``add_biases`` added, an ``.onnx`` source's tensors,
    which have no framework names) maps to None.

    Example:
        >>> source_parameter_names(["0.bias", "0.bias.__copy1", "onnx::Add_3"], {"0.bias": ["0.bias.__copy1"]},
        ...                        ["0.weight", "0.bias"])
        {'0.bias': '0.bias', '0.bias.__copy1': '0.bias', 'onnx::Add_3': None}
    """
    origin = {copy: name for name, group in copies.items() for copy in group}
    known = set(param_names or [])
    added_names = {a.name for a in added}
    out: dict[str, str | None] = {}
    for name in trainable:
        original = origin.get(name, name)
        out[name] = original if original in known and name not in added_names else None
    return out


def _log_summary(out_dir: Path, manifest: Manifest, chosen: _TrainableChoice, plan: Any, started: float, verbose: bool) -> None:
    policy = manifest.policy
    trains_with = [b for b, v in manifest.training_backends.items() if v["available"]]
    added = f", {len(manifest.source['added_biases'])} of them added" if manifest.source.get("added_biases") else ""
    summary = (f"bitfit: {out_dir}: {len(chosen.names)} trainable tensors ({chosen.selection.policy}{added}), "
               f"{policy['trainable_values']:,} of {policy['total_values']:,} values "
               f"({100 * policy['fraction']:.3f}%), per-row users: "
               f"{'yes' if plan.per_row else 'no (' + plan.reason + ')'}, backends: {', '.join(trains_with)}, "
               f"validated in {time.perf_counter() - started:.1f}s")
    log.info(summary)
    if verbose:
        print(summary)


def default_learning_rate(total_values: int) -> float:
    """The learning rate a bundle records when ``export_bundle`` is given none: the peak the
    SDK's schedule uses, by the model's size (``bitfit.sdk.training_plan.learning_rate_for_size``:
    measured best at 0.1 for 3 k-value models and 4e-3 for MiniLM's 22.6 M; docs/personalize.md).

    Example:
        >>> default_learning_rate(22_566_531), default_learning_rate(467)
        (0.004, 0.1)
    """
    return learning_rate_for_size(total_values)


def _text_spec_for(model: onnx.ModelProto, max_length: int) -> TextSpec:
    """Map a tokenizer's outputs onto the model's inputs by their conventional names."""
    names = [i.name for i in model.graph.input if i.name not in {x.name for x in model.graph.initializer}]
    ids = next((n for n in names if n == "input_ids"), names[0])
    return TextSpec(tokenizer="tokenizer.json", max_length=max_length, input_ids=ids,
                    attention_mask="attention_mask" if "attention_mask" in names else None,
                    token_type_ids="token_type_ids" if "token_type_ids" in names else None)


def _io_specs(values, exclude: set[str] = frozenset()) -> list[IOSpec]:
    out = []
    for v in values:
        if v.name in exclude:
            continue
        tt = v.type.tensor_type
        dtype = str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)))
        out.append(IOSpec(v.name, dtype, [d.dim_param or d.dim_value for d in tt.shape.dim]))
    return out


def _ort_version() -> str:
    from bitfit.sdk.runtime import ort

    return ort.__version__


def _inference_to_ort(work: Path) -> str:
    # ORT-format models cannot read external data: inline the weights for the mobile copy.
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    model = onnx.load(str(work / INFERENCE_FILE))  # resolves external data
    mobile = work / "mobile"
    mobile.mkdir(exist_ok=True)
    onnx.save(model, str(mobile / INFERENCE_FILE))
    convert_onnx_models_to_ort(mobile / INFERENCE_FILE, output_dir=mobile, optimization_styles=[OptimizationStyle.Fixed])
    (mobile / INFERENCE_FILE).unlink()
    return "mobile/inference.ort"


def _move_into_place(work: Path, out_dir: Path) -> None:
    """Swap the finished bundle in; an old bundle is removed only after the new one is in place."""
    # mkdtemp made the work dir owner-only (0700); a bundle is meant to be shared (e.g. read
    # by a service account), so give it the permissions a normal directory would get.
    umask = os.umask(0)
    os.umask(umask)
    for path in [work, *work.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
    replace_dir(work, out_dir)


__all__ = ["export_bundle", "resolve_source", "source_parameter_names"]
