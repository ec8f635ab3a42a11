"""Takes of busy normal channels on PostgreSQL: some messages taken ahead of the pulls
(``backends/postgres_takes.py``), and none of them lost, repeated or reordered."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest

from backends import BackendError, backend_from_url
from backends.postgres import TAKE_AHEAD_LINGER_S, PostgresBackend
from backends.postgres_url import PostgresOptions
from tests import pg_server
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


@asynccontextmanager
async def connected(url: str) -> AsyncIterator[PostgresBackend]:
    backend = backend_from_url(url)
    assert isinstance(backend, PostgresBackend)
    await backend.connect()
    try:
        yield backend
    finally:
        await backend.close()


async def fill(backend: PostgresBackend, ns: str, count: int, expiry_s: float = LONG_S) -> None:
    items = [("work", b"%d" % n) for n in range(count)]
    assert await backend.send_many(ns, items, capacity_of=lambda _: 1000, expiry_s=expiry_s) == []


async def pull(backend: PostgresBackend, ns: str, times: int) -> list[int]:
    """``times`` takes of one message each, as busy workers' receives are."""
    got: list[int] = []
    for _ in range(times):
        got += [int(m.payload) for m in await backend.take(ns, "work", 1, hold=False)]
    return got


async def settled(backend: PostgresBackend, ns: str) -> int:
    """How many messages of "work" the backend holds taken ahead, once no take is under way."""
    async with asyncio.timeout(2):
        takes = backend._takes
        while takes._rounds or any(line.busy for line in takes._lines.values()):
            await asyncio.sleep(0.001)
    return backend._takes.waiting_ahead(ns, "work")


async def stored(url: str, ns: str) -> list[int]:
    """The channel's messages in the database, oldest first."""
    conn = await asyncpg.connect(url.split("?", 1)[0])
    try:
        schema = PostgresOptions.from_url(url).schema
        rows = await conn.fetch(
            f'SELECT payload FROM "{schema}".messages WHERE ns = $1 ORDER BY id', ns
        )
    finally:
        await conn.close()
    return [int(row[0]) for row in rows]


async def test_a_busy_channel_is_taken_ahead_and_pulls_are_served_in_order(
    url: str, ns: str
) -> None:
    async with connected(url) as backend:
        await fill(backend, ns, 200)
        assert await pull(backend, ns, 20) == list(range(20))
        ahead = await settled(backend, ns)
        assert 0 < ahead <= backend.options.prefetch
        # What was taken ahead is out of the database, which keeps the rest in order.
        assert await stored(url, ns) == list(range(20 + ahead, 200))
        assert await pull(backend, ns, 180) == list(range(20, 200))
        await backend.flush(ns)


async def test_what_no_pull_wants_goes_back_in_its_place_for_other_daemons(
    url: str, ns: str
) -> None:
    async with connected(url) as busy, connected(url) as other:
        heard = WakeupLog()
        other.set_wakeup(heard)
        other.watch(ns, "work")
        await fill(busy, ns, 100)
        assert await pull(busy, ns, 10) == list(range(10))
        assert await settled(busy, ns) > 0
        heard.calls.clear()
        await heard.wait_for({(ns, "work")}, timeout_s=PAST_LINGER_S + 1)  # told, not polled
        assert busy._takes.waiting_ahead(ns, "work") == 0
        assert await stored(url, ns) == list(range(10, 100))
        assert await pull(other, ns, 90) == list(range(10, 100))
        await busy.flush(ns)


async def test_closing_puts_back_what_was_taken_ahead(url: str, ns: str) -> None:
    async with connected(url) as other:
        async with connected(url) as busy:
            await fill(busy, ns, 50)
            assert await pull(busy, ns, 5) == list(range(5))
            assert await settled(busy, ns) > 0
        assert await pull(other, ns, 45) == list(range(5, 50))
        await other.flush(ns)


async def test_messages_put_back_keep_their_expiry(url: str, ns: str) -> None:
    async with connected(url) as backend:
        await fill(backend, ns, 30, expiry_s=0.5)
        assert await pull(backend, ns, 5) == list(range(5))
        assert await settled(backend, ns) > 0
        await asyncio.sleep(0.6)  # put back meanwhile, and expired since
        assert await backend.take(ns, "work", 100, hold=False) == []


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
        await backend.flush(ns)
        assert backend._takes.waiting_ahead(ns, "work") == 0
        assert await pull(backend, ns, 1) == []
        await asyncio.sleep(PAST_LINGER_S)
        assert await stored(url, ns) == []


async def test_prefetch_0_takes_only_what_is_asked(url: str, ns: str) -> None:
    async with connected(f"{url}&prefetch=0" if "?" in url else f"{url}?prefetch=0") as backend:
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
