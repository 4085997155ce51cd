# `make demo` runs the main job on an embedded local default; `make test` passes the tests.
# Both create and fill .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_AUTH_MODE := disabled
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: venv demo test test-gpu test-all lint bench-toy bench-toy-family clean

venv: $(STAMP)

# The old pip that ships with Python 3.11 backtracks for many minutes on this dependency set;
# a current pip resolves it in seconds. torch is pinned inside pyproject so pip takes the CPU
# build that lies on this machine's disk instead of a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=25"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/w2svd demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -m "not gpu" -q

# On a machine with a CUDA GPU (the image's CUDA torch): the GPU smoke suite, under five minutes.
test-gpu: $(STAMP)
	$(PY) -m pytest -m gpu -q -s tests/gpu

test-all: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check w2svd pipelines tests bench

bench-toy: $(STAMP)
	$(VENV)/bin/w2svd bench toy --out runs/bench-toy

# The family study (hours on a shared 2-core machine; resumable: rerun to continue).
bench-toy-family: $(STAMP)
	nice -n 10 $(VENV)/bin/w2svd bench toy-family --out runs/toy-family
	nice -n 10 $(VENV)/bin/w2svd bench toy-family-r2 --out runs/toy-family

clean:
	rm -rf $(VENV) runs .pytest_cache
