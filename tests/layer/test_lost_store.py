"""A layer that reconnects to a memory daemon that lost its store knows it.

WELCOME names the daemon's store (its incarnation). A daemon on memory:// killed and
started again without ``--state-file`` has a new, empty store: the layer's waiting
receives go on on the new daemon, every membership it made (of its own channels and of
others, a worker's normal channel) is added again, and one warning says what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest

from broker.layer import BrokerChannelLayer
from broker.layer.memberships import Memberships
from broker.layer.problems import LayerConfigError
from broker.layer.sync import layer_for
from tests.waits import IN_FLIGHT_S, RECONNECT_TIMEOUT_S, receive

#: Pause between group_sends while the member's layer reconnects.
GROUP_SEND_INTERVAL_S = 0.2


async def _group_send_until(sender: Any, group: str, waiting: asyncio.Task[Any]) -> Any:
    """group_send until ``waiting`` (a receive of a member) ends; what it got."""
    n = 0
    while not waiting.done():
        with contextlib.suppress(ConnectionError):  # the sender may be reconnecting too
            await sender.group_send(group, {"n": n})
        n += 1
        await asyncio.wait([waiting], timeout=GROUP_SEND_INTERVAL_S)
    return waiting.result()


@pytest.mark.backends("memory")
async def test_a_lost_store_is_seen_and_every_membership_added_again(
    own_broker: Any,
    make_own_layer: Callable[..., Any],
    unique: Callable[[str], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """1. A consumer adds its own channel to one group, a worker's normal channel to
       another, and one more through the blocking API (sync code), and waits in
       receive() on each.
    2. The daemon is SIGKILLed and started again: a new, empty store.
    3. group_sends to each group reach the waiting receives (they went on waiting on
       the new daemon, and the memberships were added again); one warning said so.
    4. A direct send still reaches each channel."""
    consumer, sender = make_own_layer(), make_own_layer()
    own, work, blocking = await consumer.new_channel(), unique("work"), unique("blocking")
    groups = {own: unique("own"), work: unique("work"), blocking: unique("blocking")}
    await consumer.group_add(groups[own], own)
    await consumer.group_add(groups[work], work)
    await asyncio.to_thread(layer_for(consumer).group_add, groups[blocking], blocking)
    waiting = {channel: asyncio.create_task(consumer.receive(channel)) for channel in groups}
    await asyncio.sleep(IN_FLIGHT_S)  # let the receives reach the daemon
    caplog.set_level(logging.WARNING, "channels_broker.layer")

    own_broker.kill()
    await asyncio.to_thread(own_broker.start)

    for channel, group in groups.items():
        got = await asyncio.wait_for(
            _group_send_until(sender, group, waiting[channel]), RECONNECT_TIMEOUT_S
        )
        assert "n" in got
    lost = [r for r in caplog.records if "store was lost" in r.getMessage()]
    assert len(lost) == 1, [r.getMessage() for r in caplog.records]
    assert "3 group memberships" in lost[0].getMessage()
    assert "--state-file" in lost[0].getMessage()
    assert consumer.memberships.stores_lost == 1
    for channel in groups:
        while True:  # what the group_send retries left
            try:
                await asyncio.wait_for(consumer.receive(channel), IN_FLIGHT_S)
            except TimeoutError:
                break
        await sender.send(channel, {"direct": True})
        assert await receive(consumer, channel) == {"direct": True}


def test_memberships_are_bounded_and_forget_the_oldest(caplog: pytest.LogCaptureFixture) -> None:
    """Past the bound the oldest memberships are forgotten, counted and logged once;
    a discarded one is not added again after a lost store."""
    memberships = Memberships(group_expiry_s=86_400, limit=3)
    for n in range(5):
        memberships.added("room", f"channel{n}")
    memberships.discarded("room", "channel3")
    assert memberships.forgotten == 2
    assert len([r for r in caplog.records if "remembers at most 3" in r.getMessage()]) == 1
    next_id = itertools.count(1).__next__
    assert memberships.welcomed("first", next_id) == []  # the first store: nothing to re-add
    assert memberships.welcomed("first", next_id) == []
    again = memberships.welcomed("second", next_id)
    assert [(f.group, f.channel) for f in again] == [("room", "channel2"), ("room", "channel4")]
    assert memberships.welcomed("", next_id) == []  # a shared store, or an older daemon
    # Back and forth between two daemons: added again each time, warned once per store.
    assert len(memberships.welcomed("first", next_id)) == 2
    assert len(memberships.welcomed("second", next_id)) == 2
    warned = [r for r in caplog.records if "store was lost" in r.getMessage()]
    assert len(warned) == 2 and memberships.stores_lost == 3


def test_the_bound_is_the_config_key_remembered_memberships() -> None:
    layer = BrokerChannelLayer(remembered_memberships=2)
    for n in range(3):
        layer.memberships.added("room", f"channel{n}")
    assert layer.memberships.forgotten == 1
    with pytest.raises(LayerConfigError, match="remembered_memberships"):
        BrokerChannelLayer(remembered_memberships=0)


def test_past_the_bound_an_add_costs_what_it_costs_below_it() -> None:
    """Forgetting the oldest at the bound is O(1) per add (it was a walk over the dead
    slots at the head of a plain dict: 70 s for 400,000 adds past a bound of 100,000)."""

    def seconds_for_adds(limit: int, count: int = 60_000) -> float:
        memberships = Memberships(group_expiry_s=86_400, limit=limit)
        started = time.perf_counter()
        for n in range(count):
            memberships.added(f"room{n % 100}", f"channel{n}")
        return time.perf_counter() - started

    below = min(seconds_for_adds(limit=100_000) for _ in range(3))
    past = min(seconds_for_adds(limit=20_000) for _ in range(3))
    assert past < 4 * below, (past, below)
