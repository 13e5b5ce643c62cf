# Two commands on a fresh machine:
#   make test    creates .venv, installs torch==2.13.0 (CPU) and the project, runs the tests
#   make bench   runs the CPU benchmarks and prints the table
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.fastadapter-installed

.PHONY: test bench lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# pinned first: a bare torch requirement would pull a multi-GB CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	touch $@

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-json=benchmarks/out/cpu.json
	$(PY) benchmarks/report.py benchmarks/out/cpu.json

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf build *.egg-info benchmarks/out
