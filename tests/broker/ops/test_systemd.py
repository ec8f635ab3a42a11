"""The daemon speaks systemd's notify protocol to the socket in ``$NOTIFY_SOCKET``.

The test binds that datagram socket itself, as systemd would, and starts a real
daemon with ``NOTIFY_SOCKET`` (and ``WATCHDOG_USEC``) in its environment.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.broker.http_client import http_get
from tests.conftest import BrokerProcess
from tests.waits import START_TIMEOUT_S

#: A watchdog period short enough to see several pings within a second.
WATCHDOG_USEC = 200_000


class NotifySocket:
    """A bound datagram socket collecting what the daemon sends, one message a datagram."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, value: str = "1", timeout_s: float = START_TIMEOUT_S) -> int:
        """Index of the first message with ``key=value``, reading until it comes."""
        deadline = time.monotonic() + timeout_s
        while True:
            for index, message in enumerate(self.messages):
                if message.get(key) == value:
                    return index
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no {key}={value} within {timeout_s} s; got {self.messages}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            pairs = (line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(dict(pairs))

    def count(self, key: str) -> int:
        return sum(1 for message in self.messages if key in message)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def daemon() -> Iterator[BrokerProcess]:
    process = BrokerProcess("memory://")
    yield process
    process.cleanup()


@pytest.fixture(params=["path", "abstract"])
def notify_socket(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[NotifySocket]:
    """$NOTIFY_SOCKET for the daemons this test starts: a file path, or an '@' name."""
    if request.param == "path":
        address = str(tmp_path / "notify.sock")
    else:
        address = f"@channels-broker-test-{uuid.uuid4().hex}"
    receiver = NotifySocket(address)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield receiver
    receiver.close()


def test_ready_watchdog_and_stopping_are_notified(
    daemon: BrokerProcess, notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Type=notify and WatchdogSec= as systemd runs the unit.

    1. READY=1 comes with a STATUS= line, once the daemon serves: /readyz says ready.
    2. WATCHDOG=1 comes every half period (0.1 s here): at least 4 within a second.
    3. SIGTERM: STOPPING=1 comes, and the daemon exits 0.
    """
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    daemon.start()
    ready = notify_socket.wait_for("READY")
    assert "connections" in notify_socket.messages[ready].get("STATUS", "")
    assert http_get(daemon.metrics_port, "/readyz")[0] == 200

    started = time.monotonic()
    for _ in range(4):
        notify_socket.messages.clear()
        notify_socket.wait_for("WATCHDOG", timeout_s=2.0)
    assert time.monotonic() - started < 1.0 + 0.5  # 4 pings at 0.1 s, with slack for load

    assert daemon.stop() == 0
    notify_socket.wait_for("STOPPING")


def test_no_watchdog_pings_for_another_process(
    daemon: BrokerProcess, notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WATCHDOG_PID naming another process (a parent's setting) turns the pings off."""
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.setenv("WATCHDOG_PID", "1")
    daemon.start()
    notify_socket.wait_for("READY")
    time.sleep(0.5)  # five periods in which a ping would have come
    assert daemon.stop() == 0
    notify_socket.wait_for("STOPPING")
    assert notify_socket.count("WATCHDOG") == 0
