"""A group_send to members whose owner is connected goes out as one PUSH per owning
connection; their layers apply capacity and say what they kept and dropped
(``backends.fanout``). Memory stores nothing for them; Redis (and Cluster) keeps one
leased record per owning client, no copy per member (``backends.redis.edge``).

These tests watch the path (``channels_broker_messages_delivered_total{mode="edge"}``),
the accounting (accepted, dropped), what a layer of protocol version 1 still gets, order
beside sends, membership changes between sends, and the daemon's CPU per send.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from broker.bench.usage import cpu_seconds
from protocol import GroupAdd, GroupSend, Ok, Push, Welcome, encode_frame
from tests.broker.raw_client import RawClient, hello
from tests.broker.samples import settled, value
from tests.conftest import LayerFactory
from tests.waits import assert_nothing_within, receive

pytestmark = pytest.mark.backends("memory", "redis", "redis+cluster")

ACCEPTED = "channels_broker_messages_accepted_total"
DELIVERED = "channels_broker_messages_delivered_total"
DROPPED = "channels_broker_messages_dropped_total"

#: Members of the room the CPU test sends to, as the issue's big room.
ROOM_MEMBERS = 10_000
#: Each member cost the daemon about 4.2 us before (42 ms a send); at the edge, work
#: per owning connection, it is about 1-3 ms. The bound leaves room for a loaded machine.
MAX_CPU_PER_SEND_S = 0.015


async def test_members_connected_here_get_one_push_per_connection(
    own_broker: Any, make_own_layer: Callable[..., Any], unique: Callable[[str], str]
) -> None:
    sender, first, second = make_own_layer(), make_own_layer(), make_own_layer()
    group = unique("room")
    members = [(layer, await layer.new_channel()) for layer in (first, first, second)]
    for layer, channel in members:
        await layer.group_add(group, channel)
    for n in range(5):
        await sender.group_send(group, {"n": n})
    for layer, channel in members:
        assert [(await receive(layer, channel))["n"] for _ in range(5)] == list(range(5))
    samples = await settled(own_broker, DELIVERED, 15, mode="edge")
    assert value(samples, DELIVERED, mode="push") == 0
    assert value(samples, ACCEPTED, operation="group_send") == 15


async def test_full_members_drop_at_the_edge_and_are_counted(
    own_broker: Any, make_own_layer: Callable[..., Any], unique: Callable[[str], str]
) -> None:
    """capacity 2, three sends, nobody reads: each member keeps the first two."""
    sender, owner = make_own_layer(capacity=2), make_own_layer(capacity=2)
    group = unique("room")
    channels = [await owner.new_channel() for _ in range(3)]
    for channel in channels:
        await owner.group_add(group, channel)
    for n in range(3):
        await sender.group_send(group, {"n": n})
    samples = await settled(own_broker, DROPPED, 3)
    assert value(samples, ACCEPTED, operation="group_send") == 6
    assert value(samples, DELIVERED, mode="edge") == 6
    for channel in channels:
        assert [(await receive(owner, channel))["n"] for _ in range(2)] == [0, 1]
        await assert_nothing_within(owner, channel, 0.1)


async def test_order_holds_beside_sends(
    make_layer: Callable[..., Any], unique: Callable[[str], str]
) -> None:
    """Sends wait in storage to be pushed while group messages go at the edge: each
    channel still gets them in the order they were sent."""
    sender, owner = make_layer(), make_layer()
    group = unique("room")
    channels = [await owner.new_channel() for _ in range(4)]
    for channel in channels:
        await owner.group_add(group, channel)
    for n in range(60):  # each awaited in turn, as a consumer sends
        if n % 3:
            await sender.group_send(group, {"n": n})
        else:
            await sender.send(channels[n % 4], {"n": n})
    for index, channel in enumerate(channels):
        wanted = [n for n in range(60) if n % 3 or n % 4 == index]
        got = [(await receive(owner, channel))["n"] for _ in wanted]
        assert got == wanted


async def test_membership_changes_reach_the_next_send(
    make_layer: Callable[..., Any], unique: Callable[[str], str]
) -> None:
    """The member list kept ready for a fan-out is made again once a member goes or comes."""
    sender, owner = make_layer(), make_layer()
    group = unique("room")
    leaving, staying, joining = [await owner.new_channel() for _ in range(3)]
    for channel in (leaving, staying):
        await owner.group_add(group, channel)
    await sender.group_send(group, {"n": 1})
    await owner.group_discard(group, leaving)
    await owner.group_add(group, joining)
    await sender.group_send(group, {"n": 2})
    assert [(await receive(owner, staying))["n"] for _ in range(2)] == [1, 2]
    assert (await receive(owner, leaving))["n"] == 1
    assert (await receive(owner, joining))["n"] == 2
    await assert_nothing_within(owner, leaving, 0.1)
    await assert_nothing_within(owner, joining, 0.1)


async def _raw_member(broker: Any, version: int, channel: str, group: str) -> RawClient:
    client = await RawClient.open(broker.address)
    await client.write(hello(version))
    welcome = await client.next_frame()
    assert isinstance(welcome, Welcome)
    member = channel.replace("CLIENT", welcome.client_id)
    await client.write(encode_frame(GroupAdd(1, group, member)))
    assert isinstance(await client.next_frame(), Ok)
    return client


async def test_a_layer_of_version_1_gets_stored_pushes(
    broker: Any, unique: Callable[[str], str]
) -> None:
    group = unique("room")
    old = await _raw_member(broker, 1, "asgi.CLIENT!a", group)
    new = await _raw_member(broker, 2, "asgi.CLIENT!a", group)
    sender = await RawClient.open(broker.address)
    await sender.write(hello() + encode_frame(GroupSend(1, group, b"\x80")))
    for client, fanout_capacity in ((old, 0), (new, 100)):
        push = await client.next_frame()
        assert isinstance(push, Push) and push.payload == b"\x80"
        assert push.fanout_capacity == fanout_capacity
    for client in (old, new, sender):
        client.writer.close()


async def test_daemon_cpu_per_group_send_to_a_big_room(
    own_broker: Any, make_own_layer: Callable[..., Any]
) -> None:
    """10,000 members over two connections: the daemon's CPU per group_send."""
    sender, owners = make_own_layer(), [make_own_layer(), make_own_layer()]
    channels = []
    for owner in owners:
        names = [await owner.new_channel() for _ in range(ROOM_MEMBERS // len(owners))]
        for start in range(0, len(names), 200):
            await asyncio.gather(*(owner.group_add("big", c) for c in names[start : start + 200]))
        channels.append((owner, names))
    await sender.group_send("big", {"n": -1})  # the member lists are made once
    sends = 10
    before = cpu_seconds(own_broker.process.pid)
    for n in range(sends):
        await sender.group_send("big", {"n": n})
    for owner, names in channels:  # the last push of each connection is out
        got = [(await receive(owner, names[0]))["n"] for _ in range(sends + 1)]
        assert got == list(range(-1, sends))
    used = cpu_seconds(own_broker.process.pid)
    assert before is not None and used is not None
    per_send_s = (used - before) / sends
    for owner, names in channels:  # every member got every message
        for channel in names[1 :: len(names) // 10]:
            got = [(await receive(owner, channel))["n"] for _ in range(sends + 1)]
            assert got == list(range(-1, sends))
    assert per_send_s < MAX_CPU_PER_SEND_S, f"{per_send_s * 1000:.1f} ms per group_send"


async def test_a_member_list_over_a_push_pass_is_stored_per_member(
    broker_factory: Callable[..., Any], unique: Callable[[str], str]
) -> None:
    """A fan-out PUSH is no larger than a push pass writes (a quarter of
    --max-output-bytes here: 1 KiB): a larger one is stored and pushed in passes."""
    daemon = broker_factory(max_message_bytes=1024, extra_args=("--max-output-bytes", "4096"))
    factory = LayerFactory(daemon)
    try:
        sender, owner = factory(), factory()
        group = unique("room")
        channels = [await owner.new_channel() for _ in range(40)]  # about 2 KiB of names
        for channel in channels:
            await owner.group_add(group, channel)
        await sender.group_send(group, {"n": 1})
        for channel in channels:
            assert (await receive(owner, channel))["n"] == 1
        samples = await settled(daemon, DELIVERED, 40, mode="push")
        assert value(samples, DELIVERED, mode="edge") == 0
    finally:
        await factory.aclose()
