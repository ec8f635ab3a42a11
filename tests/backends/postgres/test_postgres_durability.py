"""Durable defaults on PostgreSQL: sends commit to disk unless the URL says otherwise,
the sends that come together share one commit (group commit), and the statements that
can only make a message come again (takes, leases, acknowledgements) do not wait for
the disk."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from backends.postgres.backend import PostgresBackend, PostgresOptions
from tests import pg_server
from tests.backends.postgres.test_postgres import connected

LONG_S = 60.0


@pytest.fixture
def url() -> str:
    return pg_server.backend_url("postgresql://")


@pytest.fixture
def ns() -> str:
    return f"ns-{uuid.uuid4().hex[:8]}"


async def server_default(url: str) -> str:
    conn = await asyncpg.connect(url.split("?", 1)[0])
    try:
        setting: str = await conn.fetchval("SHOW synchronous_commit")
    finally:
        await conn.close()
    return setting


async def session_setting(backend: PostgresBackend) -> str:
    setting: str = await backend._db.fetchval("SHOW synchronous_commit")
    return setting


async def test_sends_commit_as_the_server_says_unless_the_url_says_off(url: str) -> None:
    async with connected(url) as backend:
        assert await session_setting(backend) == await server_default(url)
    async with connected(f"{url}&synchronous_commit=off") as backend:
        assert await session_setting(backend) == "off"


async def test_takes_and_acknowledgements_do_not_wait_for_the_disk(url: str, ns: str) -> None:
    """Losing one of those to a crash of PostgreSQL delivers a message again, never
    loses one: they commit without waiting for their WAL (set in their functions)."""
    async with connected(url) as backend:
        assert await backend.send(ns, "work", b"x", capacity=10, expiry_s=LONG_S)
        schema = f'"{PostgresOptions.from_url(url).schema}"'
        conn = await asyncpg.connect(url.split("?", 1)[0])
        try:
            for call in (
                f"SELECT * FROM {schema}.lease($1, 'work', 1, 7, 60)",
                f"SELECT {schema}.ack(ARRAY[$1], ARRAY['work'], '{{0}}', '{{7}}')",
                f"SELECT * FROM {schema}.take($1, 'work', 1, false)",
            ):
                async with conn.transaction():
                    await conn.execute("SET LOCAL synchronous_commit = on")
                    await conn.fetch(call, ns)
                    assert await conn.fetchval("SHOW synchronous_commit") == "off", call
        finally:
            await conn.close()
        await backend.flush(ns)


async def test_sends_that_come_together_share_a_commit_in_order(url: str, ns: str) -> None:
    """1. 100 sends at once from as many callers: to 20 channels, and 10 to a channel
       with room for 5.
    2. They took a few statements, not 100; each channel holds its sends in the order
       they were made; the first 5 of the 10 were accepted, the rest refused."""
    async with connected(url) as backend:
        batches = backend._sends.batches
        before = batches.statements

        async def send(channel: str, payload: bytes, capacity: int = 100) -> bool:
            return await backend.send(ns, channel, payload, capacity=capacity, expiry_s=LONG_S)

        spread = [send(f"work-{n % 20}", b"%d" % n) for n in range(90)]
        tight = [send("tight", b"%d" % n, capacity=5) for n in range(10)]
        outcomes = await asyncio.gather(*spread, *tight)
        statements = batches.statements - before
        assert outcomes == [True] * 95 + [False] * 5
        assert statements <= 10, f"{statements} statements for 100 sends"
        for k in range(20):
            taken = await backend.take(ns, f"work-{k}", 10, hold=True)
            assert [int(t.payload) for t in taken] == list(range(k, 90, 20))
        taken = await backend.take(ns, "tight", 10, hold=True)
        assert [int(t.payload) for t in taken] == [0, 1, 2, 3, 4]
        await backend.flush(ns)
