"""Redis or PostgreSQL restarted under traffic: the daemon stays up, says so, reconnects,
resumes.

One body, once per storage. Each is a throwaway server of the test's own, never the
shared one: a redis-server with an fsync'ed append-only file, so that what Redis
accepted survives its SIGKILL; a PostgreSQL made with initdb and pg_ctl on a free port,
stopped fast (open transactions roll back, every connection is cut) rather than
killed, since it runs without fsync.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests import pg_server, servers
from tests.broker.daemon.traffic import Readers, assert_once_in_order, send_until_accepted
from tests.broker.http_client import http_get

MESSAGES = 300
#: The message before which the storage goes away.
OUTAGE_AT = 100
#: Pause between two sends, so that the outage meets messages still coming. (These
#: numbers once failed the PostgreSQL case one run in ten: the daemon's LISTEN ping met
#: asyncpg's InternalClientError, "another operation is in progress", which it did not
#: catch, and its re-check task died.)
SEND_INTERVAL_S = 0.004
#: The daemon's per-operation deadline for this test (the ``timeout`` URL option).
TIMEOUT_S = 1.0
#: How long the sender's layer sends a refused send again (its ``connect_timeout``).
RESEND_FOR_S = 0.2
#: How often the daemon re-checks PostgreSQL for messages whose notification it missed.
RECHECK_S = 0.2


@dataclass(frozen=True)
class Storage:
    """A throwaway storage server, and what the test does with it."""

    server: servers.RedisServer | pg_server.PostgresServer
    #: The daemon's ``--backend``.
    url: str
    #: Starts the outage; ``server.start()`` ends it.
    take_down: Callable[[], None]
    #: How long the storage stays away before it is started again; /readyz is asked
    #: halfway through. PostgreSQL's stop and start take their own while (pg_ctl -w).
    outage_s: float
    #: Whether a send the sender retried may arrive twice. PostgreSQL's stop can cut a
    #: send off between its COMMIT and its answer; with Redis, this test has always
    #: asked for exactly once.
    retried_may_repeat: bool
    remove: Callable[[], None]


def redis_storage() -> Storage:
    if not servers.redis_available():
        pytest.fail("redis-server is needed for the Redis restart test", pytrace=False)
    server = servers.RedisServer(appendonly=True)
    server.start()
    url = f"{server.url}?prefix={servers.session_prefix}&timeout={TIMEOUT_S}"
    return Storage(
        server, url, server.kill, outage_s=0.6, retried_may_repeat=False, remove=server.stop
    )


def postgres_storage() -> Storage:
    if not pg_server.can_make_servers():
        pytest.fail("initdb and pg_ctl are needed for the PostgreSQL restart test", pytrace=False)
    server = pg_server.PostgresServer()
    server.start()
    url = f"{server.url}?timeout={TIMEOUT_S}&recheck_interval={RECHECK_S}"
    return Storage(
        server, url, server.stop, outage_s=0.0, retried_may_repeat=True, remove=server.cleanup
    )


@pytest.fixture(
    scope="module", params=[redis_storage, postgres_storage], ids=["redis", "postgresql"]
)
def storage(request: pytest.FixtureRequest) -> Iterator[Storage]:
    made: Storage = request.param()
    yield made
    made.remove()


@pytest.fixture(scope="module")
def backend_url(storage: Storage) -> str:
    """The daemons of this module use the throwaway server (overrides the parameter)."""
    return storage.url


async def readiness(port: int) -> int:
    status, _ = await asyncio.to_thread(http_get, port, "/readyz")
    return status


async def test_storage_restart_mid_traffic_loses_nothing_accepted(
    own_broker: Any,
    make_own_layer: Callable[..., Any],
    storage: Storage,
    unique: Callable[[str], str],
) -> None:
    """1. A sender sends numbered messages to a consumer's own channel and to a
       normal channel pulled by a worker, all through one daemon.
    2. After ``OUTAGE_AT`` messages the storage goes away (Redis: SIGKILL; PostgreSQL:
       a fast stop) and is started again (Redis after ``outage_s``).
    3. Meanwhile sends fail within the stated timeout with BrokerUnavailable (the
       sender retries them) and /readyz says 503; afterwards it says 200 again.
    4. The daemon reconnects (on PostgreSQL, LISTENs again) by itself: both readers get
       every accepted message, once and in order. On PostgreSQL, a send cut off between
       its commit and its answer was retried, so it may come twice (once per send),
       never out of order.
    """
    # A short connect_timeout: the layer sends a refused send again only that long
    # (with its message id), so that refusals through the outage reach the test.
    sender = make_own_layer(connect_timeout=RESEND_FOR_S)
    consumer, worker = make_own_layer(), make_own_layer()
    channels = [await consumer.new_channel(), unique("work")]
    refusals: list[float] = []
    retried: set[int] = set()
    seen_down = False
    sends: list[tuple[float, float]] = []
    back: list[float] = []

    async def outage() -> None:
        nonlocal seen_down
        await asyncio.to_thread(storage.take_down)
        await asyncio.sleep(storage.outage_s / 2)
        seen_down = await readiness(own_broker.metrics_port) == 503
        await asyncio.sleep(storage.outage_s / 2)
        await asyncio.to_thread(storage.server.start)
        back.append(time.monotonic())

    async with Readers(zip((consumer, worker), channels, strict=True)) as readers:
        outage_task: asyncio.Task[None] | None = None
        for n in range(MESSAGES):
            if n == OUTAGE_AT:
                outage_task = asyncio.create_task(outage())
            for channel in channels:
                started = time.monotonic()
                refused = await send_until_accepted(sender, channel, {"n": n})
                sends.append((started, time.monotonic()))
                if refused:
                    refusals += refused
                    retried.add(n)
            await asyncio.sleep(SEND_INTERVAL_S)
        assert outage_task is not None
        await outage_task
        await readers.wait_for_all(MESSAGES)

    may_repeat = retried if storage.retried_may_repeat else set()
    for channel in channels:
        assert_once_in_order(readers.got[channel], MESSAGES, may_repeat)
    # Sends met the outage: refused, or (send windows: the layer sends again what storage
    # failed) waiting until storage was back.
    waited = [start for start, end in sends if start < back[0] <= end]
    assert refusals or waited, "no send met the outage"
    assert max(refusals, default=0) < TIMEOUT_S + RESEND_FOR_S + 1.0, (
        "a refused send took about the stated timeout at most (and the layer's resends)"
    )
    assert seen_down, "/readyz said 503 while the storage was down"
    assert await readiness(own_broker.metrics_port) == 200
