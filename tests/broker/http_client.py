"""GET on a daemon's health and metrics listener, for the tests of ``tests/broker``.

The test fixtures wait until a daemon's broker port accepts connections; its HTTP
listener opens a moment later, so a refused connection is retried for a while.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request

from tests.waits import POLL_S, START_TIMEOUT_S

__all__ = ["http_get"]

#: How long an answer may take: /readyz waits up to 2 s for the backend.
IO_TIMEOUT_S = 10.0


def http_get(
    port: int, path: str, host: str = "127.0.0.1", headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """Status and body of ``GET path`` on ``host``:``port`` (4xx and 5xx included)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    request = urllib.request.Request(f"http://{host}:{port}{path}", headers=headers or {})
    while True:
        try:
            with urllib.request.urlopen(request, timeout=IO_TIMEOUT_S) as response:
                return response.status, bytes(response.read())
        except urllib.error.HTTPError as exc:
            with exc:  # it holds the connection until closed
                return exc.code, bytes(exc.read())
        except urllib.error.URLError as exc:
            if not isinstance(exc.reason, ConnectionRefusedError) or time.monotonic() > deadline:
                raise
        time.sleep(POLL_S)
