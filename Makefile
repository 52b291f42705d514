# `make demo` and `make test` do all the set-up: a .venv with the project installed.
# On a machine without an NVIDIA driver, torch is the CPU build (torch==2.13.0).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# tracking.experiment of jobs/configs/demo.yaml, compared at the end of `make demo`
DEMO_EXPERIMENT := segxal-demo
# one name per `make demo`: its EEM run and its random baseline are <name>-eem and <name>-random
DEMO_NAME := demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test lint install bench-train clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	command -v nvidia-smi >/dev/null 2>&1 || $(PY) -m pip install --quiet torch==2.13.0 -c constraints.txt
	$(PY) -m pip install --quiet -e ".[dev]" -c constraints.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m jobs.al --config jobs/configs/demo.yaml --set name=$(DEMO_NAME)-eem
	$(PY) -m jobs.al --config jobs/configs/demo.yaml --set name=$(DEMO_NAME)-random --set al.strategy=random
	$(PY) -m jobs.compare --experiment $(DEMO_EXPERIMENT) --filter "params.name LIKE '$(DEMO_NAME)-%'"

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# ruff (format and lint) over the tree, mypy over segxal/ and orchestrator/ (pyproject.toml)
lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench-train: $(STAMP)
	$(PY) bench/train_camvid.py --root ../shared/data/camvid

clean:
	rm -rf runs mlflow.db mlartifacts mlruns data/synthetic
