"""``channels-broker status``, ``top`` and ``check`` read a running daemon from a shell."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from broker import __version__
from broker.layer import BrokerChannelLayer
from tests.broker.http_client import http_get
from tests.conftest import BrokerProcess


@pytest.fixture
def daemon() -> Iterator[BrokerProcess]:
    """A memory:// daemon: the backend that can list its longest queues."""
    process = BrokerProcess("memory://")
    process.start()
    http_get(process.metrics_port, "/healthz")  # its HTTP listener is up too
    yield process
    process.cleanup()


def cli(daemon: BrokerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    address = f"127.0.0.1:{daemon.metrics_port}"
    return subprocess.run(
        [sys.executable, "-m", "broker", *args, "--metrics-listen", address],
        capture_output=True,
        text=True,
        timeout=30,
    )


def leave_backlog(daemon: BrokerProcess, backlog: dict[str, int]) -> None:
    """Send ``count`` messages to each channel and leave them waiting."""

    async def send() -> None:
        layer = BrokerChannelLayer(hosts=[daemon.url])
        for channel, count in backlog.items():
            for index in range(count):
                await layer.send(channel, {"type": "test", "index": index})
        await layer.close()

    asyncio.run(send())


def test_status_shows_the_daemon_on_one_screen(
    daemon: BrokerProcess, unique: Callable[[str], str]
) -> None:
    """Version, readiness, backend, listen address, backlog, and the longest queues first."""
    deep, shallow = unique("deep"), unique("shallow")
    leave_backlog(daemon, {shallow: 1, deep: 3})
    result = cli(daemon, "status", "--interval", "0.2")
    assert result.returncode == 0, result.stderr
    screen = result.stdout
    assert f"channels-broker {__version__}" in screen and "READY" in screen
    assert "backend      memory:// (up)" in screen
    assert f"tcp://127.0.0.1:{daemon.port}" in screen
    assert "4 messages in 2 channels" in screen
    assert "rates per second" in screen
    top = screen.split("top channels by backlog", 1)[1].splitlines()
    rows = [line.split() for line in top if deep in line or shallow in line]
    assert rows == [["3", "asgi", deep], ["1", "asgi", shallow]]


def test_status_json_is_the_status_document(daemon: BrokerProcess) -> None:
    result = cli(daemon, "status", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["version"] == __version__
    assert document["ready"]["ready"] is True
    assert {"accepted", "delivered", "rejected", "expired"} <= set(document["totals"])


def test_top_refreshes_with_rates(daemon: BrokerProcess) -> None:
    """Two screens: totals first (no earlier reading), then rates."""
    result = cli(daemon, "top", "--count", "2", "--interval", "0.2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(f"channels-broker {__version__}") == 2
    first, second = result.stdout.split(f"channels-broker {__version__}")[1:]
    assert "totals since start" in first and "rates per second" in second


def test_check_exits_nonzero_when_the_daemon_is_gone(daemon: BrokerProcess) -> None:
    assert cli(daemon, "check").returncode == 0
    daemon.stop()
    result = cli(daemon, "check")
    assert result.returncode == 1
    assert "not ready" in result.stderr
    assert cli(daemon, "status").returncode == 1


async def test_status_names_the_clients_holding_unacknowledged_pushes(
    daemon: BrokerProcess,
) -> None:
    """A consumer that was pushed 3 messages and read none is the top slow client."""
    consumer = BrokerChannelLayer(hosts=[daemon.url])
    try:
        channel = await consumer.new_channel()
        for index in range(3):
            await consumer.send(channel, {"type": "test", "index": index})
        address = f"127.0.0.1:{daemon.metrics_port}"
        deadline = asyncio.get_running_loop().time() + 10
        while True:  # the pushes are on their way to the consumer's buffer
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "broker", "status", "--interval", "0",
                "--metrics-listen", address, stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            screen = (await process.communicate())[0].decode()
            rows = screen.partition("top clients by unacknowledged pushes")[2].splitlines()
            held = [row.split()[0] for row in rows[2:] if row.strip()]
            if held == ["3"] or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.1)
        assert held == ["3"], screen
        assert process.returncode == 0
    finally:
        await consumer.close()
