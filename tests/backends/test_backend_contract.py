"""The storage contract of ``backends.base.Backend``, run against every backend URL.

Only the public Backend API is used here, so each new backend joins by adding its
URL to ``BACKEND_URLS`` in ``conftest.py``; memory internals have their own file.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence

import pytest

from backends import Backend, CapacityOf, Taken
from broker.daemon.capacity import CapacityPolicy

#: Long enough never to lapse during a test.
LONG_S = 60.0
#: Short enough to lapse during a test; ``LAPSE_WAIT_S`` later it surely has.
SHORT_S = 0.05
LAPSE_WAIT_S = 0.12


def payloads(taken: Sequence[Taken]) -> list[bytes]:
    return [message.payload for message in taken]


def capacity(default: int, **special: int) -> CapacityOf:
    """A ``capacity_of`` giving ``special[channel]`` or ``default``, as the daemon makes it."""
    return CapacityPolicy(
        default, tuple((rf"{re.escape(name)}\Z", n) for name, n in special.items())
    )


async def put(
    backend: Backend,
    ns: str,
    channel: str,
    payload: bytes,
    *,
    cap: int = 10,
    expiry_s: float = LONG_S,
) -> bool:
    return await backend.send(ns, channel, payload, capacity=cap, expiry_s=expiry_s)


async def drain(backend: Backend, ns: str, channel: str) -> list[bytes]:
    return payloads(await backend.take(ns, channel, 1000, hold=False))


async def join(
    backend: Backend, ns: str, group: str, *channels: str, expiry_s: float = LONG_S
) -> None:
    for channel in channels:
        await backend.group_add(ns, group, channel, group_expiry_s=expiry_s)


async def broadcast(
    backend: Backend, ns: str, group: str, payload: bytes, *, cap: CapacityOf | None = None
) -> tuple[list[str], int]:
    result = await backend.group_send(
        ns, group, payload, capacity_of=cap or capacity(10), expiry_s=LONG_S
    )
    return sorted(result.delivered), result.skipped


class WakeupLog:
    """A wake-up callback that records calls and lets a test wait for expected ones."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self._changed = asyncio.Event()

    def __call__(self, ns: str, channel: str) -> None:
        self.calls.append((ns, channel))
        self._changed.set()

    async def wait_for(self, expected: set[tuple[str, str]], timeout_s: float = 2.0) -> None:
        # Shared backends deliver wake-ups from a listener task, so they may come later.
        async with asyncio.timeout(timeout_s):
            while not expected <= set(self.calls):
                self._changed.clear()
                await self._changed.wait()


# Lifecycle


async def test_connect_and_close_are_idempotent(backend: Backend) -> None:
    await backend.connect()
    assert await backend.is_ready()
    await backend.close()
    await backend.close()
    await backend.connect()
    assert await backend.is_ready()


# Channels


async def test_take_returns_messages_in_send_order(backend: Backend, ns: str) -> None:
    for payload in (b"1", b"2", b"3"):
        assert await put(backend, ns, "work", payload)
    assert await drain(backend, ns, "work") == [b"1", b"2", b"3"]
    assert await drain(backend, ns, "work") == []


async def test_take_stops_at_limit_and_leaves_the_rest(backend: Backend, ns: str) -> None:
    for payload in (b"1", b"2", b"3"):
        await put(backend, ns, "work", payload)
    assert payloads(await backend.take(ns, "work", 2, hold=False)) == [b"1", b"2"]
    assert await drain(backend, ns, "work") == [b"3"]


async def test_take_from_an_unknown_channel_returns_nothing(backend: Backend, ns: str) -> None:
    assert await backend.take(ns, "nobody", 10, hold=False) == []
    assert await backend.take(ns, "nobody", 10, hold=True) == []


async def test_take_reports_the_time_left(backend: Backend, ns: str) -> None:
    await put(backend, ns, "work", b"x", expiry_s=30)
    [message] = await backend.take(ns, "work", 1, hold=False)
    assert 25 < message.ttl_s <= 30


async def test_bytes_come_back_unchanged(backend: Backend, ns: str) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, every byte value
    await put(backend, ns, "work", payload)
    assert await drain(backend, ns, "work") == [payload]


