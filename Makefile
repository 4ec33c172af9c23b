# merge-cli: every target sets itself up in a project-local virtual environment (.venv).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
JOBS ?= auto

.PHONY: install demo test lint format bench parity clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# A bare 'torch' requirement would pull several GB of CUDA wheels: take the local CPU build first.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e ".[test]"
	# byte-compile the package as a non-editable install would (where PYTHONDONTWRITEBYTECODE is set, every
	# process would otherwise compile it again: ~0.3 s per command)
	$(BIN)/python -m compileall -q merge_cli
	touch $(STAMP)

demo: install
	$(BIN)/python -m merge_cli.demo

test: install
	$(BIN)/python -m pytest -q -n $(JOBS) -p no:cacheprovider

lint: install
	$(BIN)/ruff check merge_cli tests benchmarks
	$(BIN)/ruff format --check merge_cli tests benchmarks

format: install
	$(BIN)/ruff format merge_cli tests benchmarks
	$(BIN)/ruff check --fix merge_cli tests benchmarks

bench: install
	$(BIN)/python benchmarks/run.py

# merge-cli vs mergekit 0.1.5 on the same recipes (installs mergekit into .venv-mergekit/); not part of `test`
parity: install
	$(BIN)/python benchmarks/parity.py $(PARITY_ARGS)

clean:
	rm -rf $(VENV) examples .pytest_cache .ruff_cache
