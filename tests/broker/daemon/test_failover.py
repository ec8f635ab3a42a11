"""Redis failed over under traffic: Sentinel promotes the replica, a Cluster promotes
the replica of one primary, a Cluster slot moves to another primary.

One daemon process on throwaway replicated servers (``tests.redis_replicas``); a sender
sends numbered messages, one after the other, to a consumer's own channel (pushed) and
to a normal channel a worker pulls. Mid-traffic the topology changes under the daemon.
Every message is counted: each accepted send reaches its reader once and in order, and
delivery resumes within ``RESUME_S``.

The failovers are the graceful kind an operator runs: the replica has every write of the
old primary when it takes over, and the old primary takes none after. ``CLUSTER
FAILOVER`` is that by itself; ``SENTINEL FAILOVER`` is not (the old primary accepts
writes until Sentinel demotes it, seconds later, then drops them), so the Sentinel
switchover pauses writes on the old primary first (``SentinelGroup.fail_over``). A
primary that dies before its replica has a write loses that write with it; Redis
replication is asynchronous (docs/redis.md says what that means for a site).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from backends.redis.keys import Keys
from tests import servers
from tests.broker.daemon.traffic import Readers, assert_once_in_order, send_until_accepted
from tests.redis_replicas import SWITCH_TIMEOUT_S, ReplicatedCluster, SentinelGroup

#: The message before which the topology changes, and how many are sent after the
#: change is complete (however many went while it was under way).
SWITCH_AT = 100
AFTER_SWITCH = 100
#: Pause between two sends, so that the switch meets messages still coming.
SEND_INTERVAL_S = 0.005
#: The daemon's per-operation deadline (the ``timeout`` URL option).
TIMEOUT_S = 1.0
#: The longest pause in delivery a failover may cause: Sentinel's and the Cluster's
#: own switch takes a second or two here, the daemon's reconnect a timeout more.
RESUME_S = 10.0
#: The layers' prefix: the namespace in the keys' hash tags, to find their slots.
PREFIX = "failover"

pytestmark = pytest.mark.timeout(180)


def _require_redis() -> None:
    if not servers.redis_available():
        pytest.fail("redis-server and redis-cli are needed for failover tests", pytrace=False)


@pytest.fixture(scope="module")
def sentinel_group() -> Iterator[SentinelGroup]:
    _require_redis()
    group = SentinelGroup()
    try:
        group.start()
        yield group
    finally:
        group.stop()


@pytest.fixture(scope="module")
def cluster() -> Iterator[ReplicatedCluster]:
    _require_redis()
    made = ReplicatedCluster()
    try:
        made.start()
        yield made
    finally:
        made.stop()


@pytest.fixture
def backend_url(request: pytest.FixtureRequest) -> str:
    """The daemon's ``--backend``: the topology the test names (overrides the parameter)."""
    topology: SentinelGroup | ReplicatedCluster = request.getfixturevalue(request.param)
    return f"{topology.url}?prefix={servers.session_prefix}&timeout={TIMEOUT_S}"


def slot_of(channel: str) -> int:
    """The Cluster slot of a channel's keys (its client's, for a process-specific one)."""
    return int(key_slot(("{" + Keys.tag(PREFIX, channel) + "}").encode()))


def longest_pause(arrived_at: dict[int, float]) -> float:
    """The longest time between two messages arriving, in the order they arrived."""
    times = sorted(arrived_at.values())
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


async def run_traffic(
    make_layer: Callable[..., Any], unique: Callable[[str], str], switch: Callable[..., Any]
) -> None:
    """Send numbered messages to both channels: ``SWITCH_AT`` of them, then on while
    ``switch(channels)`` runs in a thread, then ``AFTER_SWITCH`` more; check what the
    readers got."""
    sender, consumer, worker = (make_layer(prefix=PREFIX) for _ in range(3))
    channels = [await consumer.new_channel(), unique("work")]
    retried: set[int] = set()
    async with Readers(zip((consumer, worker), channels, strict=True)) as readers:
        switching: asyncio.Task[Any] | None = None
        left = AFTER_SWITCH
        n = 0
        while left:
            if n == SWITCH_AT:
                switching = asyncio.create_task(asyncio.to_thread(switch, channels))
            for channel in channels:
                if await send_until_accepted(sender, channel, {"n": n}):
                    retried.add(n)
            n += 1
            if switching is not None and switching.done():
                left -= 1
            await asyncio.sleep(SEND_INTERVAL_S)
        assert switching is not None
        await switching  # its exception, if any
        await readers.wait_for_all(n)
    for channel in channels:
        assert_once_in_order(readers.got[channel], n)
        pause = longest_pause(readers.arrived_at[channel])
        assert pause < RESUME_S, f"delivery stopped for {pause:.1f} s on {channel}"
    print(f"{n} messages; sends retried during the switch: {sorted(retried)}")


