"""Fixtures for the PostgreSQL backend's own tests: the session's server, and schemas."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests import pg_server


@pytest.fixture(scope="module")
def server_url() -> str:
    """The session's PostgreSQL server (DATABASE_URL, or one of our own), no schema."""
    url = pg_server.backend_url("postgresql://")
    return url.split("?", 1)[0]


@pytest.fixture(scope="module")
def session_url() -> str:
    """The session's server and schema, as the contract suite and the daemons use it."""
    return pg_server.backend_url("postgresql://")


@pytest.fixture
def schema(server_url: str) -> Iterator[str]:
    """A schema of this test's own, dropped after it."""
    name = f"{pg_server.session_schema}_{uuid.uuid4().hex[:6]}"
    yield name
    pg_server.drop_schema(server_url, name)
