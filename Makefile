# fleetserve developer commands: `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# NOTE: the CPU wheel of torch; a GPU machine installs its own CUDA torch before `make install`.
TORCH ?= torch==2.13.0

.PHONY: help install lint test test-all test-cluster test-ray-oldest up down bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python ## create .venv and install fleetserve with its test tools
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev]"

lint: install ## ruff lint + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint ## install, lint, then run the default test suite (unit + integration)
	$(BIN)/python -m pytest

test-all: lint ## the default suite plus the slow tests
	$(BIN)/python -m pytest -m ""

test-cluster: install ## the cluster tests: their own multi-node Ray cluster (head + 2 workers), own session
	$(BIN)/python -m pytest -m cluster tests/cluster

test-ray-oldest: ## unit tests + the config.yaml smoke test on the oldest supported Ray (own venv)
	bash .ci/ray-oldest

up: install ## start SeaweedFS + Ray + the fleet app on 127.0.0.1 and publish the demo fleet
	$(BIN)/fleetserve up

down: ## stop what `make up` started
	$(BIN)/fleetserve down

clean: ## remove the local stack's state (stop it first)
	rm -rf .state
