# anomalykit: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first and pinned: this build is on the machines' local disk (no multi-GB download).
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
BENCH_OUT ?= runs/benchmark
# Default: the best detector of each family so far (fastflow: flows, riad: learned
# reconstruction) plus the free PCA baseline; 8 min 17 s on an idle 2-core machine.
# Everything: make benchmark BENCH_DETECTORS=all
BENCH_DETECTORS ?= pca,riad,fastflow
BENCH_ARGS ?=

.PHONY: install test test-fast benchmark lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev,serve,cluster,tracking]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Everything but the tests marked slow (learning tests, anything over ~5 s): the inner loop.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

benchmark: $(STAMP)
	$(BIN)/anomalykit benchmark --detectors $(BENCH_DETECTORS) --out $(BENCH_OUT) $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check anomalykit tests benchmarks deploy

clean:
	rm -rf $(VENV) runs data/synthetic
