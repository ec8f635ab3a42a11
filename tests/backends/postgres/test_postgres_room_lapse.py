"""Send room on PostgreSQL lapses holder by holder (``lapse_rooms``, schema version 9).

Room a connection reserved and never gave back (its release failed while PostgreSQL
restarted, or its daemon died) must come back within ``room_lapse``, also on a busy
channel: one where other connections reserve room all the time, which keeps the
channel's held count (``takes.held``) from lapsing as a whole.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from backends.postgres.backend import PostgresBackend
from backends.postgres.sweep import SWEEP_INTERVAL_S
from tests import pg_server
from tests.backends.postgres.test_postgres import connected
from tests.waits import DELIVERY_TIMEOUT_S, POLL_S

ROOM_LAPSE_S = 1.0
CAPACITY = 10
#: What a reservation gets with nothing else held: half the free capacity.
ALL_ROOM = CAPACITY // 2


@pytest.fixture
def url() -> str:
    return f"{pg_server.backend_url('postgresql://')}&room_lapse={ROOM_LAPSE_S}"


@pytest.fixture
def channel() -> str:
    return f"jobs-{uuid.uuid4().hex[:8]}"


async def reserve(backend: PostgresBackend, channel: str, window: int, holder: str) -> int:
    return await backend.reserve_room(
        "ns", channel, capacity=CAPACITY, window=window, size=1, holder=holder
    )


async def room_while_busy(backend: PostgresBackend, channel: str, deadline_s: float) -> int:
    """Keep the channel busy (a sender reserving and giving back room every poll, so
    the channel's held count never lapses) until a reservation gets all the room there
    is, or ``deadline_s`` passes; the last reservation's room."""
    started = time.monotonic()
    while True:
        await reserve(backend, channel, 1, "busy 1")
        await backend.release_room("ns", channel, 1, holder="busy 1")
        got = await reserve(backend, channel, ALL_ROOM, "probe 1")
        await backend.release_room("ns", channel, got, holder="probe 1")
        if got == ALL_ROOM or time.monotonic() - started > deadline_s:
            return got
        await asyncio.sleep(POLL_S)


async def test_room_never_given_back_lapses_on_a_busy_channel(url: str, channel: str) -> None:
    """1. A connection reserves 4 units of room and never releases them (as when its
       release met a restarting PostgreSQL): a reservation gets less than all the room.
    2. Other connections keep reserving and releasing room on the channel.
    3. Within ``room_lapse`` and a sweep, a reservation gets all the room again."""
    async with connected(url) as backend:
        assert await reserve(backend, channel, 4, "leaky 1") == 4
        assert await reserve(backend, channel, ALL_ROOM, "probe 1") == (CAPACITY - 4) // 2
        await backend.release_room("ns", channel, (CAPACITY - 4) // 2, holder="probe 1")
        deadline_s = ROOM_LAPSE_S + SWEEP_INTERVAL_S + DELIVERY_TIMEOUT_S
        assert await room_while_busy(backend, channel, deadline_s) == ALL_ROOM


async def test_room_spent_after_it_lapsed_is_not_given_back_twice(url: str, channel: str) -> None:
    """1. A connection reserves 4 units and keeps them past ``room_lapse``: the sweep
       gives them back (a reservation gets all the room while the channel is busy).
    2. Another connection reserves 2 units; then the first spends its 4 (windowed
       SENDs stored into its lapsed room): 4 messages wait and 2 units are held, so a
       reservation gets half of the 4 units free, not more."""
    async with connected(url) as backend:
        assert await reserve(backend, channel, 4, "late 1") == 4
        deadline_s = ROOM_LAPSE_S + SWEEP_INTERVAL_S + DELIVERY_TIMEOUT_S
        assert await room_while_busy(backend, channel, deadline_s) == ALL_ROOM
        assert await reserve(backend, channel, 2, "other 1") == 2
        items = [(channel, b"x")] * 4
        await backend.send_reserved("ns", items, expiry_s=60.0, holder="late 1")
        assert await reserve(backend, channel, ALL_ROOM, "probe 1") == (CAPACITY - 4 - 2) // 2
