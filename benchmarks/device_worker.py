"""The device side of the benchmarks: a long-lived worker process run by the device venv's
Python (``.venv-device``: the newest plain onnxruntime, no torch), driven by the main
benchmark process over stdin/stdout, one JSON object per line.

The main venv's onnxruntime is the 1.19.2 *training* build (the ort-training backend needs
it); the portable backend is for any onnxruntime, so its numbers on the newest release are
measured here. The worker imports only ``bitfit.sdk``, numpy and torch-free parts of
``benchmarks`` (it blocks ``import torch`` to prove it), builds its sessions once and times
single calls *inside* its own process, so the main process can interleave them with its
own measurements (``benchmarks.timing.interleaved(..., self_timed=...)``): the round trip
is never counted, and a ratio to a torch step measured in the main process compares calls
made seconds apart on the same machine.

Commands (``{"cmd": ..., ...}``): ``info``; ``shape`` (batch, seq, seed: the batch of the
following ``time`` calls); ``time`` (method ``portable`` = the SDK's portable
``train_step``, or ``forward`` = one run of the bundle's inference model); ``inference``
(``benchmarks.inference`` latency and per-row on this onnxruntime); ``profile``
(``benchmarks.profiles.profile_portable_step``); ``quit``.

Example:
    >>> from benchmarks.device_worker import device_python
    >>> device_python() is None or device_python().name.startswith("python")
    True
    >>> with DeviceWorker(python, bundle_dir, threads=2, log=log_path) as worker:  # doctest: +SKIP
    ...     worker.call("info")["onnxruntime"]
    '1.32.0'
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEVICE_VENV = REPO_ROOT / ".venv-device"
_MARK = "@@bench "  # response lines start with it: anything else a library prints is skipped


def device_python() -> Path | None:
    """The device venv's Python (``$BITFIT_DEVICE_PYTHON``, else ``.venv-device/bin/python``)
    when it exists and its onnxruntime imports; None otherwise."""
    override = os.environ.get("BITFIT_DEVICE_PYTHON")
    path = Path(override) if override else DEVICE_VENV / "bin" / "python"
    if not path.exists():
        return None
    try:
        ok = subprocess.run([str(path), "-c", "import onnxruntime"], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return None
    return path if ok else None


class DeviceWorker:
    """Client of one worker process; ``call`` sends a command and returns its result.

    Raises RuntimeError (with the worker's traceback) when a command fails or the worker died.
    """

    def __init__(self, python: str | os.PathLike, bundle: str | os.PathLike, *, threads: int,
                 log: str | os.PathLike, timeout: float = 900) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.log_path = Path(log)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.timeout = timeout
        self.proc = subprocess.Popen(
            [str(python), "-m", "benchmarks.device_worker", "--bundle", str(bundle), "--threads", str(threads)],
            cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
            bufsize=1)
        self.info = self.call("info")

    def call(self, cmd: str, **args: Any) -> Any:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the device worker exited ({self.proc.returncode}); see {self.log_path}")
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the device worker died during {cmd!r} ({self.proc.wait()}); see {self.log_path}: "
                                   + self.log_path.read_text(encoding="utf-8", errors="replace")[-2000:])
            if line.startswith(_MARK):
                reply = json.loads(line[len(_MARK):])
                if "error" in reply:
                    raise RuntimeError(f"device worker {cmd!r} failed: {reply['error']}")
                return reply["result"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("quit")
            except RuntimeError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()

    def __enter__(self) -> "DeviceWorker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the worker side (runs in the device venv) -------------------------------------------

@dataclass
class DeviceSide:
    """What ``benchmarks.inference`` needs of a workspace, without torch."""

    bundle: Any
    threads: int
    plain_onnx: Path | None = None
    work_dir: Path | None = None
    vocab_size: int = 30522
    classes: int = 3
    sessions: dict[str, Any] = field(default_factory=dict)
    batch: tuple[dict[str, Any], Any] | None = None

    def random_batch(self, batch: int, seq: int, seed: int = 0) -> tuple[dict[str, Any], Any]:
        from .batches import random_batch

        return random_batch(batch, seq, vocab_size=self.vocab_size, classes=self.classes, seed=seed)

    def step_sessions(self) -> dict[str, Any]:
        """The SDK's portable training session and the inference model's session (built once)."""
        if not self.sessions:
            from bitfit.sdk.runtime import ort
            from bitfit.sdk.trainer import open_training_session

            from .sessions import session_options

            self.sessions["portable"] = open_training_session(self.bundle, backend="portable", threads=self.threads,
                                                              learning_rate=1e-6)
            self.sessions["forward"] = ort.InferenceSession(str(self.bundle.file("inference_model")),
                                                            session_options(self.threads), providers=["CPUExecutionProvider"])
        return self.sessions


def _handle(side: DeviceSide, request: dict[str, Any]) -> Any:
    cmd = request["cmd"]
    if cmd == "info":
        import platform

        import numpy as np

        from bitfit.sdk.runtime import has_training_api, ort

        return {"onnxruntime": ort.__version__, "python": platform.python_version(), "numpy": np.__version__,
                "training_api": has_training_api(), "torch_imported": "torch" in sys.modules,
                "executable": sys.executable}
    if cmd == "shape":
        side.vocab_size, side.classes = int(request["vocab"]), int(request["classes"])
        side.batch = side.random_batch(int(request["batch"]), int(request["seq"]), seed=int(request["seed"]))
        side.step_sessions()
        return None
    if cmd == "time":
        assert side.batch is not None, "send 'shape' first"
        feeds, labels = side.batch
        sessions = side.step_sessions()
        started = time.perf_counter()
        if request["method"] == "portable":
            sessions["portable"].train_step(feeds, labels)
        elif request["method"] == "forward":
            sessions["forward"].run(None, feeds)
        else:
            raise ValueError(f"unknown method {request['method']!r}")
        return time.perf_counter() - started
    if cmd == "inference":
        from . import inference

        side.vocab_size, side.classes = int(request["vocab"]), int(request["classes"])
        side.plain_onnx = Path(request["plain"])
        store = Path(request["store"])
        users = list(request["users"])
        repeats = {int(k): int(v) for k, v in request["repeats"].items()}
        batches = tuple(request["batches"])
        overridable = Path(request["overridable"]) if request.get("overridable") else None
        return {
            "seq": request["seq"],
            "latency": inference.latency(side, store, levels=tuple(request["levels"]), batches=batches,
                                         seq=request["seq"], repeats=repeats, plain_overridable=overridable),
            "per_row": inference.per_row(side, store, users, batch=max(batches), seq=request["seq"],
                                         repeats=int(request["per_row_repeats"])),
        }
    if cmd == "profile":
        from .profiles import profile_portable_step

        side.vocab_size, side.classes = int(request["vocab"]), int(request["classes"])
        feeds, labels = side.random_batch(int(request["batch"]), int(request["seq"]), seed=11)
        return profile_portable_step(side.bundle.path, feeds, labels, threads=side.threads, out_dir=request["out_dir"],
                                     steps=int(request.get("steps", 3)))
    if cmd == "profile_inference":
        from .profiles import profile_runs, profiled_session

        side.vocab_size, side.classes = int(request["vocab"]), int(request["classes"])
        feeds, _ = side.random_batch(int(request["batch"]), int(request["seq"]), seed=13)
        out = Path(request["out_dir"])
        tag = f"{request['batch']}x{request['seq']}-{time.time_ns()}"
        user = {k: v.reshape(t.inference_shape) for t in side.bundle.manifest.trainable
                for k, v in [(t.name, side.bundle.trainable_base()[t.name] + 0.01)]}
        result = {"batch": request["batch"], "seq": request["seq"], "level": request.get("level", "all")}
        for name, path, fed in (("plain", request["plain"], {}),
                                ("plain-overridable+fed", request.get("overridable"), "1d"),
                                ("sdk-user", str(side.bundle.file("inference_model")), user)):
            if not path:
                continue
            if fed == "1d":
                fed = {k: (v + 0.01).astype("float32") for k, v in side.bundle.trainable_base().items()}
            session = profiled_session(path, side.threads, out / f"infer-{name}-{tag}", request.get("level", "all"))
            result[name] = profile_runs(session, {**feeds, **fed}, int(request.get("runs", 5)),
                                        classify=lambda n, o: "forward")
        return result
    raise ValueError(f"unknown command {cmd!r}")


def serve(bundle_dir: str, threads: int) -> None:
    """Answer commands from stdin until ``quit`` or end of input."""
    from .environment import block_torch

    block_torch()
    from bitfit.sdk.bundle import Bundle

    side = DeviceSide(Bundle.open(bundle_dir, verify="none"), threads)
    out = sys.stdout
    sys.stdout = sys.stderr  # anything printed by a library goes to the log, not the protocol
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if request.get("cmd") == "quit":
            out.write(_MARK + json.dumps({"result": None}) + "\n")
            out.flush()
            return
        try:
            reply = {"result": _handle(side, request)}
        except Exception as err:  # the client raises it with this traceback
            reply = {"error": f"{type(err).__name__}: {err}\n{traceback.format_exc()[-3000:]}"}
        out.write(_MARK + json.dumps(reply, default=_jsonable) + "\n")
        out.flush()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.device_worker", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    serve(args.bundle, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