async def test_channels_and_namespaces_are_separate(backend: Backend, ns: str) -> None:
    other = f"{ns}-other"
    await put(backend, ns, "a", b"a")
    await put(backend, ns, "b", b"b")
    await put(backend, other, "a", b"other")
    assert await drain(backend, ns, "a") == [b"a"]
    assert await drain(backend, ns, "b") == [b"b"]
    assert await drain(backend, other, "a") == [b"other"]


async def test_send_is_refused_at_capacity_until_a_take(backend: Backend, ns: str) -> None:
    for payload in (b"1", b"2", b"3"):
        assert await put(backend, ns, "work", payload, cap=3)
    assert not await put(backend, ns, "work", b"4", cap=3)
    assert await put(backend, ns, "other", b"x", cap=3), "capacity is per channel"
    await backend.take(ns, "work", 1, hold=False)
    assert await put(backend, ns, "work", b"4", cap=3)
    assert await drain(backend, ns, "work") == [b"2", b"3", b"4"]


async def test_held_messages_count_until_released(backend: Backend, ns: str) -> None:
    for payload in (b"1", b"2"):
        await put(backend, ns, "specific.c1!x", payload, cap=2)
    assert len(await backend.take(ns, "specific.c1!x", 2, hold=True)) == 2
    assert not await put(backend, ns, "specific.c1!x", b"3", cap=2), "held count toward capacity"
    await backend.release(ns, "specific.c1!x", 1)
    assert await put(backend, ns, "specific.c1!x", b"3", cap=2)
    assert not await put(backend, ns, "specific.c1!x", b"4", cap=2)
    await backend.release(ns, "specific.c1!x", 1)
    assert await put(backend, ns, "specific.c1!x", b"4", cap=2)
    assert await drain(backend, ns, "specific.c1!x") == [b"3", b"4"]


async def test_release_never_goes_below_zero(backend: Backend, ns: str) -> None:
    await put(backend, ns, "specific.c1!x", b"1", cap=2)
    await backend.take(ns, "specific.c1!x", 1, hold=True)
    await backend.release(ns, "specific.c1!x", 5)
    await backend.release(ns, "nobody", 5)
    assert await put(backend, ns, "specific.c1!x", b"2", cap=2)
    assert await put(backend, ns, "specific.c1!x", b"3", cap=2)
    assert not await put(backend, ns, "specific.c1!x", b"4", cap=2), "no credit from over-release"


async def test_given_back_messages_go_first_in_order_and_keep_their_deadline(
    backend: Backend, ns: str
) -> None:
    """What a closed connection was pushed and never acknowledged goes back to the head of
    its channel, in order, before what came meanwhile; its held count goes with it; one
    that expired meanwhile is dropped; the channel's watchers are woken."""
    channel = "specific.c1!x"
    log = WakeupLog()
    backend.set_wakeup(log)
    backend.watch(ns, "c1")
    for payload in (b"1", b"2"):
        await put(backend, ns, channel, payload, cap=4)
    await put(backend, ns, channel, b"short", cap=4, expiry_s=SHORT_S)
    taken = await backend.take(ns, channel, 3, hold=True)
    assert payloads(taken) == [b"1", b"2", b"short"]
    assert await put(backend, ns, channel, b"3", cap=4)
    assert not await put(backend, ns, channel, b"4", cap=4), "three held and one waiting"
    await asyncio.sleep(LAPSE_WAIT_S)  # the short one expires
    log.calls.clear()
    await backend.give_back(ns, channel, taken, 3)
    await log.wait_for({(ns, channel)})
    assert await backend.channels_with_messages(ns, "c1") == [channel]
    assert await put(backend, ns, channel, b"4", cap=4), "held no more: 1, 2 and 3 wait"
    assert not await put(backend, ns, channel, b"5", cap=4)
    again = await backend.take(ns, channel, 10, hold=False)
    assert payloads(again) == [b"1", b"2", b"3", b"4"]
    assert LONG_S - 10 < again[0].ttl_s <= LONG_S, "it kept its deadline"


async def test_channels_with_messages_lists_one_clients_waiting_channels(
    backend: Backend, ns: str
) -> None:
    for channel in ("specific.c1!a", "specific.c1!b", "c1!c", "specific.c2!a", "c1"):
        await put(backend, ns, channel, b"m")
    await put(backend, ns, "specific.c1!gone", b"m", expiry_s=SHORT_S)
    await put(backend, ns, "specific.c1!held", b"m")
    await backend.take(ns, "specific.c1!held", 1, hold=True)
    await put(backend, ns, "specific.c1!taken", b"m")
    await drain(backend, ns, "specific.c1!taken")
    await asyncio.sleep(LAPSE_WAIT_S)
    listed = await backend.channels_with_messages(ns, "c1")
    assert sorted(listed) == ["c1!c", "specific.c1!a", "specific.c1!b"]
    assert await backend.channels_with_messages(ns, "c3") == []
    assert await backend.channels_with_messages(f"{ns}-other", "c1") == []


