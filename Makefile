# Thin wrappers: CI runs exactly what a developer runs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PROTO_OUT := sidecar/_proto
PROTO_SRC := $(wildcard proto/proviso/v1/*.proto)
STAMP  := $(VENV)/.installed

POLICIES ?= policies
STATE_DIR ?= .proviso
LISTEN ?= 127.0.0.1:50051
METRICS_LISTEN ?= 127.0.0.1:9464

.PHONY: install proto lint test run bench clean

install: $(STAMP) proto

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

proto: $(STAMP) $(PROTO_OUT)/.stamp

$(PROTO_OUT)/.stamp: $(PROTO_SRC) scripts/gen_protos.py
	$(BIN)/python scripts/gen_protos.py
	touch $@

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: install
	$(BIN)/python -m pytest -q

run: install
	$(BIN)/proviso serve --policies $(POLICIES) --listen $(LISTEN) \
		--metrics-listen $(METRICS_LISTEN) --state-dir $(STATE_DIR)

bench: install
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) $(PROTO_OUT) .proviso .pytest_cache .mypy_cache .ruff_cache
