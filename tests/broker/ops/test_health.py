"""``/healthz`` says the process lives; ``/readyz`` says it can serve, and follows the backend.

The backend outage uses a redis-server of the test's own, killed and started again
on the same port, with a daemon on ``redis://`` pointed at it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from backends import BACKENDS
from tests.broker.http_client import http_get
from tests.conftest import BrokerProcess
from tests.servers import RedisServer
from tests.waits import POLL_S

#: /readyz asks the backend with a 2 s timeout; a dead Redis shows within a few polls.
CHANGE_TIMEOUT_S = 15.0


def get(broker: BrokerProcess, path: str) -> tuple[int, Any]:
    """Status and decoded JSON body of a GET on the daemon's health listener."""
    code, body = http_get(broker.metrics_port, path)
    return code, json.loads(body)


def wait_for_readyz(broker: BrokerProcess, status: int) -> dict[str, Any]:
    deadline = time.monotonic() + CHANGE_TIMEOUT_S
    while True:
        code, body = get(broker, "/readyz")
        if code == status:
            return dict(body)
        if time.monotonic() > deadline:
            pytest.fail(f"/readyz stayed {code} {body}, expected {status}\n{broker.log_tail()}")
        time.sleep(POLL_S)


def check(broker: BrokerProcess) -> subprocess.CompletedProcess[str]:
    """``channels-broker check`` against ``broker``."""
    return subprocess.run(
        [sys.executable, "-m", "broker", "check", "--metrics-listen",
         f"127.0.0.1:{broker.metrics_port}"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    if "redis" not in BACKENDS:
        pytest.fail("the redis backend is not registered in backends.BACKENDS")
    if shutil.which("redis-server") is None and os.environ.get("CI") != "true":
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer()
    server.start()
    yield server
    server.stop()


def test_healthz_and_readyz_answer_json(broker: BrokerProcess) -> None:
    """A serving daemon: alive, ready, both as JSON; other paths are 404."""
    assert get(broker, "/healthz") == (200, {"status": "ok"})
    code, body = get(broker, "/readyz")
    assert code == 200
    assert body["ready"] is True and body["listening"] is True and body["backend"] is True
    assert http_get(broker.metrics_port, "/nothing")[0] == 404
    assert check(broker).returncode == 0


def test_readyz_follows_the_backend(redis_server: RedisServer) -> None:
    """Not ready while Redis is gone, ready again once it is back; alive all along.

    1. Redis up: /readyz 200, ``check`` exits 0, channels_broker_ready is 1.
    2. Redis killed: /readyz 503 with backend false; /healthz still 200; ``check``
       exits 1; channels_broker_ready and channels_broker_backend_up are 0.
    3. Redis started again on its port: /readyz 200 again.
    """
    daemon = BrokerProcess(redis_server.url)
    daemon.start()
    try:
        wait_for_readyz(daemon, 200)
        assert check(daemon).returncode == 0

        redis_server.kill()
        body = wait_for_readyz(daemon, 503)
        assert body["backend"] is False and body["listening"] is True
        assert get(daemon, "/healthz") == (200, {"status": "ok"})
        result = check(daemon)
        assert result.returncode == 1 and "not ready" in result.stdout, result
        text = http_get(daemon.metrics_port, "/metrics")[1].decode()
        assert "channels_broker_ready 0.0" in text
        assert "channels_broker_backend_up 0.0" in text

        redis_server.start()
        wait_for_readyz(daemon, 200)
    finally:
        daemon.cleanup()
