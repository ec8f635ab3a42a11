"""Leases on PostgreSQL: a worker's message stays in the database, leased to the daemon
that took it, until that daemon has handed it out; a lease that lapses (its daemon died,
or could not put it back) leaves the message in its place for any daemon to take again,
and the channel's counts stay exact throughout."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

import asyncpg
import pytest

from backends.postgres.backend import TAKE_AHEAD_LINGER_S, PostgresBackend, PostgresOptions
from backends.postgres.batching import ACK_DELAY_S
from backends.records import Taken
from tests import pg_server
from tests.backends.postgres.test_postgres import connected
from tests.backends.postgres.test_postgres_takes import (
    FREE,
    drained_into_ahead,
    fill,
    pull,
    stored,
)

LONG_S = 60.0
#: A lease short enough to lapse within a test.
SHORT_LEASE_S = 0.3
#: A lapsed lease is found by a take at once, or by the re-check within its interval.
LAPSE_WAIT_S = 3.0


@pytest.fixture
def url() -> str:
    return pg_server.backend_url("postgresql://")


@pytest.fixture
def ns() -> str:
    return f"ns-{uuid.uuid4().hex[:8]}"


async def lease_as_a_dying_daemon(url: str, ns: str, count: int, lease_s: float) -> None:
    """Lease the oldest ``count`` messages of "work" as a daemon would just before it
    is killed: nobody acknowledges them or puts them back."""
    conn = await asyncpg.connect(url.split("?", 1)[0])
    try:
        schema = PostgresOptions.from_url(url).schema
        rows = await conn.fetch(
            f'SELECT * FROM "{schema}".lease($1, $2, $3, $4, $5)', ns, "work", count, 42, lease_s
        )
    finally:
        await conn.close()
    assert len(rows) == count


async def send(backend: PostgresBackend, ns: str, payload: bytes, capacity: int = 5) -> bool:
    return await backend.send(ns, "work", payload, capacity=capacity, expiry_s=LONG_S)


async def test_a_lapsed_lease_gives_the_messages_back_in_their_places(url: str, ns: str) -> None:
    """1. Five messages; a daemon leases the first two (they count as taken) and dies.
    2. Another takes the other three; five more fit. Once the lease lapses it takes the
       two first, then the rest.
    3. Capacity counted each message once: five fit again once all are taken.
    """
    async with connected(f"{url}&prefetch=0") as backend:
        await fill(backend, ns, 5)
        await lease_as_a_dying_daemon(url, ns, 2, SHORT_LEASE_S)
        assert await pull(backend, ns, 4) == [2, 3, 4]
        assert [await send(backend, ns, b"99") for _ in range(6)] == [True] * 5 + [False]
        async with asyncio.timeout(LAPSE_WAIT_S):
            while await stored(url, ns) != [0, 1] + [99] * 5:  # until the lease lapses
                await asyncio.sleep(0.05)
        assert await pull(backend, ns, 8) == [0, 1] + [99] * 5
        assert [await send(backend, ns, b"7") for _ in range(6)] == [True] * 5 + [False]
        await backend.flush(ns)


async def test_a_message_handed_out_is_deleted_a_moment_later(url: str, ns: str) -> None:
    async with connected(f"{url}&prefetch=0") as backend:
        await fill(backend, ns, 2)
        assert await pull(backend, ns, 1) == [0]
        assert await stored(url, ns) == [1], "leased, then deleted: never free again"
        async with asyncio.timeout(ACK_DELAY_S + 2):
            while await stored(url, ns, where="true") != [1]:
                await asyncio.sleep(ACK_DELAY_S)
        await backend.flush(ns)


async def test_a_failed_put_back_loses_nothing(url: str, ns: str) -> None:
    """1. Two messages wait taken ahead (leased) in one daemon.
    2. Putting them back fails (the statement errs).
    3. Once their lease lapses another daemon takes both, in order.
    """
    async with connected(f"{url}&lease=1") as busy, connected(url) as other:
        taker = busy._taker
        failing = "SELECT $1::text, $2::text, $3::bigint[], $4::bigint[], 1 / 0"
        taker._sql = dataclasses.replace(taker._sql, unlease=failing)
        await drained_into_ahead(busy, url, ns)
        async with asyncio.timeout(TAKE_AHEAD_LINGER_S * 4 + 1):
            while busy._takes.waiting_ahead(ns, "work"):  # until the put-back is tried
                await asyncio.sleep(TAKE_AHEAD_LINGER_S)
        assert await stored(url, ns, where=f"NOT {FREE}") == [4, 5], "still leased"
        taken: list[int] = []
        async with asyncio.timeout(LAPSE_WAIT_S):  # each lapses with the take it came in
            while len(taken) < 2:
                taken += await pull(other, ns, 1)
                await asyncio.sleep(0.05)
        assert taken == [4, 5]
        await other.flush(ns)


async def test_leased_messages_that_expire_are_not_uncounted_twice(url: str, ns: str) -> None:
    async with connected(f"{url}&prefetch=0") as backend:
        await fill(backend, ns, 3, expiry_s=0.2)
        await lease_as_a_dying_daemon(url, ns, 3, LONG_S)
        await asyncio.sleep(0.3)
        await backend._sweeper.sweep()
        assert await stored(url, ns, where="true") == [], "swept"
        assert [await send(backend, ns, b"1", capacity=3) for _ in range(4)] == [True] * 3 + [False]
        await backend.flush(ns)


async def test_a_push_taken_again_after_its_daemon_died_is_held_once(url: str, ns: str) -> None:
    """1. Three messages of a client's own channel (capacity 3); a daemon takes them for
       a push, counted as held and leased to it, and is killed.
    2. Once the lease lapses another daemon takes them for a push again, and its
       consumer acknowledges them.
    3. Three fit again: the dead daemon's held count went to the new taker, whose ACK
       released it (counted twice, the channel stayed full while it stayed busy).
    """
    channel = "pushed.client!abc"
    async with connected(f"{url}&prefetch=0") as backend:
        for n in range(3):
            assert await backend.send(ns, channel, b"%d" % n, capacity=3, expiry_s=LONG_S)
        conn = await asyncpg.connect(url.split("?", 1)[0])
        try:  # the daemon's own statement, under its lease, by a daemon about to die
            args = (ns, [channel], 3, 42 << 32, SHORT_LEASE_S)
            assert len(await conn.fetch(backend._taker._sql.push_take, *args)) == 3
        finally:
            await conn.close()
        taken: list[Taken] = []
        async with asyncio.timeout(LAPSE_WAIT_S):  # until the lease lapses
            while not taken:
                await asyncio.sleep(0.05)
                taken = (await backend.take_many(ns, [channel], 3, hold=True))[channel]
        assert [item.payload for item in taken] == [b"0", b"1", b"2"]
        await backend.release_taken(ns, channel, 3, [item.lease for item in taken])
        sent = [await backend.send(ns, channel, b"9", capacity=3, expiry_s=LONG_S) for _ in "1234"]
        assert sent == [True] * 3 + [False]
        await backend.flush(ns)
