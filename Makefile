# The two commands of the README: `make demo` and `make test`. Each sets up .venv first if needed.
# torch is pinned before anything that depends on it, so pip takes the local CPU build instead of
# pulling a multi-GB CUDA build from the registry.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedevents-installed

.PHONY: setup bytecode demo reid-demo test test-slow bench clean

setup: $(STAMP) bytecode

# fedevents' own modules compiled to bytecode once, as pip does for a package it installs: an editable
# install otherwise compiles them at every start where PYTHONDONTWRITEBYTECODE is set (containers, CI),
# about 0.3 s of CPU per process (docs/benchmarks.md). Only changed modules are compiled again.
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q engine federated handlers cli

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,ray,tensorboard,mlflow,datasets]'
	touch $(STAMP)

demo: setup
	$(BIN)/fedevents run configs/demo.yaml

# The suite without the tests marked slow (about 8 minutes on 2 cores); CI (.ci/run) runs both.
test: setup
	$(BIN)/python -m pytest -q -m "not slow"

# The slow tests alone: many real `fedevents` processes (kill-and-resume chains, Ray, full-width backbones).
test-slow: setup
	$(BIN)/python -m pytest -q -m slow

bench: setup
	$(BIN)/python benchmarks/bench_bus.py
	$(BIN)/python benchmarks/bench_overhead.py

clean:
	rm -rf $(VENV) build dist *.egg-info logs ckpts

# The ReID demo: a synthetic FedSTIL-format data set, every method on it, and a report comparing them.
REID_METHODS ?= baseline fedavg fedprox ewc mas fedcurv icarl
reid-demo: setup
	$(BIN)/fedevents data synth-reid data/synth-reid --clients 3 --tasks 3 --ids-per-task 20 --sustain-rounds 3 --overwrite
	rm -rf logs/reid-demo
	for m in $(REID_METHODS); do \
	  $(BIN)/fedevents run data/synth-reid/experiment.yaml --set exp_method=$$m --set exp_name=reid-$$m \
	    --set model_opts.width=16 --set task_opts.train_epochs=4 --logs-dir logs/reid-demo \
	    --set checkpoints_dir=ckpts/reid-demo || exit 1; \
	done
	$(BIN)/fedevents report logs/reid-demo/*-[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f].json --out report/reid-demo
