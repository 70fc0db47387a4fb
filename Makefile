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

.PHONY: install proto lint test run bench h2load clean

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

bench: install h2load
	$(BIN)/python -m bench.run

# The bench's load generator (Debian's nghttp2-client). Installed when missing and possible (as
# root, or with sudo); if not, bench.run falls back to Python clients and says so loudly.
h2load:
	@command -v h2load >/dev/null 2>&1 || { \
		echo "bench: h2load not found; installing Debian's nghttp2-client"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
		{ $$SUDO apt-get update -qq && \
		  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq nghttp2-client; \
		} >/dev/null 2>&1 || echo "bench: could not install nghttp2-client (no apt, no root?)"; \
	}

clean:
	rm -rf $(VENV) $(PROTO_OUT) .proviso .pytest_cache .mypy_cache .ruff_cache
