"""Side-by-side benchmarks of bitfit against plain PyTorch, written to ``BENCHMARKS.md``.

Run ``python -m benchmarks.run`` (``make bench``) for the full report, or
``python -m benchmarks.run --quick`` (``make bench-quick``) for a spot check of a few
minutes. Every number in the report is measured by that one command, side by side in one
run, as medians over repeats.

One module per measurement; each exposes a function that takes a
:class:`benchmarks.workspace.Workspace` (a model, its bundle and data) and returns plain
dicts, so the test suite can run every one of them on a tiny model:

- ``step_time``: train step of both SDK training backends (portable, ort-training) vs
  their own forward pass and PyTorch BitFit / full fine-tuning / head-only.
- ``memory``: peak RSS of each method, each in its own subprocess (also the worker).
- ``personalization``: wall time of ``Personalizer.personalize`` with each backend.
- ``inference``: plain ONNX vs the SDK with a user's delta, user switch, per-row batches.
- ``device_worker``: the torch-free worker process run by the device venv's Python (the
  newest plain onnxruntime) that repeats the portable step, forward and inference
  measurements there, interleaved with the main process's.
- ``deltas``: delta size and kept accuracy per encoding, bundle size.
- ``quality_sizes``: holdout accuracy per "user" (tweet domain) for every method and number
  of examples (``make bench``'s quality section).
- ``quality`` (``python -m benchmarks.quality``, ``make quality``; its own section of
  ``BENCHMARKS.md``): the SDK's defaults against PyTorch baselines tuned on tuning users,
  judged on held-aside users, on tweets, SMS and a numeric (non-text) bundle; the users and
  base models are ``quality_users``.
- ``diagnostics`` / ``profiles``: ORT profiles (per op type, both backends) and
  optimized-graph op counts that explain the numbers.
- ``report`` / ``plots``: targets, ``BENCHMARKS.md`` and the PNG plots.
- ``workspace`` (model, bundle, data), ``torch_recipes`` (the PyTorch baselines),
  ``batches``, ``sessions``, ``timing`` and ``environment``: what the measurements share.

This package imports nothing at import time: the memory worker and the device worker must
be able to run the SDK in a process where torch cannot be imported (``batches``,
``timing``, ``sessions``, ``profiles``, ``inference`` and ``device_worker`` never import it).
"""
