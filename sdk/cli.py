"""The ``bitfit`` command.

    bitfit export MODEL OUT [--labels a,b,c] [--policy all-biases] [--hf-task T] ...   (workstation)
    bitfit personalize BUNDLE --user U --data FILE [--store DIR] [--key-file F] [--providers cpu|cuda|auto]
                       [--epochs N] [--learning-rate LR] [--patience N|off] [--backend auto|portable|ort-training] ...
    bitfit predict BUNDLE [--user U] [--store DIR] [--key-file F] [--providers P] TEXT...
    bitfit deltas STORE ACTION ...   list | show | rollback | rm | inspect | compare | combine | to-torch | to-hf | to-peft | import
    bitfit info BUNDLE

``export`` imports ``bitfit.export`` (torch) lazily; the device commands never do. The demo story
lives beside the library: ``make demo`` (``python -m demo`` in a source checkout).
The options have the names and defaults of the Python API (``bitfit.sdk.options``): ``--store``
omitted is the platform's data directory for personalize and predict alike, ``--providers``
is ``cpu`` unless asked, ``--learning-rate`` omitted is the bundle's. ``--key-file`` names a
file whose bytes are the store's AES key (16, 24 or 32 bytes, e.g. ``head -c 32 /dev/urandom``).

Example:
    >>> from bitfit.sdk.cli import main
    >>> main(["--help"])                                   # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, get_args

from . import cli_deltas, cli_federate
from .bundle import OptimizerName
from .errors import BitfitError, InvalidArgumentError
from .options import key_from_file


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitfit", description="On-device personalization with bias-only fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)

    ex = sub.add_parser("export", help="export a model to a bundle (workstation; needs the 'export' extra)")
    ex.add_argument("model", help="'minilm', a Hugging Face model directory, or an .onnx file")
    ex.add_argument("out", help="bundle directory to write")
    ex.add_argument("--labels", help="comma-separated label names")
    ex.add_argument("--policy", default="all-biases", help="all-biases | paper-subset | ...+head")
    ex.add_argument("--include", action="append", default=[], help="regex of extra trainable tensors (repeatable)")
    ex.add_argument("--exclude", action="append", default=[], help="regex of tensors to keep frozen (repeatable)")
    ex.add_argument("--task", help="classification | regression | multilabel | token-classification | causal-lm")
    ex.add_argument("--hf-task", help="text-classification | token-classification | feature-extraction")
    ex.add_argument("--loss", help="cross-entropy | mse | bce-with-logits | token-cross-entropy")
    ex.add_argument("--optimizer", default="adamw", choices=list(get_args(OptimizerName)))
    ex.add_argument("--max-length", type=int, default=128)
    ex.add_argument("--ort-format", action="store_true", help="also write ORT-format artifacts for mobile runtimes")
    ex.add_argument("--ort-training", default="auto", choices=["auto", "required", "never"],  # export.pipeline.OrtTrainingArtifacts
                    help="onnxruntime-training 1.19.2 artifacts beside the portable model: where installed (auto), "
                         "demanded (required), or not (never)")
    ex.add_argument("--add-biases",
                    help="linear | norms | all | REGEX: add zero-initialised trainable biases where a bias-free model "
                         "has none (docs/deltas.md)")
    ex.add_argument("--learning-rate", type=float,
                    help="the bundle's default peak learning rate for personalize (default: chosen by model size)")
    ex.add_argument("--overwrite", action="store_true")

    pe = sub.add_parser("personalize", help="train a user's biases on their examples and save a delta")
    pe.add_argument("bundle")
    pe.add_argument("--user", required=True)
    pe.add_argument("--data", required=True, help=".jsonl or .csv with text and label (text only for a causal LM; .txt too)")
    _add_store_options(pe)
    _add_runtime_options(pe)
    pe.add_argument("--epochs", type=int, help="default: the SDK's step budget (5 epochs, 30 to 400 steps)")
    pe.add_argument("--learning-rate", type=float,
                    help="peak learning rate; default: the bundle's training_defaults.learning_rate (2e-3 for bundles "
                         "without one)")
    pe.add_argument("--schedule", default="warmup-linear", choices=["warmup-linear", "constant"])
    pe.add_argument("--patience", type=_patience, default=None,
                    help="stop after N holdout checks without improvement; default off (the best checkpoint is kept)")
    pe.add_argument("--batch-size", type=int, help="default 16 (or all examples when fewer)")
    pe.add_argument("--holdout", type=float, help="fraction held out; default ~10%% (none below 20 examples)")
    pe.add_argument("--max-steps", type=int)
    pe.add_argument("--max-seconds", type=float)
    pe.add_argument("--seed", type=int, default=0)
    pe.add_argument("--encoding", default="fp16", choices=["fp32", "fp16", "int8"])
    pe.add_argument("--device", choices=["cpu", "cuda"], help=argparse.SUPPRESS)  # deprecated: --providers
    pe.add_argument("--backend", default="auto", choices=["auto", "portable", "ort-training"],
                    help="training backend: portable (plain onnxruntime) or ort-training (onnxruntime-training "
                         "1.19.2); auto takes portable where the bundle has it")
    pe.add_argument("--reset", action="store_true", help="start from the base instead of the user's current delta")

    pr = sub.add_parser("predict", help="predict with the base model or a user's delta")
    pr.add_argument("bundle")
    pr.add_argument("texts", nargs="+")
    pr.add_argument("--user")
    _add_store_options(pr)
    _add_runtime_options(pr)
    pr.add_argument("--json", action="store_true", help="print JSON lines with probabilities")

    cli_deltas.add_parser(sub)
    cli_federate.add_parser(sub)

    info = sub.add_parser("info", help="show a bundle's manifest summary")
    info.add_argument("bundle")

    return parser


def _add_store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", help="delta store directory (default: the platform's data directory)")
    parser.add_argument("--key-file", help="file holding the store's AES key (16, 24 or 32 bytes) for encrypted deltas")


def _add_runtime_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--providers", default="cpu",
                        help="where it runs: cpu (default), cuda, auto (CUDA where available), or comma-separated "
                             "execution provider names")
    parser.add_argument("--threads", type=int,
                        help="onnxruntime intra-op threads (0: its default, one per core; default: its default, "
                             "except one for training a model under 1 M values)")
    parser.add_argument("--verify", default="hashes", choices=["hashes", "sizes", "none"],
                        help="how the bundle's files are checked on opening (default: hashes)")


def _patience(text: str) -> int | None:
    if text == "off":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or 'off', got {text!r}") from None


def _providers(args: argparse.Namespace) -> Any:
    device = getattr(args, "device", None)
    if device is not None:
        print(f"bitfit: warning: --device is deprecated: use --providers {device}", file=sys.stderr)
        if args.providers not in ("cpu", device):
            raise InvalidArgumentError(f"--device {device} and --providers {args.providers} disagree: pass --providers alone")
        return device
    value = args.providers
    return [name.strip() for name in value.split(",") if name.strip()] if "," in value else value


def _key(args: argparse.Namespace) -> bytes | None:
    return key_from_file(args.key_file) if getattr(args, "key_file", None) else None


def main(argv: list[str] | None = None) -> int:
    """Run the ``bitfit`` command with ``argv`` (default: the process arguments); the exit status
    (0 done, 2 a BitfitError, printed as ``bitfit: error: <type>: <what to do>``).

    Example:
        >>> main(["info", "/no/such/bundle"])                                # doctest: +SKIP
        bitfit: error: BundleInvalidError: /no/such/bundle has no manifest.json ...
        2
    """
    args = _parser().parse_args(argv)
    # The command prints the library's warnings itself (result.warnings): no second copy from
    # logging's last-resort handler when the caller configured no logging.
    logging.getLogger("bitfit").addHandler(logging.NullHandler())
    try:
        return _COMMANDS[args.command](args)
    except BitfitError as err:
        print(f"bitfit: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


def _export(args: argparse.Namespace) -> int:
    from bitfit.export import export_bundle

    bundle = export_bundle(
        args.model, args.out, labels=args.labels.split(",") if args.labels else None, policy=args.policy,
        include=args.include or None, exclude=args.exclude or None, task=args.task, hf_task=args.hf_task,
        loss=args.loss, optimizer=args.optimizer, max_length=args.max_length, ort_format=args.ort_format,
        ort_training=args.ort_training, add_biases=args.add_biases, learning_rate=args.learning_rate,
        overwrite=args.overwrite, verbose=True,
    )
    _print_info(bundle)
    return 0


def _print_info(bundle: Any) -> None:
    m = bundle.manifest
    print(f"bundle {bundle.path}")
    print(f"  task {m.task}, loss {m.loss}, optimizer {m.optimizer}, labels {m.labels}")
    print(f"  trainable: {len(m.trainable)} tensors, {m.policy['trainable_values']:,} of {m.policy['total_values']:,} "
          f"values ({100 * m.policy['fraction']:.3f}%), policy {m.policy['name']}, per-row {m.per_row}")
    print(f"  base fingerprint {m.base_fingerprint[:23]}..., format {m.format_version}")
    for backend in ("portable", "ort-training"):
        print(f"  training backend {backend}: " + ("yes" if m.backend_available(backend) else f"no ({m.backend_reason(backend)})"))
    v = m.validation
    if v:
        print(f"  validated: inference vs source {v.get('inference_vs_source_max_abs_diff', float('nan')):.2e}")
        portable = v.get("portable")
        if isinstance(portable, dict):
            print(f"  portable gradients vs {portable.get('gradient_reference')}: worst error "
                  f"{portable.get('worst_gradient_error_relative', float('nan')):.2e} of the largest gradient")
        if "one_step_frozen_unchanged" in v:
            print(f"  ort-training: frozen tensors unchanged by a step: {v.get('one_step_frozen_unchanged')}")


def _info(args: argparse.Namespace) -> int:
    from .bundle import Bundle

    _print_info(Bundle.open(args.bundle))
    return 0


def _personalize(args: argparse.Namespace) -> int:
    from .personalizer import Personalizer
    from .bundle import Bundle

    bundle = Bundle.open(args.bundle, verify=args.verify)
    if bundle.manifest.text is None:
        raise InvalidArgumentError(
            f"{args.bundle} takes numeric inputs, which a data file cannot carry: use the Python API, "
            "Personalizer(bundle).personalize((features, labels), user=...)"
        )
    p = Personalizer(bundle, args.store, providers=_providers(args), threads=args.threads, backend=args.backend,
                     key=_key(args), verify=args.verify)
    r = p.personalize(
        args.data, user=args.user, epochs=args.epochs, learning_rate=args.learning_rate, batch_size=args.batch_size,
        holdout=args.holdout, schedule=args.schedule, max_steps=args.max_steps, max_seconds=args.max_seconds,
        seed=args.seed, encoding=args.encoding, reset=args.reset, patience=args.patience,
    )
    saved = (f"version {r.version}, {r.delta_bytes:,} bytes ({r.encoding})" if r.saved else
             f"nothing saved (no checkpoint beat the start on the holdout); current version {r.version or 'none (base)'}")
    print(f"user {r.user}: {saved}, {r.steps} steps in {r.seconds:.1f}s on {r.examples_used} examples "
          f"(stopped by {r.stopped_by}, backend {r.backend}, learning rate {r.learning_rate:g}"
          f"{', retried at a lower rate' if r.retried else ''})")
    if r.metrics_before:
        from .metrics import primary_metric

        lead = primary_metric(p.bundle.manifest.task)
        shown = list(dict.fromkeys([lead, "loss", *(k for k in r.metrics_before if not k.startswith("f1/") and k != "tokens")]))
        shown = [k for k in shown if k in r.metrics_before][:4]
        print(f"  holdout ({r.holdout_examples}): " + ", ".join(
            f"{k} {r.metrics_before[k]:.3f} -> {r.metrics_after.get(k, float('nan')):.3f}" for k in shown))
    for text in r.warnings:
        print(f"bitfit: warning: {text}", file=sys.stderr)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .predictor import Predictor

    predictor = Predictor(args.bundle, args.store, providers=_providers(args), threads=args.threads, key=_key(args),
                          verify=args.verify)
    result = predictor.predict(args.texts, user=args.user)
    for text, label, probs in zip(args.texts, result.labels, result.probabilities):
        if args.json:
            print(json.dumps({"text": text, "label": label, "probabilities": [round(float(x), 5) for x in probs.ravel()]}))
        elif probs.ndim >= 2:  # one output per token: the label of each token
            print(f"{json.dumps(label)}\t{text}")
        elif isinstance(label, list):  # multi-label: every label above p = 0.5
            print(f"{','.join(map(str, label)) or '-'}\t{text}")
        else:
            print(f"{label}\t{float(probs.max()):.3f}\t{text}")
    for user, why in result.fallbacks.items():
        print(f"bitfit: warning: served the base model to {user!r}: {why}", file=sys.stderr)
    return 0


_COMMANDS = {"export": _export, "personalize": _personalize, "predict": _predict, "deltas": cli_deltas.run,
             "federate": cli_federate.run, "info": _info}

if __name__ == "__main__":
    sys.exit(main())
