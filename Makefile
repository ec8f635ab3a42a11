# The two commands: `make run` serves on the in-memory backend, `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test lint bench clean chromium example

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

test: $(STAMP) lint chromium
	$(BIN)/python -m pytest

# The browser test (tests/e2e) drives Debian's chromium. Root installs it; anyone else
# is told how, and the test then skips (or fails, under CI=true).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" -eq 0 ]; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	  else \
	    echo "chromium is not installed and this is not root: run" \
	      "'sudo apt-get install -y chromium' for the browser test (tests/e2e)." >&2; \
	  fi; }

# The example Django site (deploy/examples/notifications) on a broker: http://127.0.0.1:8000/
example: $(STAMP)
	deploy/examples/notifications/run.sh

# Side by side with channels_redis and channels_postgres (the bench extra installs them).
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/channels-broker bench --backend memory:// --backend redis://127.0.0.1:6379/0 \
		--backend postgresql://postgres@127.0.0.1:5432/postgres

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
