"""PostgreSQL: sends and group_sends push to channels connected to the same daemon directly.

Storing a message only to take it back out costs two database round trips per
recipient; the daemon skips both for channels whose owner is connected to it and that
have nothing waiting or held in the database. These tests watch which path each message took
(``channels_broker_messages_delivered_total`` by mode: ``direct`` or ``push``) and
that order and capacity hold across the two paths.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from tests import pg_server
from tests.broker.samples import scrape, settled, value
from tests.proxy import CutProxy
from tests.waits import IN_FLIGHT_S, receive

BACKEND_KIND = "shared"
DELIVERED = "channels_broker_messages_delivered_total"


@pytest.fixture(scope="module")
def backend_url() -> str:
    """The session's PostgreSQL (overrides the per-backend parameter)."""
    return pg_server.backend_url("postgresql://")


@pytest.fixture
def own_broker(broker_factory: Callable[..., Any]) -> Any:
    """A daemon of the test's own, with send windows off: these tests are about
    requests (``push_direct``) and group sends; windowed sends, which go direct too
    (schema 10), have tests of their own below."""
    return broker_factory(extra_args=("--send-window", "0"))


async def test_group_send_to_members_connected_here_stores_nothing(
    own_broker: Any, make_own_layer: Callable[..., Any], unique: Callable[[str], str]
) -> None:
    """Members on two connections of this daemon: every message goes direct, in order."""
    sender, first, second = make_own_layer(), make_own_layer(), make_own_layer()
    group = unique("room")
    members = [(first, await first.new_channel()), (second, await second.new_channel())]
    for layer, channel in members:
        await layer.group_add(group, channel)
    for n in range(20):
        await sender.group_send(group, {"n": n})
    for layer, channel in members:
        assert [(await receive(layer, channel))["n"] for _ in range(20)] == list(range(20))
    samples = await settled(own_broker, DELIVERED, 40, mode="direct")
    assert value(samples, DELIVERED, mode="push") == 0


async def test_sends_to_a_channel_connected_here_go_direct_in_order(
    own_broker: Any, make_own_layer: Callable[..., Any], unique: Callable[[str], str]
) -> None:
    sender, owner = make_own_layer(), make_own_layer()
    channel = await owner.new_channel()
    await owner.group_add(unique("connect"), channel)  # layers connect on first use
    for n in range(10):
        await sender.send(channel, {"n": n})
    assert [(await receive(owner, channel))["n"] for _ in range(10)] == list(range(10))
    samples = await settled(own_broker, DELIVERED, 10, mode="direct")
    assert value(samples, DELIVERED, mode="push") == 0


async def test_windowed_sends_to_a_channel_connected_here_go_direct_in_order(
    broker_factory: Callable[..., Any],
    make_own_layer: Callable[..., Any],
    unique: Callable[[str], str],
) -> None:
    """With send windows (the default), a sender's windowed SENDs to a channel whose
    owner is connected to the same daemon are pushed directly once nothing of that
    channel waits or is held in the database beyond send room: the first send (a
    request, stored) is read, then each windowed one is read before the next."""
    windowed = broker_factory()
    sender, owner = make_own_layer(hosts=[windowed.url]), make_own_layer(hosts=[windowed.url])
    channel = await owner.new_channel()
    await owner.group_add(unique("connect"), channel)  # layers connect on first use
    got = []
    for n in range(30):
        await sender.send(channel, {"n": n})
        got.append((await receive(owner, channel))["n"])
    assert got == list(range(30))
    samples = await asyncio.to_thread(scrape, windowed)
    direct, pushed = (value(samples, DELIVERED, mode=mode) for mode in ("direct", "push"))
    assert direct + pushed == 30
    # The first few are stored: the first send's ACK releases its held count in the
    # background, and a send meanwhile sees it held.
    assert direct >= 20, f"{direct} of 30 went direct"


async def test_windowed_sends_go_direct_behind_a_stored_message_pushed_and_unread(
    broker_factory: Callable[..., Any],
    make_own_layer: Callable[..., Any],
    unique: Callable[[str], str],
) -> None:
    """A stored message taken and pushed to its owner, its ACK not back yet (the owner
    reaches the daemon through a proxy that holds the daemon's writes), is held in the
    database, but it went out before anything sent after: windowed sends behind it go
    direct (only messages waiting untaken keep them stored), and arrive after it."""
    windowed = broker_factory()
    proxy = CutProxy(windowed.address)
    await proxy.start()
    sender, owner = make_own_layer(hosts=[windowed.url]), make_own_layer(hosts=[proxy.url])
    try:
        channel = await owner.new_channel()
        await owner.group_add(unique("connect"), channel)  # layers connect on first use
        proxy.stall_replies()
        await sender.send(channel, {"n": 0})  # a request: stored, then taken and pushed
        await settled(windowed, DELIVERED, 1, mode="push")
        for n in range(1, 21):
            await sender.send(channel, {"n": n})
        samples = await settled(windowed, DELIVERED, 20, mode="direct")
        assert value(samples, DELIVERED, mode="push") == 1
        proxy.resume()
        assert [(await receive(owner, channel))["n"] for _ in range(21)] == list(range(21))
    finally:
        await owner.close()
        await proxy.close()


