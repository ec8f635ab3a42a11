"""Leases to consumers on PostgreSQL (``backends.LeasesToConsumers``): a worker's message
stays leased until the consumer's layer acknowledges it; one whose lease lapses (its
DELIVER or its ACK was lost) is taken again from its place in the queue."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

import asyncpg
import pytest

from backends import LeasesToConsumers, RenewsLeases
from backends.postgres.backend import PostgresBackend, PostgresOptions
from backends.postgres.batching import ACK_RETRY_S
from broker.daemon.capacity import CapacityPolicy
from tests import pg_server
from tests.backends.postgres.test_postgres import connected
from tests.backends.postgres.test_postgres_leases import lease_as_a_dying_daemon
from tests.backends.postgres.test_postgres_takes import fill, pull, stored

#: The shortest lease the URL allows.
LEASE_S = 1.0
#: Long enough for a lease of ``LEASE_S`` to lapse, and for a statement or two.
LAPSE_WAIT_S = LEASE_S + 2.0


@pytest.fixture
def url() -> str:
    return pg_server.backend_url("postgresql://")


@pytest.fixture
def ns() -> str:
    return f"ns-{uuid.uuid4().hex[:8]}"


async def lapse() -> None:
    """Wait out a lease (the fault the test stands for lasts this long)."""
    await asyncio.sleep(LEASE_S + 0.1)


async def until_stored(url: str, ns: str, expected: list[int], where: str = "true") -> None:
    async with asyncio.timeout(LAPSE_WAIT_S):
        while await stored(url, ns, where=where) != expected:
            await asyncio.sleep(0.05)


async def test_a_consumer_lease_not_acknowledged_gives_its_messages_back_in_place(
    url: str, ns: str
) -> None:
    """1. Three messages wait; a consumer's take leases the first two, each with a lease
       of its own, and never acknowledges them (its DELIVERs were lost with their
       connection: ``abandon``, and renewal stops).
    2. They stay in the database, leased: nothing deletes them.
    3. Once the lease lapsed the next takes get them again, first and in order, then
       the third; the daemon counts the two as given back."""
    async with connected(f"{url}&prefetch=0&lease={LEASE_S:g}") as backend:
        assert isinstance(backend, LeasesToConsumers)
        await fill(backend, ns, 3)
        taken = await backend.take_leased(ns, "work", 2)
        assert [t.payload for t in taken] == [b"0", b"1"]
        assert taken[0].lease and taken[1].lease and taken[0].lease != taken[1].lease
        backend.abandon(ns, "work", [t.lease for t in taken])
        await lapse()
        assert await stored(url, ns, where="true") == [0, 1, 2], "leased, never deleted"
        assert await pull(backend, ns, 4) == [0, 1, 2]
        assert backend.stats().given_back_total == 2
        await backend.flush(ns)


async def test_an_acknowledged_lease_ends_and_a_malformed_one_is_ignored(url: str, ns: str) -> None:
    """A consumer acknowledges its message (with leases of no take of ours, and one
    out of a bigint's range): it is deleted, and nothing comes back."""
    async with connected(f"{url}&prefetch=0&lease={LEASE_S:g}") as backend:
        await fill(backend, ns, 2)
        (taken,) = await backend.take_leased(ns, "work", 1)
        bad = ["not.a-lease", "1.2.3", f"{2**63}.1", ""]
        await backend.acknowledge(ns, "work", [*bad, taken.lease])
        await until_stored(url, ns, [1])
        await lapse()
        assert await pull(backend, ns, 2) == [1]
        assert backend.stats().given_back_total == 0
        await backend.flush(ns)


async def test_any_daemon_ends_a_consumer_lease(url: str, ns: str) -> None:
    """The consumer's layer reconnected to another daemon: its ACK, there, ends the
    lease the first daemon's take made (storage is shared)."""
    async with connected(f"{url}&prefetch=0") as first, connected(url) as second:
        await fill(first, ns, 1)
        (taken,) = await first.take_leased(ns, "work", 1)
        await second.acknowledge(ns, "work", [taken.lease])
        await until_stored(url, ns, [])


async def test_an_acknowledgement_that_fails_is_tried_again(url: str, ns: str) -> None:
    """1. A consumer acknowledges a message while the statement fails (PostgreSQL away).
    2. Once it works again the acknowledgement is written: the message is deleted
       before its lease lapses, and no other consumer gets it."""
    async with connected(f"{url}&prefetch=0&lease=5") as backend:
        taker = backend._taker
        working = taker._sql
        failing = "SELECT $1::text[], $2::text[], $3::bigint[], $4::bigint[], 1 / 0"
        await fill(backend, ns, 1)
        (taken,) = await backend.take_leased(ns, "work", 1)
        taker._sql = dataclasses.replace(working, ack=failing)
        await backend.acknowledge(ns, "work", [taken.lease])
        await asyncio.sleep(ACK_RETRY_S * 1.5)  # one try failed, perhaps two
        assert await stored(url, ns, where="true") == [0]
        taker._sql = working
        await until_stored(url, ns, [])


async def test_a_take_after_a_lapsed_lease_says_more_may_wait(url: str, ns: str) -> None:
    """Messages whose lease lapsed are counted out already, so the counts alone would
    say nothing more waits: a take that got one says more may (schema version 7), so
    the next pull is woken at once instead of at the next re-check."""
    async with connected(f"{url}&prefetch=0") as backend:
        await fill(backend, ns, 3)
        await lease_as_a_dying_daemon(url, ns, 3, 0.2)
        await asyncio.sleep(0.3)
        conn = await asyncpg.connect(url.split("?", 1)[0])
        try:
            schema = PostgresOptions.from_url(url).schema
            rows = await conn.fetch(
                f'SELECT * FROM "{schema}".lease($1, $2, $3, $4, $5)', ns, "work", 1, 7, 60.0
            )
        finally:
            await conn.close()
        assert [(row["leased_payload"], row["more"], row["lapsed"]) for row in rows] == [
            (b"0", True, True)
        ]
        await backend.flush(ns)


async def test_a_lease_is_renewed_until_its_connection_is_abandoned(url: str, ns: str) -> None:
    """1. A consumer's take leases a message; its ACK is late (the consumer is busy)
       by three leases: the daemon renews the lease meanwhile, so it never waits free
       for another daemon's take.
    2. Its connection closes unacknowledged (``abandon``): the lease lapses within a
       lease, and the message waits free again, in its place (issue 15: a busy
       worker's message went to another worker too)."""
    async with connected(f"{url}&prefetch=0&lease={LEASE_S:g}") as backend:
        await fill(backend, ns, 2)
        (taken,) = await backend.take_leased(ns, "work", 1)
        for _ in range(3):
            await lapse()
            assert await stored(url, ns) == [1], "still leased: renewed"
        backend.abandon(ns, "work", [taken.lease])
        await until_stored(url, ns, [0, 1])
        await backend.flush(ns)


async def test_one_statement_renews_every_lease_held_and_no_other(url: str, ns: str) -> None:
    """Three consumers' takes on two channels, one of them abandoned; their leases are
    made to run out in a second. One renewal (one statement) gives the two held a whole
    lease again, and leaves the abandoned one to lapse."""
    async with connected(f"{url}&prefetch=0&lease=30") as backend:
        items = [("work", b"0"), ("work", b"1"), ("other", b"2")]
        assert await backend.send_many(ns, items, capacity_of=CapacityPolicy(10), expiry_s=60) == []
        for channel in ("work", "other"):
            assert await backend.take_leased(ns, channel, 1)
        (abandoned,) = await backend.take_leased(ns, "work", 1)
        backend.abandon(ns, "work", [abandoned.lease])
        await shorten_leases(url, ns, 1.0)
        await backend._taker.held.renew_once()
        left = await lease_left_s(url, ns)
        assert left[b"0"] > 20 and left[b"2"] > 20, left
        assert left[b"1"] <= 1, left
        assert len(backend._taker.held) == 2
        await backend.flush(ns)


async def shorten_leases(url: str, ns: str, seconds: float) -> None:
    """Every lease of ``ns`` runs out ``seconds`` from now (as if time had passed)."""
    schema = PostgresOptions.from_url(url).schema
    conn = await asyncpg.connect(url.split("?", 1)[0])
    try:
        await conn.execute(
            f'UPDATE "{schema}".messages SET lease_until = now() + make_interval(secs => $2)'
            " WHERE ns = $1 AND lease IS NOT NULL",
            ns,
            seconds,
        )
    finally:
        await conn.close()


async def lease_left_s(url: str, ns: str) -> dict[bytes, float]:
    """Each leased message's payload -> seconds its lease still runs."""
    schema = PostgresOptions.from_url(url).schema
    conn = await asyncpg.connect(url.split("?", 1)[0])
    try:
        rows = await conn.fetch(
            "SELECT payload, extract(epoch FROM lease_until - now())::float8"
            f' FROM "{schema}".messages WHERE ns = $1 AND lease IS NOT NULL',
            ns,
        )
    finally:
        await conn.close()
    return {bytes(row[0]): row[1] for row in rows}


def test_the_backend_leases_to_consumers() -> None:
    assert issubclass(PostgresBackend, LeasesToConsumers)
    assert issubclass(PostgresBackend, RenewsLeases)
