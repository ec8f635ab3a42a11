"""Group sends on PostgreSQL in slices of members (``backends/postgres/group_sends.py``):
no statement grows with the group, nobody else waits for it, and each member gets each
message once, in order, while members come and go."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest

from backends.postgres.backend import PostgresBackend, PostgresOptions
from backends.postgres.group_sends import MAX_SLICE_MEMBERS, SliceSize
from broker.daemon.capacity import CapacityPolicy
from tests import pg_server
from tests.backends.postgres.test_postgres import connected
from tests.conftest import REPO_ROOT

LONG_S = 60.0
CAP = CapacityPolicy(100)
#: Members per slice where a test counts slices (else slices adapt to the machine).
SLICE = 100
#: The group of the issue: one statement for all of it took 7 to 20 s here.
BIG_GROUP = 100_000
#: A slice takes a few milliseconds on an idle machine; one statement for the whole
#: group, seconds. The bound is on a statement's time less what its client and server
#: processes waited for a CPU meanwhile (``run_queue``): a loaded machine (2 CPUs shared
#: with other test runs) adds nothing to that; the room left is for the disk (a commit
#: waits for its WAL to be written) and for CPUs shared with other work.
LONGEST_STATEMENT_S = 0.5
#: The longest another client's statement may wait for a lock the group send holds, on
#: an idle machine (the issue asks for about 50 ms): its session's lock_timeout, so
#: that a wait any longer fails it. On a loaded machine (2 CPUs shared with other test
#: runs) every statement takes longer, a slice's too: the bound is then twice the
#: longest that client's own sends and takes took just before.
MOST_HELD_UP_S = 0.05
#: How much longer another client's send and take may take while the group send runs
#: than just before, at most: what a loaded machine adds, far below what one statement
#: for the whole group held them up (seconds).
MOST_SLOWED_S = 0.25


@pytest.fixture
def url() -> str:
    return pg_server.backend_url("postgresql://")


@pytest.fixture
def ns() -> str:
    return f"ns-{uuid.uuid4().hex[:8]}"


def member(n: int) -> str:
    """Members of 20 clients, several slices each in name order."""
    return f"specific.c{n % 20}!m{n:06d}"


@asynccontextmanager
async def database(url: str) -> AsyncIterator[tuple[asyncpg.Connection, str]]:
    """A plain connection, and the quoted schema of ``url``."""
    conn = await asyncpg.connect(url.split("?", 1)[0])
    try:
        yield conn, f'"{PostgresOptions.from_url(url).schema}"'
    finally:
        await conn.close()


async def add_members(url: str, ns: str, group: str, count: int) -> None:
    """``count`` members at once, as ``group_add`` would add them one by one."""
    async with database(url) as (conn, schema):
        await conn.execute(
            f"INSERT INTO {schema}.groups (ns, grp, channel, client, expires_at)"
            " SELECT $1, $2, 'specific.c' || (i % 20) || '!m' || lpad(i::text, 6, '0'),"
            " 'c' || (i % 20), now() + interval '1 hour' FROM generate_series(0, $3 - 1) i",
            ns,
            group,
            count,
        )


async def stored(url: str, ns: str) -> dict[str, list[bytes]]:
    """Each channel's stored payloads, oldest first."""
    async with database(url) as (conn, schema):
        rows = await conn.fetch(
            f"SELECT channel, payload FROM {schema}.messages WHERE ns = $1 ORDER BY id", ns
        )
    found: dict[str, list[bytes]] = {}
    for channel, payload in rows:
        found.setdefault(channel, []).append(payload)
    return found


async def test_members_get_each_group_message_once_in_order_while_they_come_and_go(
    url: str, ns: str
) -> None:
    """1. A group of three slices and a bit; three group sends, one after the other.
    2. Meanwhile members join (some before the slice under way, some after) and leave.
    3. Every member has each message at most once, in order; those there all along, all.
    """
    count = 3 * SLICE + 17
    async with connected(url) as backend:
        backend._group_sends.slice_size = SliceSize(SLICE, target_s=None)
        await add_members(url, ns, "room", count)

        async def churn() -> None:
            for n in range(count, count + 60):
                await backend.group_add(ns, "room", member(n), group_expiry_s=LONG_S)
                await backend.group_add(ns, "room", f"specific.a!{n}", group_expiry_s=LONG_S)
                await backend.group_discard(ns, "room", member(n - count + 1))

        churning = asyncio.create_task(churn())
        for k in range(3):
            await backend.group_send(ns, "room", b"%d" % k, capacity_of=CAP, expiry_s=LONG_S)
        await churning
        found = await stored(url, ns)
        await backend.flush(ns)
    for channel, payloads in found.items():
        assert payloads == sorted(set(payloads)), f"{channel} got {payloads}"
    always = [member(n) for n in range(61, count)]  # never discarded
    assert all(found.get(channel) == [b"0", b"1", b"2"] for channel in always)


