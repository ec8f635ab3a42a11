"""MemoryBackend beyond the contract: its URL, record lifetimes, timer wheel, counters
(against a model: test_memory_machine.py).

These tests read private state on purpose (what the contract cannot see: that memory
is freed, and how); the contract suite must never do so.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import Callable

import pytest

from backends import BackendError
from backends.memory import MemoryBackend
from backends.memory.records import SHORT_QUEUE, Channel, Space
from backends.memory.wheel import TimerWheel
from broker.daemon.capacity import CapacityPolicy
from protocol import client_id_of, is_process_specific
from tests.backends.memory_support import check_records, gauges, recount

#: A fast wheel, so sweeps happen within a test's patience.
TICK_S = 0.01
SHORT_S = 0.03
LONG_S = 60.0


@pytest.fixture
def memory() -> MemoryBackend:
    """A MemoryBackend with a fast wheel; async tests receive it connected."""
    return MemoryBackend(tick_s=TICK_S)


def fixed(capacity: int) -> CapacityPolicy:
    return CapacityPolicy(capacity)


async def wait_until(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    """Wait, a tick at a time, for a sweep to make ``condition`` true."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(TICK_S)


# The URL


@pytest.mark.parametrize("url", ["memory://", "memory:///", "MEMORY://"])
def test_from_url_accepts_the_bare_scheme(url: str) -> None:
    assert isinstance(MemoryBackend.from_url(url), MemoryBackend)


@pytest.mark.parametrize(
    "url",
    [
        "memory://host",
        "memory://:1",
        "memory:///db",
        "memory://?capacity=5",
        "memory://#x",
        "redis://",
    ],
)
def test_from_url_refuses_anything_more(url: str) -> None:
    with pytest.raises(BackendError):
        MemoryBackend.from_url(url)


def test_from_url_translates_a_malformed_url() -> None:
    with pytest.raises(BackendError):
        MemoryBackend.from_url("memory://[")


@pytest.mark.parametrize("tick_s", [0, -1.0, float("nan")])
def test_tick_must_be_positive(tick_s: float) -> None:
    with pytest.raises(BackendError):
        MemoryBackend(tick_s=tick_s)


@pytest.mark.parametrize("name", ["work", "a.b", "specific.c1!x", "c1!x", "a.b.c2!", "s.c3!x.y"])
def test_records_know_their_client_as_protocol_does(name: str) -> None:
    expected = client_id_of(name) if is_process_specific(name) else None
    assert Channel(Space(), name).client == expected


# Lifecycle


async def test_ready_only_between_connect_and_close() -> None:
    backend = MemoryBackend()
    assert not await backend.is_ready()
    await backend.connect()
    assert await backend.is_ready()
    await backend.close()
    assert not await backend.is_ready()


def test_connect_in_a_new_loop_restarts_the_wheel() -> None:
    """1. connect in a loop that then ends without close; 2. connect in a new loop;
    3. the wheel sweeps in the new loop."""
    backend = MemoryBackend(tick_s=TICK_S)

    async def first() -> None:
        await backend.connect()
        await backend.send("ns", "a", b"x", capacity=1, expiry_s=SHORT_S)

    async def second() -> None:
        await backend.connect()
        await wait_until(lambda: not backend._spaces["ns"].channels)
        await backend.close()

    asyncio.run(first())
    asyncio.run(second())
    assert backend.stats().expired_total == 1


# Record lifetimes


async def test_an_emptied_record_stays_until_its_sweep(memory: MemoryBackend, ns: str) -> None:
    """1. A channel emptied by a take keeps its record: the next message reuses it.
    2. The sweep of its bucket forgets it, unless it is held; 3. the release of a held
    record whose sweep has passed forgets it at once."""
    channels = memory._spaces.setdefault(ns, Space()).channels
    await memory.send(ns, "work", b"1", capacity=5, expiry_s=SHORT_S)
    await memory.send(ns, "specific.c1!x", b"2", capacity=5, expiry_s=SHORT_S)
    kept = channels["work"]
    await memory.take(ns, "work", 5, hold=False)
    await memory.take(ns, "specific.c1!x", 5, hold=True)
    assert channels["work"] is kept

    await wait_until(lambda: "work" not in channels)
    assert list(channels) == ["specific.c1!x"], "kept while held"
    await memory.release(ns, "specific.c1!x", 1)

    assert channels == {}
    assert memory._spaces[ns].clients == {}
    assert not any(memory._channel_wheel._buckets.values()), "unfiled as well"


async def test_refused_send_leaves_no_record(memory: MemoryBackend, ns: str) -> None:
    assert not await memory.send(ns, "work", b"1", capacity=0, expiry_s=LONG_S)
    assert memory._spaces[ns].channels == {}


async def test_group_send_queues_one_payload_object(memory: MemoryBackend, ns: str) -> None:
    payload = bytes(1000)
    for channel in ("a", "b", "specific.c1!x"):
        await memory.group_add(ns, "room", channel, group_expiry_s=LONG_S)
    await memory.group_send(ns, "room", payload, capacity_of=fixed(5), expiry_s=LONG_S)
    for channel in ("a", "b", "specific.c1!x"):
        [taken] = await memory.take(ns, channel, 1, hold=False)
        assert taken.payload is payload


