# Two commands on a fresh machine: `make demo` and `make test`. Everything else is here too.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MODEL ?= artifacts/tiny-asr-hf
PORT ?= 50051
GEN := gen/python
PROTOS := $(shell find proto -name '*.proto')

.PHONY: setup system-deps client-deps proto tiny demo serve test test-unit test-clients lint typecheck bench clean

# System packages the server and its tests need (espeak-ng makes real speech for the audio tests).
system-deps:
	bash scripts/system-deps.sh

# Toolchains of the Go, Java, C++ and Node clients (Debian packages and npm only).
client-deps:
	bash clients/setup.sh

# .[ray]: Ray Serve for tests/integration/test_ray_serve.py (~80 MB wheel; docs/scale-out.md).
# torch==2.13.0 is the CPU build on this machine's disk (any other spec may pull a CUDA build of several GB).
# The stubs are generated before the editable install so that setuptools finds the generated package.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q grpcio-tools mypy-protobuf
	bash scripts/gen_proto.sh $(PY)
	$(PIP) install -q -e '.[dev,ja,ko,ray]'
	touch $@

setup: system-deps client-deps $(VENV)/.installed proto

proto: $(VENV)/.installed $(GEN)/.stamp

$(GEN)/.stamp: $(PROTOS) scripts/gen_proto.sh
	bash scripts/gen_proto.sh $(PY)
	touch $@

tiny: proto
	$(VENV)/bin/asr-server build-tiny-checkpoint --out artifacts

demo: system-deps $(VENV)/.installed proto tiny
	bash scripts/demo.sh $(VENV) artifacts/tiny-asr-hf

serve: proto
	$(VENV)/bin/asr-server serve --model $(MODEL) --port $(PORT)

test: setup
	$(PY) -m pytest -q

# The fast layer: pure tests (no model, no subprocess, no thread timing), a few seconds.
test-unit: proto
	$(PY) -m pytest -q tests/unit

test-clients: setup
	$(PY) -m pytest -q tests/clients $(wildcard tests/unit/test_python_client*.py tests/integration/test_python_client*.py)

lint: proto
	$(VENV)/bin/ruff check server clients/python tests bench
	$(VENV)/bin/mypy server/asr_server clients/python/asr_client

typecheck: lint

# Load generator against a running server (see docs/benchmarks.md): make bench PORT=50051 BENCH_ARGS="--concurrency 64"
BENCH_ARGS ?= --concurrency 8 --audio-s 5 --requests 64
bench: proto
	PYTHONPATH=$(GEN) $(PY) bench/loadgen.py --target localhost:$(PORT) $(BENCH_ARGS)

clean:
	rm -rf $(GEN) build dist artifacts .pytest_cache .mypy_cache
