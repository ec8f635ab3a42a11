# The two commands: `make run` serves on the in-memory backend, `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test lint bench clean system-deps example fuzz

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/channels-broker serve --backend memory:// --listen 127.0.0.1:7733

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy protocol backends broker

test: $(STAMP) lint system-deps
	$(BIN)/python -m pytest

# What the tests run besides Python, from Debian: the browser (tests/e2e), Redis and
# PostgreSQL servers (throwaway ones when none answers), systemd-analyze and promtool
# (deploy/ checks). Root installs what is missing; anyone else is told what to install.
SYSTEM_TOOLS := chromium:chromium redis-server:redis-server redis-cli:redis-tools \
	psql:postgresql systemd-analyze:systemd promtool:prometheus
system-deps:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" -eq 0 ]; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $$missing; \
	  else \
	    echo "missing Debian packages:$$missing; run 'sudo apt-get install$$missing'" >&2; \
	  fi; fi

# A longer fuzz run of a live daemon on each backend (tests/fuzz; `make test` sends 40,000
# inputs per backend): FUZZ_INPUTS per backend, or FUZZ_SECONDS per backend instead, and
# FUZZ_SEED (a number to replay a run; `random` picks one and prints it on failure).
# --runxfail: a criterion marked as failing today is reported as the failure it is.
FUZZ_INPUTS ?= 1000000
FUZZ_SECONDS ?=
FUZZ_SEED ?= random
fuzz: $(STAMP) system-deps
	CHANNELS_BROKER_FUZZ_INPUTS=$(FUZZ_INPUTS) CHANNELS_BROKER_FUZZ_SECONDS=$(FUZZ_SECONDS) \
		CHANNELS_BROKER_FUZZ_SEED=$(FUZZ_SEED) \
		$(BIN)/python -m pytest tests/fuzz --runxfail --timeout=0

# The example Django site (deploy/examples/notifications) on a broker: http://127.0.0.1:8000/
example: $(STAMP)
	deploy/examples/notifications/run.sh

# Side by side with channels_redis and channels_postgres (the bench extra installs them)
# and channels-nats (the script installs it on Python 3.11; a failure leaves its column
# out, with a note). BENCH_JSON: where the JSON report goes.
BENCH_JSON ?= bench.json
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	-deploy/bench/install-channels-nats.sh $(BIN)/python
	$(BIN)/channels-broker bench --backend memory:// --backend redis://127.0.0.1:6379/0 \
		--backend postgresql://postgres@127.0.0.1:5432/postgres --json $(BENCH_JSON)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
