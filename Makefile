# Two commands do all set-up on a fresh machine:
#   make demo   # builds .venv, then runs the offline distillation demo (`trl-distill demo`)
#   make test   # builds .venv, then runs the test-suite (what CI runs, via .ci/run)
# On a machine with a GPU, install your CUDA build of torch first, or override: make test TORCH_SPEC="torch"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/trl-distill demo

# The lint and format gate first (configured in pyproject.toml), then the suite.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) benchmarks/loss_memory.py

clean:
	rm -rf $(VENV) runs
