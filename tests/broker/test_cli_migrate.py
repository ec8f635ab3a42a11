"""``channels-broker migrate`` and ``serve --no-migrate`` against the session's PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from tests import pg_server

TIMEOUT_S = 60


@pytest.fixture
def schema_url() -> Iterator[str]:
    """A URL naming a schema of this test's own (dropped after)."""
    server = pg_server.backend_url("postgresql://").split("?", 1)[0]
    schema = f"{pg_server.session_schema}_{uuid.uuid4().hex[:6]}"
    yield pg_server.with_schema(server, schema)
    pg_server.drop_schema(server, schema)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )


def test_migrate_creates_then_finds_the_schema_up_to_date(schema_url: str) -> None:
    first = run("migrate", "--backend", schema_url)
    assert first.returncode == 0, first.stderr
    assert "migrated from version 0 to" in first.stdout
    again = run("migrate", "--backend", schema_url)
    assert again.returncode == 0, again.stderr
    assert "up to date" in again.stdout


def test_migrate_refuses_a_backend_without_a_schema() -> None:
    result = run("migrate", "--backend", "memory://")
    assert result.returncode == 2
    assert "only postgresql://" in result.stderr


def test_serve_without_migration_on_a_missing_schema_exits_with_a_clear_message(
    schema_url: str,
) -> None:
    result = run(
        "serve", "--no-migrate", "--backend", schema_url,
        "--listen", "127.0.0.1:0", "--metrics-listen", "off",
    )  # fmt: skip
    assert result.returncode == 3
    assert "run 'channels-broker migrate' first" in result.stderr


def test_migrate_reports_an_unreachable_database() -> None:
    result = run("migrate", "--backend", "postgresql://postgres@127.0.0.1:1/postgres?timeout=1")
    assert result.returncode == 3
    assert "cannot reach PostgreSQL" in result.stderr
