# tether developer commands. `make test` works on a fresh machine with only Python ≥ 3.10:
# it creates .venv, installs torch and the package with its dev extra, then runs ruff and pytest.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch to install when the venv has none. On the CPU-only project machines this resolves to a
# local CPU wheel; elsewhere pip picks the build for the platform (CUDA on Linux). Override, e.g.
#   make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test test-slow lint format bench-kl demo demo-dpo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev,control]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check tether tests benchmarks examples

format: install
	$(BIN)/ruff format tether tests benchmarks

test: install lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

# The main job: the over-optimisation lab on the embedded SmolLM2-135M-Instruct (VADER the gold,
# MiniLM reward models the proxies, best-of-n and GRPO with and without a KL penalty); about 11 min
# on 2 CPU cores, cached in runs/lab-demo (re-running resumes), ends with a summary and report.html.
demo: install
	$(BIN)/tether lab overopt -c recipes/lab/demo.yaml

# Offline DPO on VADER-labelled pairs of SmolLM2's samples (~30-45 min on 2 CPU cores).
demo-dpo: install
	$(BIN)/python examples/dpo_vader.py --out runs/dpo-vader

bench-kl: install
	$(BIN)/python benchmarks/exact_kl_memory.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
