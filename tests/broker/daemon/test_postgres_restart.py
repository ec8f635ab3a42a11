"""PostgreSQL restarted under traffic: the daemon stays up, says so, reconnects, resumes.

Uses a throwaway PostgreSQL of its own (initdb and pg_ctl in a temporary directory, on
a free port), never the shared one.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests import pg_server
from tests.broker.http_client import http_get

MESSAGES = 200
RESTART_AT = 60
#: The daemon's per-operation deadline for this test (the ``timeout`` URL option).
TIMEOUT_S = 1.0
#: How often the daemon re-checks for messages whose notification it missed.
RECHECK_S = 0.2
DELIVERY_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def postgres() -> Iterator[pg_server.PostgresServer]:
    if not pg_server.can_make_servers():
        pytest.fail("initdb and pg_ctl are needed for the PostgreSQL restart test", pytrace=False)
    server = pg_server.PostgresServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def backend_url(postgres: pg_server.PostgresServer) -> str:
    """The daemons of this module use the throwaway server (overrides the parameter)."""
    return f"{postgres.url}?timeout={TIMEOUT_S}&recheck_interval={RECHECK_S}"


async def wait_for_all(got: dict[str, list[int]]) -> None:
    try:
        async with asyncio.timeout(DELIVERY_TIMEOUT_S):
            while any(len(set(received)) < MESSAGES for received in got.values()):
                await asyncio.sleep(0.05)
    except TimeoutError:
        missing = {ch: sorted(set(range(MESSAGES)) - set(got[ch])) for ch in got}
        pytest.fail(f"not delivered within {DELIVERY_TIMEOUT_S} s: {missing}")


def assert_once_in_order(received: list[int], retried: set[int]) -> None:
    """Every message, in order; only one whose send was retried may come twice."""
    repeated = {n for previous, n in itertools.pairwise(received) if n == previous}
    assert repeated <= retried, "only a retried send may arrive twice"
    assert list(dict.fromkeys(received)) == list(range(MESSAGES))


async def readiness(port: int) -> int:
    status, _ = await asyncio.to_thread(http_get, port, "/readyz")
    return status


async def test_postgres_restart_mid_traffic_loses_nothing_accepted(
    own_broker: Any,
    make_own_layer: Callable[..., Any],
    postgres: pg_server.PostgresServer,
    unique: Callable[[str], str],
) -> None:
    """1. A sender sends numbered messages to a consumer's own channel and to a
       normal channel pulled by a worker, all through one daemon.
    2. After ``RESTART_AT`` messages PostgreSQL is stopped (fast: open transactions
       roll back, every connection is cut) and started again.
    3. Meanwhile sends fail within the stated timeout with BrokerUnavailable (the
       sender retries them) and /readyz says 503; afterwards it says 200 again.
    4. The daemon reconnects and LISTENs again by itself: both readers get every
       accepted message, once and in order. The one exception is a send cut off
       between its commit and its answer: the sender retried it, so it may come twice
       (once per send), never out of order.
    """
    from broker.layer.channel_layer import BrokerUnavailable

    sender, consumer, worker = make_own_layer(), make_own_layer(), make_own_layer()
    own = await consumer.new_channel()
    work = unique("work")
    got: dict[str, list[int]] = {own: [], work: []}

    async def read(layer: Any, channel: str) -> None:
        while True:
            got[channel].append((await layer.receive(channel))["n"])

    readers = [asyncio.create_task(read(consumer, own)), asyncio.create_task(read(worker, work))]
    failures: list[float] = []
    retried: set[int] = set()
    seen_down = False

    async def restart_postgres() -> None:
        nonlocal seen_down
        await asyncio.to_thread(postgres.stop)
        seen_down = await readiness(own_broker.metrics_port) == 503
        await asyncio.to_thread(postgres.start)

    outage: asyncio.Task[None] | None = None
    for n in range(MESSAGES):
        if n == RESTART_AT:
            outage = asyncio.create_task(restart_postgres())
        for channel in (own, work):
            while True:
                started = time.monotonic()
                try:
                    await sender.send(channel, {"n": n})
                    break
                except BrokerUnavailable:
                    failures.append(time.monotonic() - started)
                    retried.add(n)
                    await asyncio.sleep(0.05)
        await asyncio.sleep(0.005)
    assert outage is not None
    await outage

    await wait_for_all(got)
    await asyncio.sleep(0.5)  # a duplicate would show up now
    for task in readers:
        task.cancel()
    await asyncio.gather(*readers, return_exceptions=True)

    for received in got.values():
        assert_once_in_order(received, retried)
    assert failures, "sends during the outage were refused"
    assert max(failures) < TIMEOUT_S + 1.0, "a refused send took about the stated timeout at most"
    assert seen_down, "/readyz said 503 while PostgreSQL was down"
    assert await readiness(own_broker.metrics_port) == 200