async def test_each_enqueue_wakes_once_and_refusals_not(memory: MemoryBackend, ns: str) -> None:
    calls: list[tuple[str, str]] = []
    memory.set_wakeup(lambda ns, channel: calls.append((ns, channel)))
    await memory.send(ns, "a", b"1", capacity=1, expiry_s=LONG_S)
    await memory.send(ns, "a", b"2", capacity=1, expiry_s=LONG_S)  # full
    await memory.send_many(ns, [("b", b"3"), ("a", b"4")], capacity_of=fixed(1), expiry_s=LONG_S)
    for channel in ("a", "c"):
        await memory.group_add(ns, "room", channel, group_expiry_s=LONG_S)
    await memory.group_send(ns, "room", b"5", capacity_of=fixed(1), expiry_s=LONG_S)
    assert calls == [(ns, "a"), (ns, "b"), (ns, "c")]


# The timer wheel


def test_wheel_pops_only_the_due_buckets() -> None:
    wheel: TimerWheel[Channel] = TimerWheel(1.0)
    space = Space()
    early, late, gone = (Channel(space, name) for name in ("early", "late", "gone"))
    wheel.file(early, 10.2)
    wheel.file(late, 20.5)
    wheel.file(gone, 10.7)
    wheel.unfile(gone)
    assert wheel.pop_due(10.9) == []
    assert wheel.pop_due(11.0) == [early]
    assert (early.bucket, gone.bucket, late.bucket) == (None, None, 21)
    assert wheel.pop_due(100.0) == [late]
    assert wheel._buckets == {} and wheel._due == []


async def test_wheel_frees_channels_nobody_reads(memory: MemoryBackend, ns: str) -> None:
    for i in range(100):
        await memory.send(ns, f"idle{i}", b"x", capacity=5, expiry_s=SHORT_S)
        await memory.send(ns, f"specific.c{i}!x", b"x", capacity=5, expiry_s=SHORT_S)
    await wait_until(lambda: not memory._spaces[ns].channels)
    assert memory._spaces[ns].clients == {}
    assert memory.stats().expired_total == 200
    assert gauges(memory) == (0, 0, 0, 0)


async def test_wheel_keeps_what_is_still_valid_or_held(memory: MemoryBackend, ns: str) -> None:
    await memory.send(ns, "mixed", b"short", capacity=5, expiry_s=SHORT_S)
    await memory.send(ns, "mixed", b"long", capacity=5, expiry_s=LONG_S)
    await memory.send(ns, "specific.c1!x", b"held", capacity=5, expiry_s=LONG_S)
    await memory.take(ns, "specific.c1!x", 1, hold=True)
    await wait_until(lambda: memory.stats().expired_total == 1)
    assert sorted(memory._spaces[ns].channels) == ["mixed", "specific.c1!x"]
    assert gauges(memory) == (1, 1, 0, 0)
    check_records(memory)
    assert [t.payload for t in await memory.take(ns, "mixed", 5, hold=False)] == [b"long"]


async def test_wheel_frees_lapsed_memberships(memory: MemoryBackend, ns: str) -> None:
    for i in range(50):
        await memory.group_add(ns, f"room{i}", "brief", group_expiry_s=SHORT_S)
    for channel in ("brief2", "brief3"):
        await memory.group_add(ns, "room0", channel, group_expiry_s=SHORT_S)
    await memory.group_add(ns, "room0", "steady", group_expiry_s=LONG_S)
    await wait_until(lambda: list(memory._spaces[ns].groups) == ["room0"])
    assert memory._spaces[ns].groups["room0"].channels() == ["steady"]
    assert gauges(memory) == (0, 0, 1, 1)
    check_records(memory)


async def test_group_send_drops_lapsed_members_itself() -> None:
    backend = MemoryBackend(tick_s=LONG_S)  # not connected: no sweep can help
    for channel in ("brief1", "brief2", "brief3"):
        await backend.group_add("ns", "room", channel, group_expiry_s=SHORT_S)
    await backend.group_add("ns", "room", "steady", group_expiry_s=LONG_S)
    await backend.group_add("ns", "hall", "brief1", group_expiry_s=SHORT_S)
    await asyncio.sleep(SHORT_S + TICK_S)
    for group in ("room", "hall"):
        await backend.group_send("ns", group, b"x", capacity_of=fixed(5), expiry_s=LONG_S)
    assert list(backend._spaces["ns"].groups) == ["room"]
    assert gauges(backend) == recount(backend) == (1, 1, 1, 1)
    check_records(backend)


async def test_close_stops_the_wheel(memory: MemoryBackend, ns: str) -> None:
    await memory.send(ns, "idle", b"x", capacity=5, expiry_s=SHORT_S)
    await memory.close()
    await asyncio.sleep(SHORT_S + 3 * TICK_S)
    assert list(memory._spaces[ns].channels) == ["idle"], "no sweep after close"
    assert await memory.take(ns, "idle", 1, hold=False) == [], "reads still check expiry"


async def test_a_channel_with_one_waiting_message_costs_little(memory: MemoryBackend) -> None:
    """A million consumers' channels hold a message or two each: their records cost
    about 500 bytes with a 130-byte message (a deque per channel cost 760 on its own)."""
    names = [f"bench-memory.{n}" for n in range(10_000)]
    payload = b"m" * 130
    tracemalloc.start()
    try:
        for name in names:
            assert await memory.send("ns", name, payload, capacity=100, expiry_s=LONG_S)
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert used / len(names) < 600, f"{used / len(names):.0f} bytes a channel"


async def test_a_long_queue_keeps_its_order_across_its_change_of_kind(
    memory: MemoryBackend,
) -> None:
    """Past SHORT_QUEUE messages a channel's list becomes a deque: nothing is lost or
    reordered, and what expires at its head is dropped as before."""
    count = SHORT_QUEUE * 3
    for n in range(count):
        assert await memory.send("ns", "work", str(n).encode(), capacity=count, expiry_s=LONG_S)
    taken = await memory.take_many("ns", ["work"], count, hold=False)
    assert [int(item.payload) for item in taken["work"]] == list(range(count))
