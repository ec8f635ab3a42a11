"""Sockets cannot lock clients out: connections are bounded per daemon and per peer
address, a socket that never says HELLO is closed after --hello-timeout, and accept
errors are counted and logged once per burst instead of a traceback each.

Issue 14: 300 sockets that never said HELLO, against a daemon whose open file limit
was 256, locked out a client with the right token, and asyncio logged 14,479
tracebacks in 10 s. The daemons here run with that limit (RLIMIT_NOFILE 256); the
attacker connects from 127.0.0.2, the good client from 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from protocol import Error, ErrorCode, Welcome
from tests.broker.daemon.attack import (
    Client,
    flags,
    limit_hits,
)
from tests.ping_probe import PING_BOUND_S, pinging
from tests.waits import DELIVERY_TIMEOUT_S, POLL_S

pytestmark = pytest.mark.backends("memory")

#: The open file limit of the daemons under attack, as in the issue.
OPEN_FILES = 256
ATTACKER, GOOD = "127.0.0.2", "127.0.0.1"
HELLO_TIMEOUT_S = 2.0


async def open_many(address: tuple[str, int], count: int, source: str) -> list[Client]:
    return [await Client.connect(address, source=source) for _ in range(count)]


async def closing_errors(clients: list[Client]) -> list[Error]:
    """The one ERROR each connection got before the daemon closed it."""
    errors = []
    for frames in await asyncio.gather(*(client.frames_until_closed() for client in clients)):
        assert len(frames) == 1 and isinstance(frames[0], Error), frames
        errors.append(frames[0])
    for client in clients:
        client.close()
    return errors


async def no_connections(broker: Any) -> None:
    """Wait until the daemon holds no client connection (its gauge gives no event)."""
    async with asyncio.timeout(DELIVERY_TIMEOUT_S):
        while limit_hits(broker)["connections"]:
            await asyncio.sleep(POLL_S)


def count_lines(broker: Any, text: str) -> int:
    return sum(text in line for line in broker.stderr_text().splitlines())


@pytest.mark.slow
async def test_silent_sockets_from_one_peer_leave_room_for_the_others(
    broker_factory: Callable[..., Any],
) -> None:
    """300 silent sockets from one address: 50 (--max-connections-per-peer) are let in
    and closed after --hello-timeout, 250 are refused at once; a client from another
    address gets in and is answered within the bound all along."""
    broker = broker_factory(
        open_files=OPEN_FILES,
        extra_args=flags(max_connections_per_peer=50, hello_timeout=HELLO_TIMEOUT_S),
    )
    async with pinging(broker) as probe:
        silent = await open_many(broker.address, 300, ATTACKER)
        good = await Client.connect(broker.address, source=GOOD)
        assert isinstance(await good.hello(), Welcome)
        errors = await closing_errors(silent)
    good.close()

    refused = [e for e in errors if e.code == ErrorCode.TOO_MANY_CONNECTIONS]
    timed_out = [e for e in errors if e.code == ErrorCode.OVER_LIMIT]
    assert (len(refused), len(timed_out)) == (250, 50)
    assert "--max-connections-per-peer" in refused[0].message
    assert "--hello-timeout" in timed_out[0].message
    assert probe.slowest_s < PING_BOUND_S
    hits = limit_hits(broker)
    assert (hits["max-connections-per-peer"], hits["hello-timeout"]) == (250, 50)
    assert hits["accept-errors"] == 0
    assert "Traceback" not in broker.stderr_text()
    # One line per burst of each kind of hit, not one per socket.
    assert count_lines(broker, "--max-connections-per-peer") == 1
    assert count_lines(broker, "--hello-timeout") == 1


@pytest.mark.slow
async def test_the_daemon_keeps_its_connections_within_its_open_file_limit(
    broker_factory: Callable[..., Any],
) -> None:
    """With 256 files, --max-connections (10,000) is lowered to what they leave, and
    said so: 300 silent sockets fill that and the rest are refused by the daemon, not
    by the kernel (no accept error). The deadline frees the places, and a good client
    gets one."""
    broker = broker_factory(open_files=OPEN_FILES, extra_args=flags(hello_timeout=HELLO_TIMEOUT_S))
    broker.wait_for_log(lambda line: "--max-connections 10000 lowered to" in line)
    silent = await open_many(broker.address, 300, ATTACKER)
    late = await Client.connect(broker.address, source=GOOD)
    errors = await closing_errors([*silent, late])
    good = await Client.connect(broker.address, source=GOOD)
    assert isinstance(await good.hello(), Welcome)
    good.close()

    admitted = sum(e.code == ErrorCode.OVER_LIMIT for e in errors)
    refused = sum(e.code == ErrorCode.TOO_MANY_CONNECTIONS for e in errors)
    assert admitted + refused == 301 and 0 < admitted < OPEN_FILES
    assert errors[-1].code == ErrorCode.TOO_MANY_CONNECTIONS  # the late one, while full
    hits = limit_hits(broker)
    assert hits["max-connections"] == refused
    assert hits["accept-errors"] == 0
    assert "Traceback" not in broker.stderr_text()


async def test_unix_socket_clients_count_against_max_connections_only(
    broker_factory: Callable[..., Any], tmp_path: Path
) -> None:
    path = str(tmp_path / "broker.sock")
    broker = broker_factory(
        unix_path=path, extra_args=flags(max_connections=3, max_connections_per_peer=1)
    )
    await no_connections(broker)  # the fixture's readiness probe has gone

    async def connect() -> Client:
        reader, writer = await asyncio.open_unix_connection(path)
        return Client(reader, writer)

    clients = [await connect() for _ in range(3)]
    for client in clients:
        assert isinstance(await client.hello(), Welcome)
    fourth = await connect()
    [error] = await fourth.frames_until_closed()
    fourth.close()
    for client in clients:
        client.close()

    assert isinstance(error, Error) and error.code == ErrorCode.TOO_MANY_CONNECTIONS
    assert "--max-connections)" in error.message
    assert limit_hits(broker)["max-connections-per-peer"] == 0


@pytest.mark.slow
async def test_accept_errors_are_counted_and_logged_once_per_burst(
    broker_factory: Callable[..., Any],
) -> None:
    """Descriptors used up elsewhere (silent sockets on the metrics listener, which
    keeps each for its 5 s request timeout): the daemon's accept() fails with EMFILE;
    that is one log line and a count, not a traceback per failure. Once the metrics
    sockets time out, a good client gets in."""
    # asyncio's loop: uvloop's libuv accepts and closes the excess connections itself,
    # and the daemon never hears of a failed accept (README, the --loop option).
    broker = broker_factory(open_files=OPEN_FILES, extra_args=("--loop", "asyncio"))
    metrics = ("127.0.0.1", broker.metrics_port)
    assert limit_hits(broker)["accept-errors"] == 0  # and the metrics listener is open
    hogs = [socket.create_connection(metrics) for _ in range(OPEN_FILES)]
    knocks = [socket.create_connection(broker.address) for _ in range(20)]
    broker.wait_for_log(lambda line: "cannot accept connections" in line)
    for hog in hogs:  # the daemon closes each after its request timeout
        hog.settimeout(10.0)
        while hog.recv(65536):
            pass
        hog.close()
    for knock in knocks:
        knock.close()
    good = await Client.connect(broker.address, source=GOOD)
    assert isinstance(await good.hello(), Welcome)
    good.close()

    assert limit_hits(broker)["accept-errors"] >= 1
    log = broker.stderr_text()
    assert count_lines(broker, "cannot accept connections") == 1
    assert "Traceback" not in log
    assert "out of system resource" not in log