async def test_a_member_with_messages_in_storage_gets_the_group_send_after_them(
    own_broker: Any,
    broker_factory: Callable[..., Any],
    make_own_layer: Callable[..., Any],
    unique: Callable[[str], str],
) -> None:
    """Messages stored through another daemon, pushed here and unread, are held in the
    database: the next group_send is stored behind them; once they are read, group
    sends go direct again."""
    other = broker_factory(extra_args=("--send-window", "0"))  # its room would count as held
    remote, local, owner = make_own_layer(hosts=[other.url]), make_own_layer(), make_own_layer()
    group, channel = unique("room"), await owner.new_channel()
    await owner.group_add(group, channel)
    for n in range(3):
        await remote.send(channel, {"n": n})
    await settled(own_broker, DELIVERED, 3, mode="push")  # in the owner's buffer, unread
    await local.group_send(group, {"n": 3})
    assert [(await receive(owner, channel))["n"] for _ in range(4)] == [0, 1, 2, 3]
    samples = await settled(own_broker, DELIVERED, 4, mode="push")
    assert value(samples, DELIVERED, mode="direct") == 0
    await asyncio.sleep(IN_FLIGHT_S)  # the acknowledgements reach the database
    await local.group_send(group, {"n": 4})
    assert (await receive(owner, channel))["n"] == 4
    await settled(own_broker, DELIVERED, 1, mode="direct")


async def test_direct_pushes_count_against_capacity_until_read(
    own_broker: Any, make_own_layer: Callable[..., Any], unique: Callable[[str], str]
) -> None:
    """Capacity 2: two group_sends go direct and stay unread; a send is refused, a third
    group_send skips the member; once both are read, there is room again."""
    from channels.exceptions import ChannelFull

    sender, owner = make_own_layer(capacity=2), make_own_layer(capacity=2)
    group, channel = unique("room"), await owner.new_channel()
    await owner.group_add(group, channel)
    await sender.group_send(group, {"n": 0})
    await sender.group_send(group, {"n": 1})
    await settled(own_broker, DELIVERED, 2, mode="direct")
    with pytest.raises(ChannelFull):
        await sender.send(channel, {"n": "refused"})
    await sender.group_send(group, {"n": "skipped"})
    await sender.ping()  # answered after the group send (numbered: it returned once written)
    assert value(scrape(own_broker), "channels_broker_messages_dropped_total") == 1
    assert [(await receive(owner, channel))["n"] for _ in range(2)] == [0, 1]
    await asyncio.sleep(IN_FLIGHT_S)  # the acknowledgements reach the daemon
    await sender.send(channel, {"n": 2})
    assert (await receive(owner, channel))["n"] == 2


async def test_concurrent_sends_to_a_full_channel_let_one_through(
    own_broker: Any, make_own_layer: Callable[..., Any], unique: Callable[[str], str]
) -> None:
    """Capacity 1, two senders at once: the room is taken when the daemon decides to push,
    not when it pushes, so exactly one send is refused."""
    from channels.exceptions import ChannelFull

    owner, first, second = (make_own_layer(capacity=1) for _ in range(3))
    channel = await owner.new_channel()
    for layer in (owner, first, second):  # connected before the race
        await layer.group_add(unique("connect"), channel)
    outcomes = await asyncio.gather(
        first.send(channel, {"n": 1}), second.send(channel, {"n": 2}), return_exceptions=True
    )
    assert sum(isinstance(outcome, ChannelFull) for outcome in outcomes) == 1, outcomes
    assert (await receive(owner, channel))["n"] in (1, 2)


async def test_an_unread_direct_push_stops_counting_once_expired(
    own_broker: Any, make_own_layer: Callable[..., Any], unique: Callable[[str], str]
) -> None:
    """As a held count in the database lapses with its messages: capacity 1, expiry 1 s."""
    from channels.exceptions import ChannelFull

    sender, owner = make_own_layer(capacity=1, expiry=1), make_own_layer(capacity=1, expiry=1)
    channel = await owner.new_channel()
    await owner.group_add(unique("connect"), channel)
    await sender.send(channel, {"n": 1})
    with pytest.raises(ChannelFull):
        await sender.send(channel, {"n": "refused"})
    await asyncio.sleep(1.2)
    await sender.send(channel, {"n": 2})
    assert (await receive(owner, channel))["n"] == 2
