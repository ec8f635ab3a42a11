"""Several daemons on one PostgreSQL: the shared-storage scenarios, run on PostgreSQL.

The bodies are those of ``test_redis_shared`` (one body, every shared backend): they
are collected here a second time, with ``backend_url`` pointing every daemon of this
module at the session's PostgreSQL schema.
"""

from __future__ import annotations

import pytest

from tests import pg_server
from tests.broker.test_redis_shared import (
    test_consumer_moving_to_another_daemon_gets_what_waited,
    test_sigkilled_daemon_loses_no_waiting_message,
    test_two_daemons_serve_one_site,
)

__all__ = [
    "test_consumer_moving_to_another_daemon_gets_what_waited",
    "test_sigkilled_daemon_loses_no_waiting_message",
    "test_two_daemons_serve_one_site",
]


@pytest.fixture(scope="module")
def backend_url() -> str:
    """Every daemon of this module uses the session's PostgreSQL (overrides the parameter)."""
    return pg_server.backend_url("postgresql://")
