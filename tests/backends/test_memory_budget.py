"""MemoryBackend's ``limit_memory``: past it sends are refused as full, never stored.

What a waiting message costs is its payload plus ``MESSAGE_OVERHEAD_BYTES``, and each
channel record ``CHANNEL_OVERHEAD_BYTES``; a send is checked as if it made a new record
(``SLACK``), so that the bound is never passed. The tests build limits from those
numbers, so that the edge is exact.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from backends.memory import MemoryBackend
from backends.memory.budget import CHANNEL_OVERHEAD_BYTES, MESSAGE_OVERHEAD_BYTES
from broker.daemon.capacity import CapacityPolicy

PAYLOAD = b"x" * 1000
#: One channel record holding one PAYLOAD.
ONE = CHANNEL_OVERHEAD_BYTES + MESSAGE_OVERHEAD_BYTES + len(PAYLOAD)
#: Each further PAYLOAD in an existing record.
MORE = MESSAGE_OVERHEAD_BYTES + len(PAYLOAD)
#: The room a send must find beyond its own cost: a record it may have to make.
SLACK = CHANNEL_OVERHEAD_BYTES
ROOMY = CapacityPolicy(1000)


def limited(max_bytes: int) -> MemoryBackend:
    backend = MemoryBackend()
    backend.limit_memory(max_bytes)
    return backend


async def send(backend: MemoryBackend, channel: str, payload: bytes = PAYLOAD) -> bool:
    return await backend.send("ns", channel, payload, capacity=1000, expiry_s=60.0)


async def test_a_send_past_the_limit_is_refused_as_full() -> None:
    backend = limited(ONE + 2 * MORE + SLACK)

    assert [await send(backend, "chat") for _ in range(4)] == [True, True, True, False]
    stats = backend.stats()
    assert stats.memory_bytes == ONE + 2 * MORE
    assert stats.memory_refused == 1
    assert stats.messages_waiting == 3


async def test_taking_gives_the_room_back() -> None:
    backend = limited(ONE + MORE + SLACK)
    assert await send(backend, "chat") and await send(backend, "chat")
    assert not await send(backend, "chat")

    await backend.take("ns", "chat", 1, hold=False)

    assert await send(backend, "chat")
    assert not await send(backend, "chat")


async def test_send_many_stores_what_fits_and_refuses_the_rest() -> None:
    backend = limited(ONE + MORE + MESSAGE_OVERHEAD_BYTES + SLACK)
    items = [("chat", PAYLOAD)] * 3 + [("chat", b"")]

    refused = await backend.send_many("ns", items, capacity_of=ROOMY, expiry_s=60.0)

    assert refused == [2]  # the empty message still fits after it
    assert backend.stats().memory_refused == 1


async def test_group_send_reaches_the_members_that_fit_and_skips_the_others() -> None:
    backend = limited(3 * ONE + SLACK - 1)
    for index in range(5):
        await backend.group_add("ns", "room", f"member{index}", group_expiry_s=60.0)

    result = await backend.group_send("ns", "room", PAYLOAD, capacity_of=ROOMY, expiry_s=60.0)

    assert result.delivered == ["member0", "member1", "member2"]
    assert result.skipped == 2
    assert backend.stats().memory_refused == 2


async def test_flush_gives_the_room_back() -> None:
    backend = limited(ONE)
    assert await send(backend, "chat")
    assert not await send(backend, "chat")

    await backend.flush("ns")

    assert backend.stats().memory_bytes == 0
    assert await send(backend, "other")


async def test_expired_messages_give_the_room_back_at_their_sweep() -> None:
    backend = MemoryBackend(tick_s=0.01)
    backend.limit_memory(ONE)
    await backend.connect()
    try:
        assert await backend.send("ns", "chat", PAYLOAD, capacity=10, expiry_s=0.02)
        assert not await send(backend, "other")
        async with asyncio.timeout(2.0):
            while backend.stats().memory_bytes:
                await asyncio.sleep(0.01)  # a tick at a time: the sweep has no event
        assert await send(backend, "other")
    finally:
        await backend.close()


async def test_a_burst_of_refusals_is_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    backend = limited(ONE)
    assert await send(backend, "chat")

    with caplog.at_level(logging.WARNING, logger="channels_broker.backends.memory"):
        for _ in range(1000):
            assert not await send(backend, "chat")

    assert backend.stats().memory_refused == 1000
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert "--max-memory" in lines[0]


async def test_without_a_limit_nothing_is_refused_for_memory() -> None:
    backend = MemoryBackend()
    for _ in range(100):
        assert await send(backend, "chat", b"x" * 100_000)
    assert backend.stats().memory_refused == 0
    assert backend.stats().memory_bytes == CHANNEL_OVERHEAD_BYTES + 100 * (
        MESSAGE_OVERHEAD_BYTES + 100_000
    )
