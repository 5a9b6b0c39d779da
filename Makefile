# Every target works on a fresh machine that has only Python 3.11 and make.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
# The constraints file pins torch==2.13.0 (the local CPU wheel) for every install, so that no
# requirement can pull another torch build with its CUDA packages.
PIP    := PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench bundles lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test]"
	touch $(STAMP)

demo: install
	$(PY) scripts/demo.py

test: install
	$(PY) -m pytest

bench: install
	$(PIP) install --quiet -e ".[bench]"
	$(PY) -m bench.run_all

bundles: install
	$(PY) scripts/pack_bundles.py --out dist --wheel

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) dist demo_output .pytest_cache .ruff_cache
