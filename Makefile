# The two commands: `make run` serves on the in-memory backend, `make test` runs the suite.
# `make dist` builds the sdist and the wheel into dist/ (DIST=... elsewhere).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DIST ?= dist
# What the venv holds, for this pyproject.toml: the daemon's own dependencies (make run),
# the build tools (make dist), the test extra (everything else; it includes both).
HASH := $(shell cksum < pyproject.toml | cut -d' ' -f1)
RUN_STAMP := $(VENV)/.installed-run-$(HASH)
DIST_STAMP := $(VENV)/.installed-dist-$(HASH)
STAMP := $(VENV)/.installed-test-$(HASH)

.PHONY: run test lint bench clean system-deps example fuzz dist soak

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(RUN_STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e .
	touch $(RUN_STAMP)

$(DIST_STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dist]'
	touch $(DIST_STAMP) $(RUN_STAMP)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test,dist]'
	touch $(STAMP) $(DIST_STAMP) $(RUN_STAMP)

run: $(RUN_STAMP)
	$(BIN)/channels-broker serve --backend memory:// --listen 127.0.0.1:7733

# The package is on no index yet: install this wheel (README, "Install"). Built without
# build isolation, by the venv's hatchling (the dist extra): no download, two seconds.
dist: $(DIST_STAMP)
	rm -f $(DIST)/channels_broker-*
	$(BIN)/python -m build --no-isolation --outdir $(DIST) .

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

# Two daemons on Redis, then on PostgreSQL, under hundreds of connections while a daemon
# is SIGKILLed, the storage restarted and connections cut (tests/soak; `make test` runs
# 30 s of it on a small site): SOAK_SECONDS per storage. Each report (the books by kind,
# the faults, RSS over time) goes to SOAK_REPORT_DIR/soak-<storage>.txt, with the
# daemons' logs beside it.
SOAK_SECONDS ?= 600
SOAK_REPORT_DIR ?= soak-report
soak: $(STAMP) system-deps
	mkdir -p $(SOAK_REPORT_DIR)
	CHANNELS_BROKER_SOAK_SECONDS=$(SOAK_SECONDS) CHANNELS_BROKER_SOAK_REPORT_DIR=$(SOAK_REPORT_DIR) \
		$(BIN)/python -m pytest tests/soak -s --timeout=0; \
	status=$$?; cat $(SOAK_REPORT_DIR)/soak-*.txt; exit $$status

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
