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

.PHONY: setup test test-fast demo lint format clean bench-train bench-merge

# The code sandbox needs bubblewrap (`bwrap`): installed here as root on Debian/Ubuntu, else the
# command is printed (evaluating or distilling code fails closed without it). PostgreSQL likewise
# (its server binaries only: the sweep tests run initdb/pg_ctl in a temporary folder).
setup: $(STAMP)
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing bubblewrap (the code sandbox)"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q bubblewrap || { apt-get update -q && apt-get install -y -q bubblewrap; }; \
	  else \
	    echo "bubblewrap (bwrap) is missing: generated code will not run. Install it with:"; \
	    echo "  sudo apt-get install bubblewrap    (Fedora: sudo dnf install bubblewrap)"; \
	  fi; }
	@command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing postgresql (the distributed sweep tests start a throwaway server)"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q postgresql || { apt-get update -q && apt-get install -y -q postgresql; }; \
	  else \
	    echo "postgresql is missing: tests/integration/test_sweep_workers.py's PostgreSQL test will skip. Install it with:"; \
	    echo "  sudo apt-get install postgresql    (Fedora: sudo dnf install postgresql-server)"; \
	  fi; }

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >/dev/null 2>&1; then \
	  $(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_CPU_SPEC); fi
	$(PY) -m pip install -e ".[dev]"
	@# replaced by hydra_plugins/branchmerge_optuna_sweeper; its optuna<3 pin breaks an upgraded venv
	@$(PY) -m pip uninstall -y -q hydra-optuna-sweeper 2>/dev/null || true
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q

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