# Expiry


async def test_take_never_returns_an_expired_message(backend: Backend, ns: str) -> None:
    await put(backend, ns, "work", b"short", expiry_s=SHORT_S)
    await put(backend, ns, "work", b"long")
    await put(backend, ns, "idle", b"short", expiry_s=SHORT_S)
    await asyncio.sleep(LAPSE_WAIT_S)
    assert await drain(backend, ns, "work") == [b"long"]
    assert await drain(backend, ns, "idle") == []


async def test_expired_messages_free_capacity(backend: Backend, ns: str) -> None:
    for payload in (b"1", b"2"):
        await put(backend, ns, "work", payload, cap=2, expiry_s=SHORT_S)
    assert not await put(backend, ns, "work", b"3", cap=2)
    await asyncio.sleep(LAPSE_WAIT_S)
    assert await put(backend, ns, "work", b"3", cap=2)
    assert await drain(backend, ns, "work") == [b"3"]


async def test_group_messages_expire_too(backend: Backend, ns: str) -> None:
    await join(backend, ns, "room", "a")
    await backend.group_send(ns, "room", b"m", capacity_of=capacity(10), expiry_s=SHORT_S)
    await asyncio.sleep(LAPSE_WAIT_S)
    assert await drain(backend, ns, "a") == []


# send_many


async def test_send_many_returns_the_refused_indexes(backend: Backend, ns: str) -> None:
    items = [("a", b"a1"), ("tiny", b"t1"), ("tiny", b"t2"), ("a", b"a2"), ("tiny", b"t3")]
    refused = await backend.send_many(ns, items, capacity_of=capacity(10, tiny=1), expiry_s=LONG_S)
    assert refused == [2, 4]
    assert await drain(backend, ns, "a") == [b"a1", b"a2"]
    assert await drain(backend, ns, "tiny") == [b"t1"]


# Groups


async def test_group_send_reaches_every_member(backend: Backend, ns: str) -> None:
    await join(backend, ns, "room", "a", "b", "specific.c1!x")
    assert await broadcast(backend, ns, "room", b"hi") == (["a", "b", "specific.c1!x"], 0)
    for channel in ("a", "b", "specific.c1!x"):
        assert await drain(backend, ns, channel) == [b"hi"]


async def test_group_add_is_idempotent(backend: Backend, ns: str) -> None:
    await join(backend, ns, "room", "a", "a", "a")
    assert await broadcast(backend, ns, "room", b"hi") == (["a"], 0)
    assert await drain(backend, ns, "a") == [b"hi"]


async def test_group_discard_removes_only_that_member(backend: Backend, ns: str) -> None:
    await join(backend, ns, "room", "a", "b", "c")
    await backend.group_discard(ns, "room", "b")
    assert await broadcast(backend, ns, "room", b"hi") == (["a", "c"], 0)
    assert await drain(backend, ns, "b") == []
    await put(backend, ns, "b", b"direct")
    assert await drain(backend, ns, "b") == [b"direct"], "direct sends still arrive"


async def test_group_discard_of_a_non_member_is_a_noop(backend: Backend, ns: str) -> None:
    await join(backend, ns, "room", "a")
    await backend.group_discard(ns, "room", "stranger")
    await backend.group_discard(ns, "nowhere", "a")
    assert await broadcast(backend, ns, "room", b"hi") == (["a"], 0)


async def test_group_send_to_an_unknown_group_is_a_noop(backend: Backend, ns: str) -> None:
    assert await broadcast(backend, ns, "nowhere", b"hi") == ([], 0)
    await join(backend, ns, "room", "a")
    await backend.group_discard(ns, "room", "a")
    assert await broadcast(backend, ns, "room", b"hi") == ([], 0), "an emptied group"


