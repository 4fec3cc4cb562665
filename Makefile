# One verb per target. `make check` is the test command in the README and what CI runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SYSTEM_PACKAGES := libsndfile1 sox espeak-ng flite
# Node.js and npm (for the test with a Node gRPC client) count as present when the commands are,
# whatever package provided them.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: setup system-deps proto proto-check lint format typecheck test test-slow check bench clean

setup: $(VENV)/.installed  ## system packages, virtualenv, the package with dev extras

system-deps: .stamps/system

.stamps/system:
	@missing=""; for p in $(SYSTEM_PACKAGES); do \
		dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	command -v node >/dev/null && command -v npm >/dev/null || missing="$$missing nodejs npm"; \
	if [ -n "$$missing" ]; then \
		command -v apt-get >/dev/null || { echo "install these first:$$missing"; exit 1; }; \
		echo "installing system packages:$$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@mkdir -p .stamps && touch $@

$(VENV)/.installed: .stamps/system pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

PROTOS := $(wildcard proto/asr/v1/*.proto)
PROTOC := $(BIN)/python -m grpc_tools.protoc -I proto

proto: setup  ## regenerate asr/v1/*_pb2*.py from proto/ (the generated code is checked in)
	$(PROTOC) --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

proto-check: setup  ## the checked-in generated code is what `make proto` writes now
	@tmp=$$(mktemp -d); $(PROTOC) --python_out=$$tmp --pyi_out=$$tmp --grpc_python_out=$$tmp $(PROTOS) \
		&& diff -r -x __init__.py -x __pycache__ $$tmp/asr/v1 asr/v1 \
		&& echo "generated gRPC code is up to date"; status=$$?; rm -rf $$tmp; \
		[ $$status = 0 ] || { echo "asr/v1 is stale: run make proto"; exit 1; }

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: setup
	$(BIN)/mypy

test: setup  ## the default suite (slow tests excluded)
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/pytest -m slow $(PYTEST_ARGS)

check: proto-check lint typecheck test  ## what the README's test command and CI run

bench: setup  ## benchmarks that need a trained model take it from exp/synthetic (the recipe)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,bench]'
	$(BIN)/python bench/features.py
	$(BIN)/python bench/ctc_decoders.py
	$(BIN)/python bench/attention_decoding.py

clean:
	rm -rf .stamps $(VENV) .mypy_cache .ruff_cache .pytest_cache
