# The two entry points of the README. Both create .venv on first use; nothing else is needed
# beyond python3 (3.10+) and access to the package index.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml requirements/constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python -m pipelines.demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check pixeldensity transforms pipelines tests benchmarks
	$(BIN)/ruff format --check pixeldensity transforms pipelines tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info demo_output
