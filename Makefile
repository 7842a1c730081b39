# The two commands of the README: `make demo` and `make test`. Each sets up .venv first if needed.
# torch is pinned before anything that depends on it, so pip takes the local CPU build instead of
# pulling a multi-GB CUDA build from the registry.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedevents-installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedevents run configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_bus.py
	$(BIN)/python benchmarks/bench_overhead.py

clean:
	rm -rf $(VENV) build dist *.egg-info logs ckpts
