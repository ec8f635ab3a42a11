"""Takes of busy normal channels on PostgreSQL: some messages taken ahead of the pulls
(``backends/postgres/take_ahead.py``), under leases, and none of them lost, repeated or
reordered."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest

from backends import BackendError
from backends.postgres.backend import TAKE_AHEAD_LINGER_S, PostgresBackend
from backends.postgres.take_ahead import Ahead
from backends.postgres.url import PostgresOptions
from broker.daemon.capacity import CapacityPolicy
from tests import pg_server
from tests.backends.postgres.test_postgres import connected
from tests.backends.test_backend_contract import WakeupLog

LONG_S = 60.0
#: Longer than a message taken ahead stays unwanted before it goes back.
PAST_LINGER_S = TAKE_AHEAD_LINGER_S * 4


@pytest.fixture
def url() -> str:
    return pg_server.backend_url("postgresql://")


@pytest.fixture
def ns() -> str:
    return f"ns-{uuid.uuid4().hex[:8]}"


async def fill(backend: PostgresBackend, ns: str, count: int, expiry_s: float = LONG_S) -> None:
    items = [("work", b"%d" % n) for n in range(count)]
    capacity = CapacityPolicy(1000)
    assert await backend.send_many(ns, items, capacity_of=capacity, expiry_s=expiry_s) == []


async def pull(backend: PostgresBackend, ns: str, times: int) -> list[int]:
    """``times`` takes of one message each, as busy workers' receives are."""
    got: list[int] = []
    for _ in range(times):
        got += [int(m.payload) for m in await backend.take(ns, "work", 1, hold=False)]
    return got


async def settled(backend: PostgresBackend, ns: str) -> int:
    """How many messages of "work" the backend holds taken ahead, once no round is under way."""
    async with asyncio.timeout(2):
        while backend._takes._tasks:
            await backend._takes.settled()
    return backend._takes.waiting_ahead(ns, "work")


async def drained_into_ahead(backend: PostgresBackend, url: str, ns: str) -> None:
    """Six messages, four pulls: the last two wait taken ahead, none free in the database
    (pulls 1 and 2 take one each; 3 takes three; 4 is served from them and tops up)."""
    await fill(backend, ns, 6)
    assert await pull(backend, ns, 4) == [0, 1, 2, 3]
    assert await settled(backend, ns) == 2
    assert await stored(url, ns) == []


#: Messages that wait free in the database: never leased, or their lease lapsed.
FREE = "(lease IS NULL OR lease_until <= now())"


async def rows(
    url: str, ns: str, columns: str = "id, expires_at", where: str = FREE
) -> list[asyncpg.Record]:
    """``columns`` of the namespace's messages in the database (those ``where`` says:
    free ones by default), oldest first."""
    conn = await asyncpg.connect(url.split("?", 1)[0])
    try:
        schema = PostgresOptions.from_url(url).schema
        query = f'SELECT {columns} FROM "{schema}".messages WHERE ns = $1 AND {where} ORDER BY id'
        found: list[asyncpg.Record] = await conn.fetch(query, ns)
    finally:
        await conn.close()
    return found


async def stored(url: str, ns: str, where: str = FREE) -> list[int]:
    """The numbers of the namespace's messages free in the database, oldest first."""
    return [int(row[0]) for row in await rows(url, ns, "payload", where)]


async def test_a_busy_channel_is_taken_ahead_and_pulls_are_served_in_order(
    url: str, ns: str
) -> None:
    async with connected(url) as backend:
        await fill(backend, ns, 200)
        assert await pull(backend, ns, 20) == list(range(20))
        ahead = await settled(backend, ns)
        assert 0 < ahead <= backend.options.prefetch
        # What was taken ahead is leased to this daemon; the rest waits free, in order.
        assert await stored(url, ns) == list(range(20 + ahead, 200))
        assert await pull(backend, ns, 180) == list(range(20, 200))
        await backend.flush(ns)


async def test_what_no_pull_wants_goes_back_in_its_place_for_other_daemons(
    url: str, ns: str
) -> None:
    quiet = f"{url}&recheck_interval=60"
    async with connected(url) as busy, connected(quiet) as other:
        heard = WakeupLog()
        other.set_wakeup(heard)
        other.watch(ns, "work")
        await drained_into_ahead(busy, url, ns)
        heard.calls.clear()
        # Only the put-back's notification can wake it (its re-check is a minute away).
        await heard.wait_for({(ns, "work")}, timeout_s=PAST_LINGER_S + 0.5)
        assert busy._takes.waiting_ahead(ns, "work") == 0
        assert await stored(url, ns) == [4, 5]
        assert await pull(other, ns, 3) == [4, 5]
        await busy.flush(ns)


async def test_taking_from_what_was_taken_ahead_wakes_the_next_pull(url: str, ns: str) -> None:
    async with connected(url) as backend:
        log = WakeupLog()
        backend.set_wakeup(log)
        await drained_into_ahead(backend, url, ns)
        log.calls.clear()
        assert await pull(backend, ns, 1) == [4]
        assert (ns, "work") in log.calls, "one is left: the router must hear of it"
        await backend.flush(ns)


