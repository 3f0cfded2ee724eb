"""Turn what the user has (a torch module, a Hugging Face directory, an .onnx file, or a
built-in name) into one forward ONNX graph plus what validation needs.

Export settings follow ../shared/ORT_TRAINING_NOTES.md: the TorchScript exporter
(``dynamo=False``) at opset 17 with ``do_constant_folding=False`` and the model in eval
mode keeps every bias as its own initializer named after ``named_parameters()``.

Example:
    >>> import torch
    >>> from bitfit.export.sources import from_torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> src = from_torch(net, {"x": torch.randn(2, 4)})
    >>> sorted(i.name for i in src.model.graph.initializer)
    ['0.bias', '0.weight', '2.bias', '2.weight']
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import onnx
from onnx import numpy_helper

from bitfit.sdk.bundle import Task, TextSpec
from bitfit.sdk.errors import BundleInvalidError, ExportError, UnsupportedModelError
from bitfit.sdk.onnx_refs import external_data_refs

from .gradient_graph import LABEL_INPUT

SourceKind = Literal["torch", "hf", "onnx", "minilm"]
HFTask = Literal["text-classification", "token-classification", "feature-extraction"]
OPSET = 17


@dataclass
class SourceGraph:
    """A forward ONNX graph and the facts that travel with it into the bundle.

    ``reference`` runs the source itself (torch, or onnxruntime on an ``.onnx`` file) on
    numpy feeds: validation compares the bundle with it.

    Example:
        >>> import torch
        >>> src = from_torch(torch.nn.Linear(3, 2), {"x": torch.ones(4, 3)}, name="probe")
        >>> src.kind, src.name, src.param_names, src.reference(src.example_inputs).shape
        ('torch', 'probe', ['weight', 'bias'], (4, 2))
    """

    model: onnx.ModelProto
    kind: SourceKind
    name: str
    example_inputs: dict[str, np.ndarray]
    reference: Callable[[dict[str, np.ndarray]], np.ndarray]
    param_names: list[str] | None = None
    text: TextSpec | None = None
    tokenizer_file: Path | None = None
    labels: list[str] | None = None
    task: Task | None = None
    head_weight: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    torch_logits: Callable[[dict[str, Any], dict[str, np.ndarray]], Any] | None = None
    """``(overrides, feeds) -> output tensor``: the source's own torch forward with some
    parameters replaced (``torch.func.functional_call``), so autograd gives the reference
    gradients the portable training model is validated against. None for ``.onnx`` sources."""


def functional_logits(module: Any, input_names: list[str]) -> Callable[[dict[str, Any], dict[str, np.ndarray]], Any]:
    """A torch forward of ``module`` with parameters overridden by name, returning its first output.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 1)
        >>> f = functional_logits(net, ["x"])
        >>> f({"bias": torch.ones(1)}, {"x": np.zeros((1, 2), np.float32)}).tolist()
        [[1.0]]
    """
    import torch

    def forward(overrides: dict[str, Any], feeds: dict[str, np.ndarray]) -> Any:
        args = tuple(torch.from_numpy(np.ascontiguousarray(feeds[k])) for k in input_names)
        was_training = module.training
        try:
            out = torch.func.functional_call(module.eval(), overrides, args, strict=False)
        finally:
            module.train(was_training)
        first = out[0] if isinstance(out, (tuple, list)) else out
        return first.logits if hasattr(first, "logits") else (out.logits if hasattr(out, "logits") else first)

    return forward


def _to_numpy_inputs(
    example_inputs: Mapping[str, Any] | Sequence[Any], names: Sequence[str] = ()
) -> dict[str, np.ndarray]:
    import torch

    items = example_inputs.items() if isinstance(example_inputs, Mapping) else zip(names, example_inputs)
    out = {}
    for name, value in items:
        out[name] = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    return out


def forward_input_names(module: Any, count: int, reserved: Sequence[str] = ()) -> list[str]:
    """Names for ``count`` positional inputs of ``module``: its ``forward`` parameters' names.

    A position whose name cannot be derived (``*args``, no signature, more inputs than
    parameters) or that would clash with a ``reserved`` name (outputs, ``labels``, the
    module's parameters) is called ``input_<position>``.

    Example:
        >>> import torch
        >>> class Net(torch.nn.Module):
        ...     def forward(self, x, mask, *rest):
        ...         return x
        >>> forward_input_names(Net(), 4)
        ['x', 'mask', 'input_2', 'input_3']
        >>> forward_input_names(torch.nn.Linear(2, 1), 1)
        ['input']
    """
    import inspect

    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError, AttributeError):  # builtins and some wrappers have no signature
        parameters = []
    positional = []
    for parameter in parameters:
        if parameter.kind not in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            break  # *args or keyword-only: later positions have no name of their own
        positional.append(parameter.name)
    taken = set(reserved) | {LABEL_INPUT}
    if hasattr(module, "named_parameters"):
        taken |= {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    names = []
    for index in range(count):
        name = positional[index] if index < len(positional) else ""
        names.append(name if name and name not in taken and name not in names else f"input_{index}")
    return names


def _default_dynamic_axes(inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    has_sequence = False
    for name, arr in inputs.items():
        axes[name] = {0: "batch"}
        if arr.ndim == 2 and arr.dtype.kind in "iu":  # token ids / masks: [batch, sequence]
            axes[name][1] = "sequence"
            has_sequence = True
    for name in output_names:
        axes[name] = {0: "batch"}
    if has_sequence:
        axes["__sequence_outputs__"] = {}
    return axes


@contextlib.contextmanager
def distinct_parameter_values(module: Any) -> Iterator[dict[str, np.ndarray]]:
    """Make every parameter numerically distinct during export.

    Why: both torch exporters merge initializers with identical values (zero-initialised
    biases), so names vanish and ORT's gradient builder fails with ``Duplicate definition
    of name (..._grad)`` (notes, pitfall 4). We add a distinct offset to each parameter,
    export, then write the true values back by name.

    Buffers are left alone: they never train, so a merged copy is harmless, while a
    perturbed one can come out under another name and keep its offset (Llama's rotary
    ``inv_freq`` becomes a ``Constant`` node, ``onnx::Expand_N``: a 1e-4 logit error that
    grows with the position).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> _ = [torch.nn.init.zeros_(layer.bias) for layer in net]   # equal values: the exporter would merge them
        >>> with distinct_parameter_values(net) as originals:
        ...     torch.equal(net[0].bias, net[1].bias)
        False
        >>> net[0].bias.tolist(), originals["1.bias"].tolist()                    # true values back afterwards
        ([0.0, 0.0], [0.0, 0.0])
    """
    import torch

    originals: dict[str, np.ndarray] = {}
    tensors = dict(module.named_parameters())
    with torch.no_grad():
        for index, (name, tensor) in enumerate(tensors.items()):
            originals[name] = tensor.detach().cpu().numpy().copy()
            tensor.add_(1e-3 * (index + 1) + 1e-6 * torch.arange(tensor.numel(), dtype=tensor.dtype).reshape(tensor.shape))
    try:
        yield originals
    finally:
        with torch.no_grad():
            for name, tensor in tensors.items():
                tensor.copy_(torch.from_numpy(originals[name]))


def restore_initializers(model: onnx.ModelProto, originals: dict[str, np.ndarray]) -> list[str]:
    """Write the true values back into initializers named after parameters; returns names not found.

    Example:
        >>> from onnx import helper
        >>> m = helper.make_model(helper.make_graph([], "g", [], [], [numpy_helper.from_array(np.full(2, 0.001, np.float32), "fc.bias")]))
        >>> restore_initializers(m, {"fc.bias": np.zeros(2, np.float32), "folded.bias": np.zeros(1, np.float32)})
        ['folded.bias']
        >>> numpy_helper.to_array(m.graph.initializer[0]).tolist()
        [0.0, 0.0]
    """
    seen = set()
    for init in model.graph.initializer:
        if init.name in originals:
            value = originals[init.name]
            if tuple(init.dims) != value.shape:
                raise ExportError(f"exported initializer {init.name} has shape {tuple(init.dims)}, parameter has {value.shape}")
            init.CopyFrom(numpy_helper.from_array(value.astype(numpy_helper.to_array(init).dtype), init.name))
            seen.add(init.name)
    return [n for n in originals if n not in seen]


def _check_no_leftover_perturbation(model: onnx.ModelProto, originals: dict[str, np.ndarray]) -> None:
    # An initializer that is not named after a parameter but holds perturbed values would
    # silently change the model; validation against torch catches it, but say why here.
    names = {i.name for i in model.graph.initializer}
    if not names & set(originals):
        raise ExportError(
            "the exported graph has no initializer named after a parameter; the exporter renamed or folded "
            "them. Export with do_constant_folding=False and the TorchScript exporter, or pass an .onnx file."
        )


def from_torch(
    module: Any,
    example_inputs: Mapping[str, Any] | Sequence[Any],
    *,
    output_names: list[str] | None = None,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    name: str = "torch-module",
    opset: int = OPSET,
) -> SourceGraph:
    """Export a ``torch.nn.Module`` to a forward ONNX graph (its first output is trained on).

    ``example_inputs`` is a dict (names, in the order of ``forward``'s parameters) or a
    tuple of tensors, whose inputs are named after ``forward``'s parameters
    (:func:`forward_input_names`). Batch is dynamic; integer 2-D inputs also get a dynamic
    sequence.

    Example:
        >>> import torch
        >>> src = from_torch(torch.nn.Linear(3, 2), (torch.randn(4, 3),))
        >>> [i.name for i in src.model.graph.input]         # Linear.forward(self, input)
        ['input']
    """
    import torch

    if not isinstance(module, torch.nn.Module):
        raise ExportError(f"expected a torch.nn.Module, got {type(module).__name__}")
    output_names = output_names or ["logits"]
    count = 0 if isinstance(example_inputs, Mapping) else len(example_inputs)
    inputs = _to_numpy_inputs(example_inputs, forward_input_names(module, count, reserved=output_names))
    if not inputs:
        raise ExportError("example_inputs is empty: pass one example batch (a dict or tuple of tensors)")
    was_training = module.training
    axes = dynamic_axes or _default_dynamic_axes(inputs, output_names)
    if "__sequence_outputs__" in axes:
        del axes["__sequence_outputs__"]
        with torch.no_grad():
            probe = module.eval()(*[torch.from_numpy(a) for a in inputs.values()])
        first = probe[0] if isinstance(probe, (tuple, list)) else probe
        seq_len = next(a.shape[1] for a in inputs.values() if a.ndim == 2 and a.dtype.kind in "iu")
        if getattr(first, "ndim", 0) == 3 and first.shape[1] == seq_len:
            axes[output_names[0]][1] = "sequence"
    module.eval()
    tensors = tuple(torch.from_numpy(a) for a in inputs.values())
    try:
        with tempfile.TemporaryDirectory() as tmp, distinct_parameter_values(module) as originals, traceable_masks():
            path = Path(tmp) / "model.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    torch.onnx.export(
                        module, tensors, str(path), dynamo=False, opset_version=opset, do_constant_folding=False,
                        export_params=True, input_names=list(inputs), output_names=output_names, dynamic_axes=axes,
                        training=torch.onnx.TrainingMode.EVAL,
                    )
                except Exception as err:  # tracer failures surface as bare RuntimeErrors ("unordered_map::at")
                    raise ExportError(
                        f"torch.onnx.export (TorchScript, opset {opset}) could not trace the module: {err}. Check that "
                        "forward runs on example_inputs, or pass a saved Hugging Face directory with hf_task= instead."
                    ) from err
            model = onnx.load(str(path))
    finally:
        module.train(was_training)
    _check_no_leftover_perturbation(model, originals)
    restore_initializers(model, originals)
    _keep_outputs(model, output_names[:1])

    def reference(feeds: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            out = module.eval()(*[torch.from_numpy(feeds[k]) for k in inputs])
        module.train(was_training)
        first = out[0] if isinstance(out, (tuple, list)) else out
        if hasattr(first, "logits"):
            first = first.logits
        return first.detach().cpu().numpy()

    return SourceGraph(
        model=model, kind="torch", name=name, example_inputs=inputs, reference=reference,
        param_names=[n for n, _ in module.named_parameters()], torch_logits=functional_logits(module, list(inputs)),
    )


@contextlib.contextmanager
def traceable_masks() -> Iterator[None]:
    """Build transformers' attention masks without ``torch.vmap`` while exporting.

    Why: transformers >= 4.53 builds causal masks with ``torch.vmap``, which the
    TorchScript tracer cannot trace (``RuntimeError: unordered_map::at``). optimum's
    exporter swaps in its vmap-free versions the same way; we do it for torch modules too.
    A no-op where transformers or optimum is missing.

    Example:
        >>> from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
        >>> with traceable_masks():
        ...     ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] is sdpa_mask
        False
        >>> ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] is sdpa_mask                 # restored on exit
        True
    """
    try:
        from optimum.exporters.onnx.model_patcher import eager_mask_without_vmap, sdpa_mask_without_vmap
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask
    except ImportError:
        yield
        return
    ALL_MASK_ATTENTION_FUNCTIONS.register("sdpa", sdpa_mask_without_vmap)
    ALL_MASK_ATTENTION_FUNCTIONS.register("eager", eager_mask_without_vmap)
    try:
        yield
    finally:
        ALL_MASK_ATTENTION_FUNCTIONS.register("sdpa", sdpa_mask)
        ALL_MASK_ATTENTION_FUNCTIONS.register("eager", eager_mask)


def _keep_outputs(model: onnx.ModelProto, names: list[str]) -> None:
    # generate_artifacts feeds *every* graph output to the loss block, so the forward graph
    # must expose exactly the output the loss reads.
    kept = [o for o in model.graph.output if o.name in names]
    if not kept:
        raise UnsupportedModelError(f"the graph has no output named {names}; outputs are {[o.name for o in model.graph.output]}")
    del model.graph.output[:]
    model.graph.output.extend(kept)


def check_external_data(model_path: Path) -> None:
    """Refuse an .onnx file whose external data would be read from outside its own directory.

    Every tensor is checked wherever it sits (initializers, ``Constant`` attributes, ``If`` /
    ``Loop`` bodies, sparse tensors, training info, functions): ``onnx.load`` reads the
    external data of all of them, and onnxruntime takes ORT's ``*/_ORT_MEM_ADDR_/*`` tag as a
    memory address. The walker is :mod:`bitfit.sdk.onnx_refs`, the one ``Bundle.open`` uses.

    Raises:
        UnsupportedModelError: a location is absolute, leaves the model's folder, is missing
            or is ORT's in-memory tag; the message names the tensor and where it sits.
        ExportError: the file cannot be read or is not a protobuf.

    Example:
        >>> import tempfile, pathlib
        >>> from onnx import TensorProto, helper
        >>> w = helper.make_tensor("w", TensorProto.FLOAT, [2], [0.0, 0.0])
        >>> w.data_location = TensorProto.EXTERNAL
        >>> _ = w.external_data.add(key="location", value="../secret.bin")
        >>> const = helper.make_node("Constant", [], ["y"], value=w)       # hidden in an attribute
        >>> g = helper.make_graph([const], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "m.onnx"
        >>> _ = path.write_bytes(helper.make_model(g).SerializeToString())
        >>> check_external_data(path)
        Traceback (most recent call last):
        ...
        bitfit.sdk.errors.UnsupportedModelError: tensor 'w' (graph.node[0].attribute[0].t[0]) stores its data at '../secret.bin', outside ...
    """
    try:
        refs = external_data_refs(model_path.read_bytes())
    except (BundleInvalidError, OSError) as err:
        raise ExportError(f"{model_path} is not a readable ONNX model ({err})") from err
    root = model_path.parent.resolve()
    for ref in refs:
        location = ref.location or ""
        inside = (bool(location) and "\0" not in location and "_ORT_MEM_ADDR_" not in location
                  and not Path(location).is_absolute() and root in (root / location).resolve().parents)
        if not inside:
            where = f"stores its data at {location!r}, outside {root}" if location else "is external data without a location"
            raise UnsupportedModelError(
                f"tensor {ref.tensor!r} ({ref.where}) {where}; refusing to read it. Keep external data files beside the model."
            )


def _synth_inputs(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    init_names = {i.name for i in model.graph.initializer}
    out = {}
    for inp in model.graph.input:
        if inp.name in init_names:
            continue
        tt = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (2 if i == 0 else 8) for i, d in enumerate(tt.shape.dim)]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if dtype.kind == "f":
            out[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif "mask" in inp.name:
            out[inp.name] = np.ones(shape, dtype)
        else:
            out[inp.name] = rng.integers(0, 8, size=shape).astype(dtype)
    return out


def from_onnx_file(
    path: str | Path,
    *,
    example_inputs: Mapping[str, np.ndarray] | None = None,
    output_name: str | None = None,
) -> SourceGraph:
    """Load an existing forward ``.onnx`` file whose weights are initializers.

    The reference is ONNX Runtime on the file as given; example inputs are synthesised
    from the input types when not passed (floats random, integers small, masks ones).

    Example:
        >>> src = from_onnx_file("model.onnx")                       # doctest: +SKIP
    """
    from bitfit.sdk.runtime import ort

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} does not exist: pass the path of a forward .onnx model")
    check_external_data(path)
    try:
        model = onnx.load(str(path))
    except Exception as err:  # onnx raises DecodeError and friends
        raise ExportError(f"{path} is not a readable ONNX model ({err})") from err
    if not model.graph.initializer:
        raise UnsupportedModelError(f"{path} has no initializers: bitfit needs the weights inside the graph (export with export_params=True)")
    feeds = {k: np.asarray(v) for k, v in (example_inputs or _synth_inputs(model)).items()}
    output = output_name or model.graph.output[0].name
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime's InvalidGraph / Fail / NotImplemented: the model, not the file
        raise UnsupportedModelError(
            f"onnxruntime {ort.__version__} cannot load {path} ({type(err).__name__}: {str(err).strip()[:300]}); bitfit "
            "runs and trains the model with onnxruntime: export it with standard ONNX ops at an opset this onnxruntime has"
        ) from err

    def reference(inputs: dict[str, np.ndarray]) -> np.ndarray:
        return session.run([output], inputs)[0]

    _keep_outputs(model, [output])
    return SourceGraph(model=model, kind="onnx", name=path.stem, example_inputs=feeds, reference=reference)


def _hf_param_names_and_reference(hf_model: Any, input_names: list[str]) -> tuple[list[str], Callable]:
    import torch

    def reference(feeds: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            out = hf_model(**{k: torch.from_numpy(v) for k, v in feeds.items() if k in input_names})
        first = out.logits if hasattr(out, "logits") else out[0]
        return first.numpy()

    return [n for n, _ in hf_model.named_parameters()], reference


def _hf_functional_logits(hf_model: Any, input_names: list[str]) -> Callable[[dict[str, Any], dict[str, np.ndarray]], Any]:
    import torch

    def forward(overrides: dict[str, Any], feeds: dict[str, np.ndarray]) -> Any:
        kwargs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items() if k in input_names}
        out = torch.func.functional_call(hf_model, overrides, (), kwargs, strict=False)
        return out.logits if hasattr(out, "logits") else out[0]

    return forward


def _grafted_head_logits(encoder: Callable, weight: np.ndarray) -> Callable[[dict[str, Any], dict[str, np.ndarray]], Any]:
    """The grafted mean-pool head in torch (``head.weight`` is ``[hidden, labels]``, as in the graph)."""
    import torch

    def forward(overrides: dict[str, Any], feeds: dict[str, np.ndarray]) -> Any:
        hidden = encoder({k: v for k, v in overrides.items() if not k.startswith("head.")}, feeds)
        mask = torch.from_numpy(feeds["attention_mask"]).unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        w = overrides.get("head.weight", torch.from_numpy(weight))
        b = overrides.get("head.bias", torch.zeros(weight.shape[1]))
        return pooled @ w + b

    return forward


def from_hf_dir(
    path: str | Path,
    task: HFTask,
    *,
    labels: list[str] | None = None,
    max_length: int = 128,
    head_seed: int = 0,
) -> SourceGraph:
    """Export a local Hugging Face model directory through optimum (``optimum-onnx``).

    ``text-classification`` and ``token-classification`` use the model's own head;
    ``feature-extraction`` grafts masked mean pooling and a new linear head over
    ``labels`` (seeded, std 0.02) onto the encoder graph.

    Example:
        >>> src = from_hf_dir("my-bert", "text-classification")      # doctest: +SKIP
    """
    import torch
    from optimum.exporters.onnx import onnx_export_from_model
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ExportError(f"{path} is not a Hugging Face model directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:  # transformers reports a bad or unknown config this way
        raise ExportError(f"transformers cannot read {path / 'config.json'} ({err}); save the model with save_pretrained") from err
    loader = {"text-classification": AutoModelForSequenceClassification, "token-classification": AutoModelForTokenClassification,
              "feature-extraction": AutoModel}.get(task)
    if loader is None:
        raise ExportError(f"unknown Hugging Face task {task!r}: use one of {', '.join(get_args(HFTask))}")
    kwargs: dict[str, Any] = {"local_files_only": True, "attn_implementation": "eager"}
    if task == "feature-extraction" and config.model_type == "bert":
        kwargs["add_pooling_layer"] = False
    try:
        hf_model = loader.from_pretrained(str(path), **kwargs).eval()
    except (OSError, ValueError) as err:  # no weights file, or weights that do not fit the config
        raise ExportError(
            f"transformers cannot load the {task} model in {path} ({str(err).strip()[:300]}); the directory needs the "
            "weights (model.safetensors) beside config.json, as save_pretrained writes them"
        ) from err
    with tempfile.TemporaryDirectory() as tmp, distinct_parameter_values(hf_model) as originals:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_export_from_model(hf_model, Path(tmp), opset=OPSET, do_constant_folding=False, no_post_process=True,
                                   do_validation=False, task=task)
        model = onnx.load(str(Path(tmp) / "model.onnx"))
    _check_no_leftover_perturbation(model, originals)
    restore_initializers(model, originals)
    input_names = [i.name for i in model.graph.input]
    rng = np.random.default_rng(0)
    seq = min(16, max_length)
    feeds: dict[str, np.ndarray] = {}
    for name in input_names:
        if name == "input_ids":
            feeds[name] = rng.integers(5, min(getattr(config, "vocab_size", 100), 1000), size=(2, seq)).astype(np.int64)
        elif name == "attention_mask":
            feeds[name] = np.ones((2, seq), np.int64)
            feeds[name][1, seq // 2:] = 0
        else:
            feeds[name] = np.zeros((2, seq), np.int64)
    param_names, reference = _hf_param_names_and_reference(hf_model, input_names)
    torch_logits = _hf_functional_logits(hf_model, input_names)
    tokenizer = path / "tokenizer.json"
    text = TextSpec(tokenizer="tokenizer.json", max_length=max_length,
                    attention_mask="attention_mask" if "attention_mask" in input_names else None,
                    token_type_ids="token_type_ids" if "token_type_ids" in input_names else None)
    head_weight = None
    if task == "feature-extraction":
        if not labels:
            raise ExportError("feature-extraction needs labels: bitfit adds a classification head over them")
        hidden = int(config.hidden_size)
        weight = (rng.standard_normal((hidden, len(labels))) * 0.02).astype(np.float32)
        graft_mean_pool_head(model, weight, np.zeros(len(labels), np.float32))
        head_weight = "head.weight"
        encoder_reference = reference

        def reference(feeds: dict[str, np.ndarray]) -> np.ndarray:  # noqa: F811 - the grafted head, in numpy
            hidden_states = encoder_reference(feeds)
            mask = feeds["attention_mask"][..., None].astype(np.float32)
            pooled = (hidden_states * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
            return pooled @ weight

        param_names = param_names + ["head.weight", "head.bias"]
        torch_logits = _grafted_head_logits(torch_logits, weight)
        task_kind: Task = "classification"
    elif task == "token-classification":
        task_kind = "token-classification"
        _keep_outputs(model, ["logits"])
    else:
        problem = getattr(config, "problem_type", None)
        task_kind = "regression" if problem == "regression" or config.num_labels == 1 else (
            "multilabel" if problem == "multi_label_classification" else "classification")
        _keep_outputs(model, ["logits"])
    if labels is None and task != "feature-extraction" and getattr(config, "id2label", None):
        labels = [str(config.id2label[i]) for i in range(len(config.id2label))]
    return SourceGraph(
        model=model, kind="hf", name=path.name, example_inputs=feeds, reference=reference, param_names=param_names,
        text=text if tokenizer.is_file() else None, tokenizer_file=tokenizer if tokenizer.is_file() else None,
        labels=labels, task=task_kind, head_weight=head_weight, torch_logits=torch_logits,
    )


def graft_mean_pool_head(model: onnx.ModelProto, weight: np.ndarray, bias: np.ndarray) -> None:
    """Append masked mean pooling over ``last_hidden_state`` and a linear head (``logits``).

    Example:
        >>> from onnx import helper
        >>> from bitfit.sdk.runtime import ort
        >>> g = helper.make_graph([helper.make_node("Identity", ["x"], ["last_hidden_state"])], "enc",
        ...     [helper.make_tensor_value_info("x", 1, ["batch", "sequence", 2]),
        ...      helper.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, ["batch", "sequence"])],
        ...     [helper.make_tensor_value_info("last_hidden_state", 1, ["batch", "sequence", 2])])
        >>> m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        >>> graft_mean_pool_head(m, np.eye(2, dtype=np.float32), np.zeros(2, np.float32))
        >>> x = np.array([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]], np.float32)
        >>> feeds = {"x": x, "attention_mask": np.array([[1, 1, 0]])}    # the padded token is left out
        >>> ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0].tolist()
        [[2.0, 3.0]]
    """
    from onnx import helper

    hidden = next((o.name for o in model.graph.output if o.name == "last_hidden_state"), model.graph.output[0].name)
    g = model.graph
    g.initializer.extend([
        numpy_helper.from_array(weight, "head.weight"), numpy_helper.from_array(bias, "head.bias"),
        numpy_helper.from_array(np.array([-1], np.int64), "pool.axes_last"),
        numpy_helper.from_array(np.array([1], np.int64), "pool.axes_seq"),
        numpy_helper.from_array(np.array(1e-9, np.float32), "pool.eps"),
    ])
    g.node.extend([
        helper.make_node("Cast", ["attention_mask"], ["pool.mask_f"], to=onnx.TensorProto.FLOAT, name="pool.cast"),
        helper.make_node("Unsqueeze", ["pool.mask_f", "pool.axes_last"], ["pool.mask3"], name="pool.unsqueeze"),
        helper.make_node("Mul", [hidden, "pool.mask3"], ["pool.masked"], name="pool.mul"),
        helper.make_node("ReduceSum", ["pool.masked", "pool.axes_seq"], ["pool.sum"], keepdims=0, name="pool.sum"),
        helper.make_node("ReduceSum", ["pool.mask3", "pool.axes_seq"], ["pool.count"], keepdims=0, name="pool.count"),
        helper.make_node("Max", ["pool.count", "pool.eps"], ["pool.count_safe"], name="pool.clip"),
        helper.make_node("Div", ["pool.sum", "pool.count_safe"], ["pool.mean"], name="pool.div"),
        helper.make_node("Gemm", ["pool.mean", "head.weight", "head.bias"], ["logits"], name="head.gemm"),
    ])
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", len(bias)]))


def copy_tokenizer(source: Path, bundle_dir: Path) -> str:
    """Copy ``tokenizer.json`` into the bundle (checked to load with ``tokenizers``).

    Example:
        >>> import tempfile
        >>> from tokenizers import Tokenizer, models
        >>> folder = Path(tempfile.mkdtemp())
        >>> Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]")).save(str(folder / "tok.json"))
        >>> (folder / "bundle").mkdir()
        >>> copy_tokenizer(folder / "tok.json", folder / "bundle")
        'tokenizer.json'
        >>> _ = (folder / "vocab.txt").write_text("hi")
        >>> copy_tokenizer(folder / "vocab.txt", folder / "bundle")
        Traceback (most recent call last):
        ...
        bitfit.sdk.errors.ExportError: .../vocab.txt is not a tokenizers-library tokenizer.json (...)
    """
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(source))
    except Exception as err:
        raise ExportError(f"{source} is not a tokenizers-library tokenizer.json ({err})") from err
    shutil.copyfile(source, bundle_dir / "tokenizer.json")
    return "tokenizer.json"
