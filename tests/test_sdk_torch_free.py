"""The device side runs without torch, transformers or onnx: checked in a subprocess where
importing any of them fails, as on a device that does not have them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from sdk_fixtures import *  # noqa: F401,F403  (fixtures and helpers)
from sdk_fixtures import PROBE_LABELS, PROBES, QUICK, numeric_data, text_data

BLOCKER = """
import sys

BLOCKED = {"torch", "transformers", "onnx", "optimum", "bitfit.export"}
attempts = []


class Blocker:
    # A meta-path finder ahead of every other one: importing a blocked package (or any
    # of its submodules) fails as if it were not installed.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED or any(name == b or name.startswith(b + ".") for b in BLOCKED):
            attempts.append(name)
            raise ImportError(f"{name} is not installed on this device (blocked by the test)")
        return None


sys.meta_path.insert(0, Blocker())
for name in list(sys.modules):
    assert name.split(".")[0] not in BLOCKED, name
"""

SCRIPT = """
import json, sys, tempfile
import numpy as np

import bitfit.sdk
from bitfit.sdk import Personalizer, Predictor
from bitfit.sdk.cli import main

args = json.loads(sys.argv[1])
store = tempfile.mkdtemp()
p = Personalizer(args["text_bundle"], store=store)
result = p.personalize(args["data"], user="alice", **args["options"])
labels = p.predict(args["probes"], user="alice").labels
base = p.predict(args["probes"]).labels
mixed = Predictor(args["text_bundle"], store).predict(args["probes"], user=["alice", None, "alice", None]).labels

q = Personalizer(args["numeric_bundle"], store=store)
features = np.array(args["features"], np.float32)
numeric = q.personalize({"features": features, "labels": np.array(args["labels"])}, user="n", max_steps=3,
                        progress_bar=False)
numeric_labels = q.predict({"features": features[:3]}, user="n").labels

code = main(["deltas", store, "list"])
code += main(["predict", args["text_bundle"], "--user", "alice", "--store", store, args["probes"][0]])
leaked = sorted(m for m in sys.modules
                if m.split(".")[0] in ("torch", "transformers", "onnx", "optimum") or m.startswith("bitfit.export"))
print("RESULT " + json.dumps({
    "version": result.version, "steps": result.steps, "labels": labels, "base": base, "mixed": mixed,
    "numeric_steps": numeric.steps, "numeric_labels": numeric_labels, "cli": code, "leaked": leaked,
    "attempts": attempts, "onnxruntime": sys.modules["onnxruntime"].__version__,
}))
"""


def test_personalize_and_predict_without_torch(text_bundle, numeric_bundle):
    features, labels = numeric_data(12)
    args = {
        "text_bundle": str(text_bundle), "numeric_bundle": str(numeric_bundle), "data": text_data(32),
        "options": QUICK, "probes": PROBES, "features": features.tolist(), "labels": labels.tolist(),
    }
    code = textwrap.dedent(BLOCKER) + textwrap.dedent(SCRIPT)
    done = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["leaked"] == []
    assert result["onnxruntime"] == "1.19.2"
    assert result["version"] == 1 and result["steps"] > 0
    assert result["labels"] == PROBE_LABELS and result["base"] == ["neg"] * 4
    assert result["mixed"] == ["pos", "neg", "pos", "neg"]
    assert result["numeric_steps"] == 3 and len(result["numeric_labels"]) == 3
    assert result["cli"] == 0 and "alice\tcurrent v1" in done.stdout
    # Nothing even tried: onnxruntime's ORTModule probe (which imports torch) is bypassed.
    assert result["attempts"] == []
