"""Export the tiny bundles the device suite trains on (workstation side: runs in ``.venv``).

The models are the test suite's and the device examples' own, imported rather than copied:

- ``text/``: ``tests/sdk_fixtures.py``'s 2-layer BERT classifier over a ``tokenizers``
  WordLevel tokenizer, labels ``neg, pos``, policy ``all-biases`` (per-row users). Its base
  says "neg" for every 5-word sentence, so learning ``text_data`` is plainly visible.
- ``numeric/``: ``tests/sdk_fixtures.py``'s MLP over ``features: float32 [batch, 8]``,
  labels ``a, b, c``.
- ``tiny-text/``, ``tiny-mlp/``: ``device_examples/make_tiny_bundles.py``'s embedding +
  LayerNorm classifier over the built-in messages (3 sentiment labels, a normalizing
  tokenizer) and its MLP over ``x: [batch, 8]``, both trained on the *general* rule of
  ``device_examples/example_data.py``, so a user's habit is something to learn.

Every bundle must carry the portable training model (plain onnxruntime); the script fails
otherwise. It writes ``bundles.json`` (name -> directory, and what exported them) last, so
a folder without it is incomplete.

Usage:
    python device_tests/make_bundles.py OUT        # e.g. build/device-bundles (replaced)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "device_examples")]

import sdk_fixtures  # noqa: E402  (the test suite's tiny models and data)
from make_tiny_bundles import make_numeric_bundle, make_text_bundle  # noqa: E402  (the device examples' tiny text model)


def export_text(out: Path) -> Path:
    from bitfit.export import export_bundle

    tokenizer = sdk_fixtures.build_tokenizer(out.parent / "text-tokenizer.json")
    model, example = sdk_fixtures.build_text_model()
    export_bundle(model, out, example_inputs=example, labels=sdk_fixtures.TEXT_LABELS, tokenizer=tokenizer,
                  policy="all-biases", max_length=sdk_fixtures.MAX_LENGTH, verbose=False)
    tokenizer.unlink()
    return out


def export_numeric(out: Path) -> Path:
    from bitfit.export import export_bundle

    model, example = sdk_fixtures.build_numeric_model()
    export_bundle(model, out, example_inputs=example, labels=sdk_fixtures.NUMERIC_LABELS, verbose=False)
    return out


def export_tiny_text(out: Path) -> Path:
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its base accuracy
        return make_text_bundle(out.parent)  # writes out.parent / "tiny-text"


def export_tiny_mlp(out: Path) -> Path:
    with contextlib.redirect_stdout(io.StringIO()):
        return make_numeric_bundle(out.parent, "mlp")  # writes out.parent / "tiny-mlp"


EXPORTS = {"text": export_text, "numeric": export_numeric, "tiny-text": export_tiny_text, "tiny-mlp": export_tiny_mlp}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory to (re)write the bundles into")
    args = parser.parse_args(argv)
    import onnxruntime
    import torch

    from bitfit.sdk.bundle import Bundle

    torch.set_num_threads(1)  # tiny matrices: more threads only add synchronisation
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    index = {}
    for name, export in EXPORTS.items():
        started = time.perf_counter()
        path = export(args.out / name)
        assert path == args.out / name, (path, name)
        manifest = Bundle.open(path).manifest
        if not manifest.backend_available("portable"):
            raise SystemExit(f"make_bundles: {name} has no portable training model: {manifest.backend_reason('portable')}")
        index[name] = path.name
        print(f"make_bundles: {path} ({len(manifest.trainable)} trainable tensors, backends "
              f"{[b for b in manifest.training_backends if manifest.backend_available(b)]}) in {time.perf_counter() - started:.1f} s")
    (args.out / "bundles.json").write_text(json.dumps({
        "bundles": index, "exported_with": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
    }, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
