# branchmerge: the two commands are `make demo` and `make test`; both install what is missing first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# On a machine without a GPU, the CPU build of torch goes in first (an unpinned torch pulls GBs of CUDA
# libraries). Override for another CPU wheel: `make setup TORCH_CPU_SPEC="torch==2.5.1 --index-url ..."`.
TORCH_CPU_SPEC ?= torch==2.13.0
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export SQLALCHEMY_SILENCE_UBER_WARNING ?= 1

.PHONY: setup test test-parallel test-fast demo lint format clean bench-train bench-merge

# The code sandbox needs bubblewrap (`bwrap`): installed here as root on Debian/Ubuntu, else the
# command is printed (evaluating or distilling code fails closed without it). PostgreSQL likewise
# (its server binaries only: the sweep tests run initdb/pg_ctl in a temporary folder).
setup: $(STAMP)
	@bash .ci/require_system_package.sh "command -v bwrap" bubblewrap bubblewrap \
	  "the code sandbox: generated code fails closed without it"
	@bash .ci/require_system_package.sh "command -v pg_ctl || ls /usr/lib/postgresql/*/bin/pg_ctl" \
	  postgresql postgresql-server "the distributed sweep tests start a throwaway server; they skip without it"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >/dev/null 2>&1; then \
	  $(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_CPU_SPEC); fi
	$(PY) -m pip install -e ".[dev]"
	@# replaced by hydra_plugins/branchmerge_optuna_sweeper; its optuna<3 pin breaks an upgraded venv
	@$(PY) -m pip uninstall -y -q hydra-optuna-sweeper 2>/dev/null || true
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q --durations=30

# Opt-in: the same suite on 2 pytest-xdist workers, one test file per worker at a time (tests/conftest.py
# groups them); `make test` stays serial.
test-parallel: setup
	$(PY) -m pytest -q --durations=30 -n 2 --dist loadgroup

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not distributed"

demo: setup
	$(PY) -m branchmerge.demo

bench-train: setup
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) experiments/perf/train_throughput.py

bench-merge: setup
	$(PY) experiments/perf/merge_bench.py

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf outputs .pytest_cache
