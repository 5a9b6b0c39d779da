# Every target works on a fresh machine that has only Python 3.11 and make.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(VENV)/bin/python -m pip
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench bundles lint clean

install: $(STAMP)

# torch goes in first, from the pinned CPU wheel; the constraints file keeps every later
# requirement from pulling another torch build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test]"
	touch $(STAMP)

demo: install
	$(PY) -m demo

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) -m bench.run_all

bundles: install
	$(PY) -m bundles.pack --out dist

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) dist .pytest_cache
