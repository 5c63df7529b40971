# One command per chore. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch first, pinned, so pip takes the CPU wheel instead of the multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: help install demo test lint bench clean

# Every target has a "##" comment, so help lists it (tests/infra/test_makefile.py checks).
help:  ## list the targets
	@grep -E '^[A-Za-z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,demo]"
	touch $(STAMP)

install: $(STAMP)  ## create .venv with torch (CPU wheel) and the project

demo: $(STAMP)  ## embed a small real corpus into a local LanceDB table, query it, print the run report
	$(PY) -m jobs.demo

test: $(STAMP)  ## run the test suite
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)  ## ruff
	$(VENV)/bin/ruff check model pipeline jobs tests

bench: $(STAMP)  ## benchmarks (see docs/BENCHMARKS.md)
	$(PY) -m jobs.cli bench

clean:  ## remove the virtual environment and demo output
	rm -rf $(VENV) demo_output