async def test_a_member_list_seen_before_sends_each_slice_in_one_statement(
    url: str, ns: str
) -> None:
    count = 2 * SLICE + 1
    async with connected(url) as backend:
        backend._group_sends.slice_size = SliceSize(SLICE, target_s=None)
        await add_members(url, ns, "room", count)
        calls = 0
        fetchrow = backend._db.fetchrow

        async def counted(sql: str, *args: object) -> object:
            nonlocal calls
            calls += 1
            return await fetchrow(sql, *args)

        backend._db.fetchrow = counted  # type: ignore[method-assign]
        for _ in range(2):
            calls = 0
            result = await backend.group_send(ns, "room", b"x", capacity_of=CAP, expiry_s=LONG_S)
            assert len(result.delivered) == count
        assert calls == 3, "warm: one statement per slice"
        await backend.flush(ns)


async def probe(backend: PostgresBackend, ns: str, channel: str, until: asyncio.Event) -> float:
    """Send and take on ``channel`` over and over until ``until``; the longest it took."""
    longest = 0.0
    while not until.is_set():
        started = time.perf_counter()
        assert await backend.send(ns, channel, b"probe", capacity=1000, expiry_s=LONG_S)
        assert await backend.take(ns, channel, 1, hold=True)
        await backend.release(ns, channel, 1)
        longest = max(longest, time.perf_counter() - started)
    return longest


async def probed_while(backend: PostgresBackend, ns: str, work: asyncio.Future[str]) -> float:
    """The longest probe of a member's channel and of another channel while ``work``
    runs."""
    done = asyncio.Event()
    work.add_done_callback(lambda _: done.set())
    channels = (member(BIG_GROUP // 2), "specific.other!x")
    longest = await asyncio.gather(*(probe(backend, ns, c, done) for c in channels))
    return max(longest)


async def test_a_100000_member_group_send_holds_up_no_other_client(url: str, ns: str) -> None:
    """1. Another client's sends and takes are timed for a second, as a baseline.
    2. A group send to 100,000 members runs in a process of its own, while that client
       sends and takes on a member's channel and on another: none of its statements
       waits more than 50 ms for a lock (more on a loaded machine), nor takes much
       longer than before, and no statement of the group send is long (less what
       the machine's load added: its processes' wait for a CPU).
    """
    async with connected(url) as backend:
        await add_members(url, ns, "big", BIG_GROUP)
        second: asyncio.Future[str] = asyncio.ensure_future(asyncio.sleep(1.0, ""))
        baseline = await probed_while(backend, ns, second)
    lock_timeout_ms = round(1000 * max(MOST_HELD_UP_S, 2 * baseline))
    async with connected(f"{url}&lock_timeout={lock_timeout_ms}ms") as backend:
        sender = asyncio.ensure_future(asyncio.to_thread(run_group_sender, url, ns, "big"))
        during = await probed_while(backend, ns, sender)
        report = json.loads(await sender)
        await backend.flush(ns)
    took = sorted(report["took"])
    ran = sorted(t - w for t, w in zip(report["took"], report["waited"], strict=True))
    print(
        f"{len(took)} statements, median {took[len(took) // 2] * 1000:.1f} ms, longest "
        f"{took[-1] * 1000:.1f} ms ({ran[-1] * 1000:.1f} ms less the wait for a CPU);"
        f" probes: longest {baseline * 1000:.1f} ms before, {during * 1000:.1f} ms during,"
        f" no lock wait over {lock_timeout_ms} ms"
    )
    assert report["delivered"] == BIG_GROUP
    assert len(took) >= BIG_GROUP // MAX_SLICE_MEMBERS
    assert ran[-1] < LONGEST_STATEMENT_S, (took[-5:], ran[-5:])
    assert during < baseline + MOST_SLOWED_S


def run_group_sender(url: str, ns: str, group: str) -> str:
    """``group_sender`` in a process of its own; its JSON line."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.backends.postgres.group_sender", url, ns, group],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]