async def test_full_member_is_skipped_and_keeps_its_first_messages(
    backend: Backend, ns: str
) -> None:
    await join(backend, ns, "room", "full", "roomy")
    results = [
        await broadcast(backend, ns, "room", b"m%d" % i, cap=capacity(10, full=2)) for i in range(5)
    ]
    assert results == [(["full", "roomy"], 0)] * 2 + [(["roomy"], 1)] * 3
    assert await drain(backend, ns, "full") == [b"m0", b"m1"]
    assert await drain(backend, ns, "roomy") == [b"m%d" % i for i in range(5)]


async def test_membership_lapses_after_group_expiry(backend: Backend, ns: str) -> None:
    await join(backend, ns, "room", "brief", expiry_s=SHORT_S)
    await join(backend, ns, "room", "steady")
    await asyncio.sleep(LAPSE_WAIT_S)
    assert await broadcast(backend, ns, "room", b"hi") == (["steady"], 0)
    assert await drain(backend, ns, "brief") == []


async def test_group_add_renews_a_membership(backend: Backend, ns: str) -> None:
    expiry_s = 0.3
    await join(backend, ns, "room", "a", expiry_s=expiry_s)
    await asyncio.sleep(0.2)
    await join(backend, ns, "room", "a", expiry_s=expiry_s)
    await asyncio.sleep(0.2)  # 0.4 s after the first add, 0.2 s after the renewal
    assert await broadcast(backend, ns, "room", b"hi") == (["a"], 0)


# Flush


async def test_flush_empties_only_its_namespace(backend: Backend, ns: str) -> None:
    other = f"{ns}-other"
    for space in (ns, other):
        await put(backend, space, "work", b"w", cap=1)
        await put(backend, space, "specific.c1!x", b"h", cap=1)
        await backend.take(space, "specific.c1!x", 1, hold=True)
        await join(backend, space, "room", "a")
    await backend.flush(ns)
    assert await drain(backend, ns, "work") == []
    assert await put(backend, ns, "specific.c1!x", b"h2", cap=1), "held counts are dropped"
    assert await broadcast(backend, ns, "room", b"hi") == ([], 0)
    assert await drain(backend, other, "work") == [b"w"]
    assert not await put(backend, other, "specific.c1!x", b"h2", cap=1), "still held"
    assert await broadcast(backend, other, "room", b"hi") == (["a"], 0)
    await backend.flush(other)


# Wake-ups


async def test_every_enqueue_wakes_its_channel(backend: Backend, ns: str) -> None:
    log = WakeupLog()
    backend.set_wakeup(log)
    backend.watch(ns, "work")  # a normal channel with pullers
    backend.watch(ns, "c1")  # a client id: all of specific.c1!...
    await put(backend, ns, "work", b"1")
    await backend.send_many(
        ns, [("specific.c1!a", b"2")], capacity_of=capacity(10), expiry_s=LONG_S
    )
    await join(backend, ns, "room", "specific.c1!b")
    await broadcast(backend, ns, "room", b"3")
    await log.wait_for({(ns, "work"), (ns, "specific.c1!a"), (ns, "specific.c1!b")})
    backend.unwatch(ns, "work")
    backend.unwatch(ns, "c1")


# Stats


@pytest.mark.backends("memory")  # a shared backend reports its last reading, not this moment's
async def test_stats_follow_a_mixed_sequence(backend: Backend, ns: str) -> None:
    before = backend.stats()
    await put(backend, ns, "a", b"1")
    await put(backend, ns, "a", b"2")
    await put(backend, ns, "b", b"3", expiry_s=SHORT_S)
    await put(backend, ns, "specific.c1!x", b"4")
    await backend.take(ns, "specific.c1!x", 1, hold=True)
    await join(backend, ns, "room", "a", "b")
    await join(backend, ns, "hall", "a")
    await asyncio.sleep(LAPSE_WAIT_S)
    await drain(backend, ns, "b")  # finds its message expired
    await backend.take(ns, "a", 1, hold=False)
    stats = backend.stats()
    assert stats.channels_waiting - before.channels_waiting == 1  # "a"
    assert stats.messages_waiting - before.messages_waiting == 1
    assert stats.groups - before.groups == 2
    assert stats.memberships - before.memberships == 3
    assert stats.expired_total - before.expired_total == 1
    await backend.flush(ns)
    after = backend.stats()
    gauges = ("channels_waiting", "messages_waiting", "groups", "memberships")
    assert [getattr(after, name) for name in gauges] == [getattr(before, name) for name in gauges]
    assert after.expired_total - before.expired_total == 1, "a total, not a gauge"
