"""Redis, two daemons: a group_send through one daemon to members whose owner is attached
to the other goes as one record per owner, pushed by the owner's daemon as one PUSH
(``backends.redis.remote``): no message stored per member, each member's capacity kept
by its layer, and a killed or cut owner's daemon loses none and doubles none.

The owner's daemon counts what its layer kept at the edge
(``channels_broker_messages_delivered_total{mode="edge"}``) and pushed from storage
(``mode="push"``): a message stored per member is pushed, so ``push`` stays 0 only
when no member got a copy of its own.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from broker.layer import BrokerChannelLayer
from protocol import GroupSend, Push, encode_frame
from tests import servers
from tests.broker.daemon.test_edge_fanout import _raw_member
from tests.broker.daemon.test_edge_faults import (
    check,
    fault_round,
)
from tests.broker.raw_client import RawClient, hello
from tests.broker.samples import settled, value
from tests.conftest import BrokerProcess
from tests.waits import assert_nothing_within, receive

pytestmark = pytest.mark.backends("redis", "redis+cluster")

ACCEPTED = "channels_broker_messages_accepted_total"
DELIVERED = "channels_broker_messages_delivered_total"
DROPPED = "channels_broker_messages_dropped_total"


@pytest.fixture(
    scope="module", params=["redis://", "redis+cluster://"], ids=["redis", "redis+cluster"]
)
def backend_url(request: pytest.FixtureRequest) -> str:
    """Both daemons of a test share the session's Redis (or Cluster)."""
    url: str = servers.backend_url(request.param)
    return url


async def test_members_on_another_daemon_get_one_push_per_owner(
    broker_factory: Callable[..., BrokerProcess], unique: Callable[[str], str]
) -> None:
    """1. Three members on daemon B (two owners), a sender on daemon A: five sends.
    2. Each member gets each message once, in order.
    3. B delivered them all at the edge, none pushed from storage (no per-member copy),
       and counted them accepted."""
    a, b = broker_factory(), broker_factory()
    sender = BrokerChannelLayer(hosts=[a.url])
    first, second = BrokerChannelLayer(hosts=[b.url]), BrokerChannelLayer(hosts=[b.url])
    try:
        group = unique("room")
        members = [(layer, await layer.new_channel()) for layer in (first, first, second)]
        for layer, channel in members:
            await layer.group_add(group, channel)
        for n in range(5):
            await sender.group_send(group, {"n": n})
        for layer, channel in members:
            assert [(await receive(layer, channel))["n"] for _ in range(5)] == list(range(5))
        for layer, channel in members:
            await assert_nothing_within(layer, channel, 0.1)
        samples = await settled(b, DELIVERED, 15, mode="edge")
        assert value(samples, DELIVERED, mode="push") == 0
        assert value(samples, ACCEPTED, operation="group_send") == 15
    finally:
        for layer in (sender, first, second):
            await layer.close()


async def test_capacity_of_members_on_another_daemon_is_kept_by_their_layer(
    broker_factory: Callable[..., BrokerProcess], unique: Callable[[str], str]
) -> None:
    """capacity 2, three sends from daemon A, nobody on daemon B reads: each member
    keeps the first two, the third is dropped by the layer and counted by B."""
    a, b = broker_factory(), broker_factory()
    sender = BrokerChannelLayer(hosts=[a.url], capacity=2)
    owner = BrokerChannelLayer(hosts=[b.url], capacity=2)
    try:
        group = unique("room")
        channels = [await owner.new_channel() for _ in range(3)]
        for channel in channels:
            await owner.group_add(group, channel)
        for n in range(3):
            await sender.group_send(group, {"n": n})
        samples = await settled(b, DROPPED, 3)
        assert value(samples, DELIVERED, mode="edge") == 6
        assert value(samples, DELIVERED, mode="push") == 0
        for channel in channels:
            assert [(await receive(owner, channel))["n"] for _ in range(2)] == [0, 1]
            await assert_nothing_within(owner, channel, 0.1)
    finally:
        await sender.close()
        await owner.close()


async def test_a_layer_of_version_1_on_another_daemon_gets_stored_pushes(
    broker_factory: Callable[..., BrokerProcess], unique: Callable[[str], str]
) -> None:
    """A connection that does not take fan-outs is not marked (as none of a daemon of
    an earlier release is): its members get the message stored and pushed, the
    other's one fan-out."""
    a, b = broker_factory(), broker_factory()
    group = unique("room")
    old = await _raw_member(b, 1, "asgi.CLIENT!a", group)
    new = await _raw_member(b, 2, "asgi.CLIENT!a", group)
    sender = await RawClient.open(a.address)
    await sender.write(hello() + encode_frame(GroupSend(1, group, b"\x80")))
    for client, fanout_capacity in ((old, 0), (new, 100)):
        push = await client.next_frame()
        assert isinstance(push, Push) and push.payload == b"\x80"
        assert push.fanout_capacity == fanout_capacity
    for client in (old, new, sender):
        client.writer.close()


@pytest.mark.parametrize("fault", ["cut", "kill"])
async def test_fan_outs_to_another_daemon_in_flight_are_neither_lost_nor_doubled(
    fault: str,
    broker_factory: Callable[..., BrokerProcess],
    unique: Callable[[str], str],
) -> None:
    """1. A consumer (behind a proxy) on daemon B, whose two channels are a group's
       members; a sender on daemon A.
    2. After 150 group_sends the proxy holds what B writes to the consumer; after 150
       more the proxy cuts the consumer off ("cut"), or B is killed with SIGKILL and
       started again ("kill"); 300 more are sent.
    3. Every message reaches the consumer's application exactly once, and B pushed
       fan-outs at the edge after it came back."""
    a, b = broker_factory(), broker_factory()
    got, proxy, edge = await fault_round(a, b, fault, unique("room"))
    check(got, proxy)
    assert edge > 0, "group messages went at the edge of the owner's daemon"