@pytest.mark.parametrize("backend_url", ["sentinel_group"], indirect=True)
async def test_sentinel_failover_mid_traffic_loses_and_doubles_nothing(
    make_own_layer: Callable[..., Any],
    unique: Callable[[str], str],
    sentinel_group: SentinelGroup,
) -> None:
    """Sentinel promotes the replica while messages flow: the daemon finds the new
    primary through the Sentinels and every message arrives once, in order."""
    before = sentinel_group.primary_port()
    await run_traffic(make_own_layer, unique, lambda _channels: sentinel_group.fail_over())
    assert sentinel_group.primary_port() != before


def test_sentinel_switchover_keeps_every_acknowledged_write(sentinel_group: SentinelGroup) -> None:
    """The test's Sentinel switchover itself loses nothing: every write the old primary
    acknowledged is on the new one (``SENTINEL FAILOVER`` alone let the old primary
    accept writes for seconds after the promotion, then dropped them)."""
    acknowledged = 0
    wrote, done = threading.Event(), threading.Event()

    def write(old: redis.Redis) -> None:
        nonlocal acknowledged
        while not done.is_set():
            try:
                acknowledged = int(old.incr(PREFIX))
            except redis.RedisError:  # demoted (READONLY) or cut off: it took no write
                return
            wrote.set()

    with redis.Redis(port=sentinel_group.primary_port(), socket_timeout=SWITCH_TIMEOUT_S) as old:
        writer = threading.Thread(target=write, args=(old,))
        writer.start()
        try:
            assert wrote.wait(SWITCH_TIMEOUT_S)
            new = sentinel_group.fail_over()
        finally:
            done.set()
            writer.join()
    with redis.Redis(port=new) as client:
        assert int(client.get(PREFIX) or 0) >= acknowledged


@pytest.mark.parametrize("backend_url", ["cluster"], indirect=True)
async def test_cluster_failover_mid_traffic_loses_and_doubles_nothing(
    make_own_layer: Callable[..., Any], unique: Callable[[str], str], cluster: ReplicatedCluster
) -> None:
    """The replica of the primary serving the worker's channel takes over, then the one
    serving the consumer's channels (the same primary or another)."""
    moved: list[tuple[int, int, int]] = []

    def switch(channels: list[str]) -> None:
        for channel in reversed(channels):
            slot = slot_of(channel)
            before = cluster.owner_port(slot)
            moved.append((slot, before, cluster.fail_over(slot)))

    started = time.monotonic()
    await run_traffic(make_own_layer, unique, switch)
    assert all(before != after for _, before, after in moved), moved
    print(f"failovers {moved} in {time.monotonic() - started:.1f} s of traffic")


@pytest.mark.parametrize("backend_url", ["cluster"], indirect=True)
async def test_cluster_slot_moved_mid_traffic_loses_and_doubles_nothing(
    make_own_layer: Callable[..., Any], unique: Callable[[str], str], cluster: ReplicatedCluster
) -> None:
    """The slots of both channels move to another primary, keys migrated while the
    sender goes on (the daemon follows ASK, then MOVED)."""
    moved: list[tuple[int, int, int]] = []

    def switch(channels: list[str]) -> None:
        for channel in channels:
            slot = slot_of(channel)
            before = cluster.owner_port(slot)
            moved.append((slot, before, cluster.move_slot(slot)))

    await run_traffic(make_own_layer, unique, switch)
    assert all(before != after for _, before, after in moved), moved
