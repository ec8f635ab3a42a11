"""Redis killed and restarted under traffic: the daemon stays up, says so, and resumes.

Uses a throwaway redis-server of its own (never the shared one), with an fsync'ed
append-only file so that what Redis accepted survives its SIGKILL.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests import servers
from tests.broker.http_client import http_get

MESSAGES = 300
KILL_AT = 100
OUTAGE_S = 0.6
#: The daemon's per-operation deadline for this test (the ``timeout`` URL option).
TIMEOUT_S = 1.0
DELIVERY_TIMEOUT_S = 15.0


@pytest.fixture(scope="module")
def redis_server() -> Iterator[servers.RedisServer]:
    if not servers.redis_available():
        pytest.fail("redis-server is needed for the Redis restart test", pytrace=False)
    server = servers.RedisServer(appendonly=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def backend_url(redis_server: servers.RedisServer) -> str:
    """The daemons of this module use the throwaway server (overrides the parameter)."""
    return f"{redis_server.url}?prefix={servers.session_prefix}&timeout={TIMEOUT_S}"


async def readiness(port: int) -> int:
    status, _ = await asyncio.to_thread(http_get, port, "/readyz")
    return status


async def test_redis_restart_mid_traffic_loses_nothing_accepted(
    own_broker: Any, make_own_layer: Callable[..., Any], redis_server: servers.RedisServer
) -> None:
    """1. A sender sends numbered messages to a consumer's own channel and to a
       normal channel pulled by a worker, all through one daemon.
    2. After ``KILL_AT`` messages Redis is SIGKILLed, and restarted ``OUTAGE_S`` later.
    3. Meanwhile sends fail fast with BrokerUnavailable (retried by the sender) and
       /readyz says 503; afterwards it says 200 again.
    4. Both readers get every accepted message exactly once, in order.
    """
    from broker.layer.channel_layer import BrokerUnavailable

    sender, consumer, worker = make_own_layer(), make_own_layer(), make_own_layer()
    own = await consumer.new_channel()
    work = f"work-{servers.session_prefix}"
    got: dict[str, list[int]] = {own: [], work: []}

    async def read(layer: Any, channel: str) -> None:
        while True:
            got[channel].append((await layer.receive(channel))["n"])

    readers = [asyncio.create_task(read(consumer, own)), asyncio.create_task(read(worker, work))]
    failures: list[float] = []
    outage: asyncio.Task[None] | None = None
    seen_down = False

    async def restart_redis() -> None:
        nonlocal seen_down
        await asyncio.to_thread(redis_server.kill)
        await asyncio.sleep(OUTAGE_S / 2)
        seen_down = await readiness(own_broker.metrics_port) == 503
        await asyncio.sleep(OUTAGE_S / 2)
        await asyncio.to_thread(redis_server.start)

    for n in range(MESSAGES):
        if n == KILL_AT:
            outage = asyncio.create_task(restart_redis())
        for channel in (own, work):
            while True:
                started = time.monotonic()
                try:
                    await sender.send(channel, {"n": n})
                    break
                except BrokerUnavailable:
                    failures.append(time.monotonic() - started)
                    await asyncio.sleep(0.05)
        await asyncio.sleep(0.002)
    assert outage is not None
    await outage

    async with asyncio.timeout(DELIVERY_TIMEOUT_S):
        while len(got[own]) < MESSAGES or len(got[work]) < MESSAGES:
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # a duplicate would show up now
    for task in readers:
        task.cancel()
    await asyncio.gather(*readers, return_exceptions=True)

    assert got[own] == list(range(MESSAGES))
    assert got[work] == list(range(MESSAGES))
    assert failures, "sends during the outage were refused"
    assert max(failures) < TIMEOUT_S + 1.0, "a refused send took about the stated timeout at most"
    assert seen_down, "/readyz said 503 while Redis was down"
    assert await readiness(own_broker.metrics_port) == 200