@pytest.mark.parametrize("prefetch", ["64", "0"])
async def test_a_take_given_up_under_way_leaves_its_message_to_the_next(
    url: str, ns: str, prefetch: str
) -> None:
    async with connected(f"{url}&prefetch={prefetch}") as backend:
        await fill(backend, ns, 5)
        given_up = asyncio.create_task(backend.take(ns, "work", 1, hold=False))
        await asyncio.sleep(0)  # its round is under way
        given_up.cancel()
        await settled(backend, ns)
        assert await pull(backend, ns, 6) == [0, 1, 2, 3, 4]
        await backend.flush(ns)


async def test_closing_puts_back_what_was_taken_ahead(url: str, ns: str) -> None:
    async with connected(url) as other:
        async with connected(url) as busy:
            await fill(busy, ns, 50)
            assert await pull(busy, ns, 5) == list(range(5))
            assert await settled(busy, ns) > 0
        assert await pull(other, ns, 45) == list(range(5, 50))
        await other.flush(ns)


async def test_messages_put_back_keep_their_place_and_expiry(url: str, ns: str) -> None:
    async with connected(url) as backend:
        await fill(backend, ns, 6)
        before = await rows(url, ns)
        assert await pull(backend, ns, 4) == [0, 1, 2, 3]
        assert await settled(backend, ns) == 2
        async with asyncio.timeout(PAST_LINGER_S + 1):
            while not await rows(url, ns):  # until they are put back
                await asyncio.sleep(0.01)
        after = await rows(url, ns)
        assert [row[0] for row in after] == [row[0] for row in before][4:]  # same ids
        for (_, was), (_, now) in zip(before[4:], after, strict=True):
            assert abs((now - was).total_seconds()) < 0.05
        await backend.flush(ns)


async def test_what_was_taken_ahead_counts_against_capacity(url: str, ns: str) -> None:
    async with connected(url) as backend:

        async def send() -> bool:
            return await backend.send(ns, "work", b"99", capacity=10, expiry_s=LONG_S)

        assert all([await send() for _ in range(10)])
        assert await pull(backend, ns, 4) == [99] * 4
        assert await settled(backend, ns) > 0
        assert [await send() for _ in range(5)] == [True] * 4 + [False]
        await backend.flush(ns)


async def test_flush_drops_what_was_taken_ahead(url: str, ns: str) -> None:
    async with connected(url) as backend:
        await fill(backend, ns, 40)
        assert await pull(backend, ns, 3) == [0, 1, 2]
        assert await settled(backend, ns) > 0
        await backend.flush(ns)
        assert backend._takes.waiting_ahead(ns, "work") == 0
        assert await pull(backend, ns, 1) == []
        await asyncio.sleep(PAST_LINGER_S)
        assert await stored(url, ns) == []


async def test_prefetch_0_takes_only_what_is_asked(url: str, ns: str) -> None:
    async with connected(f"{url}&prefetch=0") as backend:
        await fill(backend, ns, 20)
        assert await pull(backend, ns, 10) == list(range(10))
        assert backend._takes.waiting_ahead(ns, "work") == 0
        assert await stored(url, ns) == list(range(10, 20))
        await backend.flush(ns)


async def test_a_pull_now_and_then_takes_nothing_ahead(url: str, ns: str) -> None:
    async with connected(url) as backend:
        await fill(backend, ns, 20)
        for n in range(3):
            assert await pull(backend, ns, 1) == [n]
            assert backend._takes.waiting_ahead(ns, "work") == 0
            await asyncio.sleep(PAST_LINGER_S * 2)
        await backend.flush(ns)


@pytest.mark.parametrize("value", ["-1", "x", "1.5", "1001"])
def test_bad_prefetch_is_refused_by_name(value: str) -> None:
    with pytest.raises(BackendError, match="prefetch"):
        PostgresOptions.from_url(f"postgresql://h/db?prefetch={value}")


async def test_what_was_taken_ahead_counts_against_capacity_in_group_sends(
    url: str, ns: str
) -> None:
    async with connected(url) as backend:
        await backend.group_add(ns, "room", "work", group_expiry_s=LONG_S)
        await fill(backend, ns, 10)
        assert await pull(backend, ns, 4) == [0, 1, 2, 3]
        assert await settled(backend, ns) > 0  # six wait, here and in the database

        async def group_send(capacity: int) -> tuple[list[str], int]:
            result = await backend.group_send(
                ns, "room", b"x", capacity_of=CapacityPolicy(capacity), expiry_s=LONG_S
            )
            return result.delivered, result.skipped

        assert await group_send(6) == ([], 1)
        assert await group_send(7) == (["work"], 0)
        await backend.flush(ns)


async def test_a_flush_of_another_namespace_under_way_drops_nothing_here(url: str, ns: str) -> None:
    async with connected(url) as backend:
        await fill(backend, ns, 20)
        assert await pull(backend, ns, 2) == [0, 1]  # busy from now on
        takes = backend._takes
        take_now = takes._take_now

        async def flushed_meanwhile(*args: Any) -> list[Ahead]:
            taken = await take_now(*args)
            takes.forget("another-namespace")  # as PostgresBackend.flush does
            return taken

        takes._take_now = flushed_meanwhile  # type: ignore[method-assign]
        assert await pull(backend, ns, 18) == list(range(2, 20))
        await backend.flush(ns)
