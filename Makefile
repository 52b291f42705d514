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

# Label Studio, in a virtual environment of its own (its server pins its own dependencies), for the test
# that pushes a cycle to a real server and pulls its annotations back. An install that fails (no package
# index) leaves its reason in $(LS_VENV).failed, and that test skips saying so.
LS_VENV := .venv-labelstudio
LS_STAMP := $(LS_VENV)/.installed
LABEL_STUDIO := label-studio==1.23.2

.PHONY: demo test lint install labelstudio-server bench-train clean

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

test: $(STAMP) $(LS_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

labelstudio-server: $(LS_STAMP)

$(LS_STAMP):
	@rm -f $(LS_VENV).failed
	@echo "installing $(LABEL_STUDIO) into $(LS_VENV) (once; for the Label Studio round-trip test)"
	@{ test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV); } \
	  && $(LS_VENV)/bin/pip install --quiet "$(LABEL_STUDIO)" > $(LS_VENV).log 2>&1 && touch $@ \
	  || { tail -n 3 $(LS_VENV).log > $(LS_VENV).failed 2>/dev/null; \
	       echo "Label Studio could not be installed (see $(LS_VENV).log); its test will skip"; }

# ruff (format and lint) over the tree, mypy over segxal/ and orchestrator/ (pyproject.toml)
lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench-train: $(STAMP)
	$(PY) bench/train_camvid.py --root ../shared/data/camvid

clean:
	rm -rf runs mlflow.db mlartifacts mlruns data/synthetic $(LS_VENV) $(LS_VENV).log $(LS_VENV).failed
