"""What only the PostgreSQL backend has: its URL, schema, sharing, wake-ups, sweep, faults.

The storage contract itself runs on PostgreSQL in ``test_backend_contract.py``; these
tests build their backends from the session's server, each in a schema of its own
(dropped after) where the schema is what they test.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import asyncpg
import pytest

from backends import BackendError, BackendUnavailable, backend_from_url
from backends.postgres.backend import PostgresBackend, PostgresOptions
from backends.postgres.schema import SCHEMA_VERSION, current_version, migrate
from broker.daemon.capacity import CapacityPolicy
from tests import pg_server
from tests.backends.test_backend_contract import WakeupLog
from tests.waits import RECOVERY_TIMEOUT_S

LONG_S = 60.0


@asynccontextmanager
async def connected(url: str) -> AsyncIterator[PostgresBackend]:
    backend = backend_from_url(url)
    assert isinstance(backend, PostgresBackend)
    await backend.connect()
    try:
        yield backend
    finally:
        await backend.close()


async def vacuum_until(backend: PostgresBackend, done: dict[str, int], table: str) -> None:
    """Run the daemon's vacuum until ``done`` (its ``runs`` or ``analyzed``) counts
    ``table``. PostgreSQL publishes a session's statistics at most once a second, and
    only once it has been idle a moment: asking too often delays them. A session that
    stays busy flushes them within 10 s (PGSTAT_IDLE_INTERVAL): hence the 30 s."""
    async with asyncio.timeout(RECOVERY_TIMEOUT_S):
        while table not in done:
            await asyncio.sleep(0.6)
            await backend.vacuum.run()


#: Room for every message a test sends to one channel.
CAP = CapacityPolicy(100)
ROOMY = CapacityPolicy(100_000)


# URL


def test_url_options_are_ours_and_the_rest_go_to_the_driver() -> None:
    options = PostgresOptions.from_url(
        "postgresql://u:p@db:6543/site?schema=cb&unlogged=yes&migrate=false&pool_size=3"
        "&recheck_interval=0.5&timeout=2&lease=2.5&sslmode=disable&jit=on"
    )
    assert (options.schema, options.unlogged, options.migrate) == ("cb", True, False)
    assert (options.pool_size, options.recheck_s, options.timeout_s) == (3, 0.5, 2.0)
    assert options.lease_s == 2.5
    assert options.dsn == "postgresql://u:p@db:6543/site?sslmode=disable&jit=on"
    settings = dict(options.server_settings)
    assert "jit" not in settings, "the URL's own setting wins"
    assert settings["application_name"] == "channels-broker"
    # synchronous_commit is the server's (on, unless its owner changed it), or the URL's.
    assert dict(PostgresOptions.from_url("postgres://db/site").server_settings) == {
        "application_name": "channels-broker",
        "jit": "off",
    }


@pytest.mark.parametrize(
    "query",
    [
        "schema=Bad-Name",
        "unlogged=maybe",
        "pool_size=0",
        "timeout=-1",
        "recheck_interval=x",
        "lease=0.5",
    ],
)
def test_bad_url_options_are_refused_by_name(query: str) -> None:
    with pytest.raises(BackendError, match=query.split("=")[0]):
        backend_from_url(f"postgresql://db/site?{query}")


# Schema


async def test_migrate_creates_the_schema_once_and_says_its_version(
    server_url: str, schema: str
) -> None:
    backend = PostgresBackend.from_url(f"{server_url}?schema={schema}")
    try:
        assert await backend.migrate() == (0, SCHEMA_VERSION)
        assert await backend.migrate() == (SCHEMA_VERSION, SCHEMA_VERSION)
    finally:
        await backend.close()
    async with connected(f"{server_url}?schema={schema}&migrate=false") as backend:
        assert await backend.send("ns", "work", b"x", capacity=1, expiry_s=LONG_S)


async def test_a_version_1_schema_is_upgraded_and_keeps_its_data(
    server_url: str, schema: str
) -> None:
    """Session 1 shipped version 1: a daemon of today migrates it at start."""
    conn = await asyncpg.connect(server_url)
    try:
        assert await migrate(conn, schema, unlogged=False, up_to=1) == (0, 1)
        await conn.execute(
            f'SELECT "{schema}".send($1, $2, NULL, $3, 10, 60)', "ns", "old", b"kept"
        )
    finally:
        await conn.close()
    async with connected(f"{server_url}?schema={schema}") as backend:
        assert await current_version_of(server_url, schema) == SCHEMA_VERSION
        taken = await backend.take("ns", "old", 5, hold=False)
        assert [(t.payload, t.ttl_s) for t in taken] == [(b"kept", pytest.approx(60, abs=5))]
        await backend.group_add("ns", "room", "old", group_expiry_s=LONG_S)
        result = await backend.group_send("ns", "room", b"new", capacity_of=CAP, expiry_s=LONG_S)
        assert list(result.delivered) == ["old"]


async def current_version_of(server_url: str, schema: str) -> int:
    conn = await asyncpg.connect(server_url)
    try:
        return await current_version(conn, schema)
    finally:
        await conn.close()


async def test_missing_schema_without_migration_is_a_clear_error(
    server_url: str, schema: str
) -> None:
    backend = backend_from_url(f"{server_url}?schema={schema}&migrate=false")
    with pytest.raises(BackendError, match="channels-broker migrate"):
        await backend.connect()
    assert not await backend.is_ready()


async def test_unlogged_option_sets_and_resets_table_persistence(
    server_url: str, schema: str
) -> None:
    async def persistence() -> set[str]:
        conn = await asyncpg.connect(server_url)
        try:
            rows = await conn.fetch(
                "SELECT relpersistence::text FROM pg_class c JOIN pg_namespace n "
                "ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = ANY($2)",
                schema,
                ["channels", "messages", "groups"],
            )
        finally:
            await conn.close()
        return {row[0] for row in rows}

    async with connected(f"{server_url}?schema={schema}&unlogged=true") as backend:
        await backend.send("ns", "work", b"kept", capacity=10, expiry_s=LONG_S)
    assert await persistence() == {"u"}
    async with connected(f"{server_url}?schema={schema}") as backend:
        assert [t.payload for t in await backend.take("ns", "work", 10, hold=False)] == [b"kept"]
    assert await persistence() == {"p"}


# Several daemons on one schema


async def test_two_backends_never_take_one_message_twice(session_url: str) -> None:
    ns = f"ns-{uuid.uuid4().hex[:8]}"
    async with connected(session_url) as one, connected(session_url) as two:
        items = [("work", b"%d" % n) for n in range(400)]
        refused = await one.send_many(ns, items, capacity_of=CapacityPolicy(1000), expiry_s=LONG_S)
        assert refused == []
        got: list[bytes] = []

        async def taker(backend: PostgresBackend) -> None:
            while taken := await backend.take(ns, "work", 3, hold=False):
                got.extend(message.payload for message in taken)

        await asyncio.gather(*(taker(b) for b in (one, two, one, two, one, two)))
        assert sorted(got) == sorted(payload for _, payload in items)
        await one.flush(ns)


async def test_capacity_holds_across_backends_sending_at_once(session_url: str) -> None:
    ns = f"ns-{uuid.uuid4().hex[:8]}"
    async with connected(session_url) as one, connected(session_url) as two:

        async def send(backend: PostgresBackend, n: int) -> bool:
            return await backend.send(ns, "tight", b"%d" % n, capacity=10, expiry_s=LONG_S)

        results = await asyncio.gather(*(send((one, two)[n % 2], n) for n in range(60)))
        assert sum(results) == 10
        assert len(await two.take(ns, "tight", 100, hold=False)) == 10
        await one.flush(ns)


async def test_a_send_wakes_the_other_daemon_through_notify(session_url: str) -> None:
    ns = f"ns-{uuid.uuid4().hex[:8]}"
    async with connected(session_url) as sender, connected(session_url) as receiver:
        heard, own = WakeupLog(), WakeupLog()
        receiver.set_wakeup(heard)
        sender.set_wakeup(own)
        receiver.watch(ns, "work")
        receiver.watch(ns, "c1")
        await sender.send(ns, "work", b"1", capacity=10, expiry_s=LONG_S)
        await sender.send(ns, "unwatched", b"2", capacity=10, expiry_s=LONG_S)
        await sender.group_add(ns, "room", "specific.c1!a", group_expiry_s=LONG_S)
        await sender.group_add(ns, "room", "specific.c1!b", group_expiry_s=LONG_S)
        await sender.group_send(ns, "room", b"3", capacity_of=CAP, expiry_s=LONG_S)
        await heard.wait_for({(ns, "work"), (ns, "specific.c1!a"), (ns, "specific.c1!b")})
        assert (ns, "unwatched") not in heard.calls, "only what this daemon watches"
        await asyncio.sleep(0.2)
        assert sorted(own.calls).count((ns, "work")) == 1, "the sender woke itself, once"
        await sender.flush(ns)


async def test_recheck_finds_a_message_whose_notification_was_missed(
    server_url: str, schema: str
) -> None:
    url = f"{server_url}?schema={schema}&recheck_interval=0.2"
    async with connected(url) as backend:
        log = WakeupLog()
        backend.set_wakeup(log)
        backend.watch("ns", "work")
        conn = await asyncpg.connect(server_url)
        try:  # a message that arrives with no notification at all
            await conn.execute(
                f'INSERT INTO "{schema}".messages (ns, channel, payload, expires_at) '
                "VALUES ('ns', 'work', 'x', now() + interval '1 minute')"
            )
        finally:
            await conn.close()
        await log.wait_for({("ns", "work")}, timeout_s=1.0)


async def test_a_group_send_stays_linear_once_vacuum_saw_the_groups_table_empty(
    server_url: str, schema: str
) -> None:
    """VACUUM of an empty table leaves the planner sure it holds a row or so; then
    joining members with unnest()ed arrays ran as a nested loop: 1,000 members cost a
    million comparisons (about 100 ms a call here). Looked up, they cost ~2 ms."""
    async with connected(f"{server_url}?schema={schema}") as backend:
        conn = await asyncpg.connect(server_url)
        try:
            members = [f"specific.c{n % 4}!m{n}" for n in range(1000)]
            insert = (
                f'INSERT INTO "{schema}".groups (ns, grp, channel, client, expires_at)'
                " SELECT 'ns', 'big', m, split_part(split_part(m, '!', 1), '.', 2),"
                " now() + interval '1 hour' FROM unnest($1::text[]) AS m"
            )
            await conn.execute(insert, members)
            await conn.execute(f'DELETE FROM "{schema}".groups')
            # As the daemon's vacuum does it: the pages stay, and look empty.
            await conn.execute(f'VACUUM (TRUNCATE false) "{schema}".groups')
            await conn.execute(insert, members)
            args = (
                "ns",
                "big",
                b"x",
                LONG_S,
                "",  # one slice: all members
                None,
                len(members),
                "",
                "",
                " ".join(members),
                " ".join(["100"] * len(members)),
                "c0 c1 c2 c3",
            )
            took: list[float] = []
            for n in range(8):  # PL/pgSQL plans generically from the sixth call
                started = time.perf_counter()
                # The lease of the direct pushes' row, and its length.
                row = await conn.fetchrow(backend._sql.group_send, *args, n + 1, 5.0)
                took.append(time.perf_counter() - started)
                assert len(row["direct"].split()) == len(members)
        finally:
            await conn.close()
        assert min(took[-3:]) < 0.03, f"{min(took[-3:]) * 1000:.1f} ms for 1,000 members"


async def test_a_send_many_stays_fast_once_vacuum_saw_the_channels_table_empty(
    server_url: str, schema: str
) -> None:
    """The same for the channel counters: 20,000 of them appear after a VACUUM saw the
    table empty; a send to 64 of them joined by nested loop (~400 ms here); by key ~8 ms."""
    async with connected(f"{server_url}?schema={schema}") as backend:
        conn = await asyncpg.connect(server_url)
        try:
            insert = (
                f'INSERT INTO "{schema}".channels (ns, channel, client, waiting, capacity)'
                " SELECT 'ns', 'specific.c!' || i, 'c', 0, 100 FROM generate_series(1, 20000) i"
            )
            await conn.execute(insert)
            await conn.execute(f'DELETE FROM "{schema}".channels')
            await conn.execute(f'VACUUM (TRUNCATE false) "{schema}".channels')
            await conn.execute(insert)
        finally:
            await conn.close()
        for _ in range(8):  # a burst to one channel, over and over: a generic plan
            await backend.send_many("ns", [("work", b"x")] * 64, capacity_of=ROOMY, expiry_s=LONG_S)
        items = [(f"specific.c!{n}", b"x") for n in range(1, 65)]
        took: list[float] = []
        for _ in range(2):
            started = time.perf_counter()
            assert await backend.send_many("ns", items, capacity_of=ROOMY, expiry_s=LONG_S) == []
            took.append(time.perf_counter() - started)
        # The first calls are planned for their arguments: the slow plan showed there.
        assert max(took[:2]) < 0.1, f"{[round(t * 1000) for t in took]} ms for 64 channels"


async def test_a_table_grown_past_what_the_planner_believes_is_analyzed(
    server_url: str, schema: str
) -> None:
    """After a VACUUM saw the channels table empty, 20,000 rows arrive: the planner
    would go on planning for an empty table (a sweep then took seconds) until an
    ANALYZE, which the daemon runs itself. (Each row counts a message, so that the
    sweep does not forget it as idle: the growth alone is what is seen.)"""
    async with connected(f"{server_url}?schema={schema}") as backend:
        insert = (
            f'INSERT INTO "{schema}".channels (ns, channel, client, waiting, capacity)'
            " SELECT 'ns', 'specific.c!' || i, 'c', 1, 100 FROM generate_series(1, 20000) i"
        )
        believed = f"SELECT reltuples FROM pg_class WHERE oid = '\"{schema}\".channels'::regclass"
        conn = await asyncpg.connect(server_url)
        try:
            await conn.execute(insert)
            await conn.execute(f'DELETE FROM "{schema}".channels')
        finally:
            await conn.close()  # publishes its statistics: the VACUUM then clears them
        conn = await asyncpg.connect(server_url)
        try:
            await conn.execute(f'VACUUM (TRUNCATE false) "{schema}".channels')
            await conn.execute(insert)
            assert await conn.fetchval(believed) == 0
        finally:
            await conn.close()  # publishes the inserts (an idle session may wait 10 s)
        await vacuum_until(backend, backend.vacuum.analyzed, "channels")
        conn = await asyncpg.connect(server_url)
        try:
            assert await conn.fetchval(believed) > 10_000
        finally:
            await conn.close()


async def test_a_send_many_loses_nothing_when_the_sweep_removes_its_channel_midway(
    server_url: str, schema: str
) -> None:
    """send_many makes sure each channel row exists, then locks it. If the sweep
    removes the row (idle) in between, the row is made again: the message is stored,
    not silently left out."""
    async with connected(f"{server_url}?schema={schema}") as backend:
        assert (
            await backend.send_many("ns", [("work", b"0")], capacity_of=CAP, expiry_s=LONG_S) == []
        )
        assert [m.payload for m in await backend.take("ns", "work", 1, hold=False)] == [b"0"]
        conn = await asyncpg.connect(server_url)
        try:
            key = ("ns", "work")
            async with conn.transaction():  # as the sweep does: lock the idle row, delete it
                await conn.execute(
                    f'SELECT 1 FROM "{schema}".channels WHERE ns = $1 AND channel = $2 FOR UPDATE',
                    *key,
                )
                sending = asyncio.create_task(
                    backend.send_many("ns", [("work", b"1")], capacity_of=CAP, expiry_s=LONG_S)
                )
                await asyncio.sleep(0.3)  # it made sure of the row, and waits for its lock
                await conn.execute(
                    f'DELETE FROM "{schema}".takes WHERE ns = $1 AND channel = $2', *key
                )
                await conn.execute(
                    f'DELETE FROM "{schema}".channels WHERE ns = $1 AND channel = $2', *key
                )
            assert await sending == []
        finally:
            await conn.close()
        assert [m.payload for m in await backend.take("ns", "work", 5, hold=False)] == [b"1"]


# Expiry


async def test_sweep_removes_expired_rows_lapsed_members_and_idle_channels(
    server_url: str, schema: str
) -> None:
    async with connected(f"{server_url}?schema={schema}") as backend:
        await backend.send("ns", "old", b"x", capacity=10, expiry_s=0.05)
        await backend.send("ns", "new", b"x", capacity=10, expiry_s=LONG_S)
        await backend.group_add("ns", "room", "old", group_expiry_s=0.05)
        await backend.group_add("ns", "room", "new", group_expiry_s=LONG_S)
        await backend.send("ns", "idle", b"x", capacity=10, expiry_s=LONG_S)
        await backend.take("ns", "idle", 1, hold=False)
        before = backend.stats().expired_total
        conn = await asyncpg.connect(server_url)
        try:
            async with asyncio.timeout(5):
                while await conn.fetchval(
                    f'SELECT count(*) FROM "{schema}".messages WHERE channel = $1', "old"
                ):
                    await asyncio.sleep(0.1)
            assert backend.stats().expired_total == before + 1
            members = await conn.fetch(f'SELECT channel FROM "{schema}".groups')
            assert [row[0] for row in members] == ["new"]
            async with asyncio.timeout(5):
                while await conn.fetchval(
                    f'SELECT count(*) FROM "{schema}".channels WHERE channel = ANY($1)',
                    ["old", "idle"],
                ):
                    await asyncio.sleep(0.1)
            assert await conn.fetchval(f'SELECT waiting FROM "{schema}".channels') == 1
        finally:
            await conn.close()


async def test_held_count_lapses_with_its_messages(server_url: str, schema: str) -> None:
    """A daemon killed before releasing cannot shrink a channel for longer than expiry."""
    async with connected(f"{server_url}?schema={schema}") as backend:
        channel = "specific.c1!x"
        await backend.send("ns", channel, b"1", capacity=1, expiry_s=0.3)
        await backend.take("ns", channel, 1, hold=True)  # and never released
        assert not await backend.send("ns", channel, b"2", capacity=1, expiry_s=LONG_S)
        await asyncio.sleep(0.4)
        assert await backend.send("ns", channel, b"2", capacity=1, expiry_s=LONG_S)


async def test_queue_tables_are_vacuumed_once_enough_rows_are_dead(
    server_url: str, schema: str
) -> None:
    """Takes walk past deleted rows until a VACUUM: the daemon runs it when autovacuum
    is off (as on the CI server) or slow."""
    async with connected(f"{server_url}?schema={schema}") as backend:
        count = 2500
        for _ in range(0, count, 500):
            await backend.send_many(
                "ns", [("work", b"x")] * 500, capacity_of=CapacityPolicy(count), expiry_s=LONG_S
            )
        taken = 0
        while taken < count:
            taken += len(await backend.take("ns", "work", 100, hold=False))
        await vacuum_until(backend, backend.vacuum.runs, "messages")
        conn = await asyncpg.connect(server_url)
        try:
            row = await conn.fetchrow(
                "SELECT last_vacuum, n_dead_tup FROM pg_stat_user_tables"
                " WHERE schemaname = $1 AND relname = 'messages'",
                schema,
            )
        finally:
            await conn.close()
        assert row["last_vacuum"] is not None
        assert row["n_dead_tup"] < count


async def test_top_channels_lists_the_longest_backlogs(server_url: str, schema: str) -> None:
    """What ``channels-broker status`` shows; taken messages no longer count."""
    async with connected(f"{server_url}?schema={schema}") as backend:
        for channel, count in (("a", 3), ("b", 1), ("c", 2)):
            for _ in range(count):
                await backend.send("ns", channel, b"x", capacity=10, expiry_s=LONG_S)
        await backend.take("ns", "a", 2, hold=False)
        assert await backend.top_channels(2) == [("ns", "c", 2), ("ns", "a", 1)]


# Faults


@pytest.fixture(scope="module")
def own_server() -> Iterator[pg_server.PostgresServer]:
    if not pg_server.can_make_servers():
        pytest.fail("initdb and pg_ctl are needed for the fault tests", pytrace=False)
    server = pg_server.PostgresServer()
    server.start()
    yield server
    server.cleanup()


async def test_unreachable_database_fails_connect_with_backend_unavailable() -> None:
    backend = backend_from_url("postgresql://postgres@127.0.0.1:1/postgres?timeout=1")
    with pytest.raises(BackendUnavailable, match="cannot reach PostgreSQL"):
        await backend.connect()


async def test_database_restart_fails_fast_then_recovers_with_nothing_lost(
    own_server: pg_server.PostgresServer,
) -> None:
    """1. Messages wait; the server stops (fast).
    2. Operations raise BackendUnavailable within the timeout; is_ready says False.
    3. The server starts again: the backend reconnects by itself, LISTENs again (a
       send from another backend wakes it), and the waiting messages are all there.
    """
    url = f"{own_server.url}?timeout=1&recheck_interval=0.2"
    async with connected(url) as backend:
        log = WakeupLog()
        backend.set_wakeup(log)
        backend.watch("ns", "after")
        for n in range(5):
            await backend.send("ns", "work", b"%d" % n, capacity=10, expiry_s=LONG_S)
        await asyncio.to_thread(own_server.stop)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(BackendUnavailable):
            await backend.send("ns", "work", b"lost", capacity=10, expiry_s=LONG_S)
        assert loop.time() - started < 2.0
        assert not await backend.is_ready()
        await asyncio.to_thread(own_server.start)
        async with asyncio.timeout(10):
            while not await backend.is_ready():
                await asyncio.sleep(0.1)
        async with connected(url) as other:
            await other.send("ns", "after", b"x", capacity=10, expiry_s=LONG_S)
        await log.wait_for({("ns", "after")})
        taken = await backend.take("ns", "work", 10, hold=False)
        assert [message.payload for message in taken] == [b"%d" % n for n in range(5)]
