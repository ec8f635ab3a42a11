"""Send windows on shared storage, two daemons on one Redis or PostgreSQL (docs/flow.md):
a client that comes back through another daemon is deduped there, room is counted by
every daemon and lapses when the daemon that holds it dies.

The record of a client's numbered sends and the room reserved live in storage, written
with the messages, so neither depends on which daemon a client reaches. Reserved room
lapses ``room_lapse`` after its holder last changed it: 2 s here (10 by default).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from channels.exceptions import ChannelFull

from broker.layer.identity import Family
from protocol import Confirm, Error, ErrorCode, Ok, Send, encode_frame
from tests import servers
from tests.broker.daemon.test_send_windows import (
    channel_name,
    holds,
    message,
    room_held_by_a,
    windowed,
)
from tests.conftest import LayerFactory
from tests.layer.test_send_windows import read_all
from tests.waits import DELIVERY_TIMEOUT_S, POLL_S, RECOVERY_TIMEOUT_S, assert_nothing_within

#: Seconds room outlives its dead holder in these tests.
ROOM_LAPSE_S = 2
#: Messages of the killed stream, and after how many received the first daemon dies.
STREAM = 2000
KILL_AT = 700


@pytest.fixture(scope="module", params=["redis://", "postgresql://"], ids=["redis", "postgresql"])
def backend_url(request: pytest.FixtureRequest) -> str:
    """The daemons of a test share the session's Redis, or its PostgreSQL; room lapses
    in 2 s."""
    url: str = servers.backend_url(request.param)
    return f"{url}{'&' if '?' in url else '?'}room_lapse={ROOM_LAPSE_S}"


async def test_a_resend_through_another_daemon_is_not_stored_twice(
    broker_factory: Callable[..., Any], make_layer: LayerFactory
) -> None:
    """1. Through daemon A, a client with an owned id sends seq 1 (a request: OK with
       room) and seqs 2-3 (windowed: one CONFIRM), and drops before reading on.
    2. Through daemon B it sends 1-3 again, as after a reconnect, and a new 4: each is
       answered OK and the channel holds 1, 2, 3, 4 once each, in order."""
    one, two = broker_factory(), broker_factory()
    identity = Family().mint()
    owned = {"client_id": identity.client_id, "secret": identity.secret, "capacity": 100}
    channel = channel_name()
    first, _ = await windowed(one, **owned)
    await first.write(encode_frame(Send(1, channel, message(1), 1)))
    assert await first.next_frame() == Ok(1, room=49)
    await first.write(b"".join(encode_frame(Send(0, channel, message(n), n)) for n in (2, 3)))
    confirm = await first.next_frame()
    assert isinstance(confirm, Confirm) and confirm.through_seq == 3
    first.close()
    second, welcome = await windowed(two, **owned)
    assert welcome.send_window == 64
    resent = [encode_frame(Send(10 + seq, channel, message(seq), seq)) for seq in (1, 2, 3, 4)]
    await second.write(b"".join(resent))
    answers = [await second.next_frame() for _ in range(4)]
    assert answers[:3] == [Ok(11), Ok(12), Ok(13)]
    assert isinstance(answers[3], Ok) and answers[3].request_id == 14
    second.close()
    await holds(make_layer, channel, [1, 2, 3, 4])


async def test_what_a_killed_daemon_did_not_store_goes_into_the_room_it_reserved(
    broker_factory: Callable[..., Any], make_layer: LayerFactory
) -> None:
    """1. Capacity 3: client C sends seq 1 through daemon A and gets room 1; another
       client fills the channel's last slot: full, counting C's room.
    2. A is killed with SIGKILL before C's windowed seq 2 (spending that room) reached
       it. C sends seq 2 again through daemon B, as a request: it is stored, into the
       room A reserved for C (not refused for a channel full of C's own room), and the
       channel holds exactly 3."""
    one, two = broker_factory(), broker_factory()
    identity = Family().mint()
    owned = {"client_id": identity.client_id, "secret": identity.secret, "capacity": 3}
    channel = channel_name()
    first, _ = await windowed(one, **owned)
    await first.write(encode_frame(Send(1, channel, message(1), 1)))
    assert await first.next_frame() == Ok(1, room=1)
    other, _ = await windowed(two, capacity=3, window=0)
    await other.write(b"".join(encode_frame(Send(n, channel, message(n), 0)) for n in (7, 8)))
    assert await other.next_frame() == Ok(7)
    full = await other.next_frame()
    assert isinstance(full, Error) and full.error_code is ErrorCode.CHANNEL_FULL
    other.close()
    one.kill()
    first.close()
    second, _ = await windowed(two, **owned)
    await second.write(encode_frame(Send(12, channel, message(2), 2)))
    assert await second.next_frame() == Ok(12)
    second.close()
    await holds(make_layer, channel, [1, 7, 2])
    one.start()


async def test_a_stream_loses_nothing_and_doubles_nothing_when_its_daemon_is_killed(
    broker_factory: Callable[..., Any], make_layer: LayerFactory
) -> None:
    """1. A sender on daemon A (B its second host) streams numbered messages, each send
       awaited (most return at once: room), to a consumer on B.
    2. A is killed with SIGKILL mid-stream: sends it read and did not store, stored and
       did not confirm, and confirms it wrote that never arrived are all lost with it.
    3. The sender goes on through B, sending again what was not confirmed: the consumer
       gets every number exactly once, in order."""
    one, two = broker_factory(), broker_factory()
    sender = make_layer(hosts=[one.url, two.url], capacity=STREAM)
    consumer = make_layer(hosts=[two.url])
    channel = await consumer.new_channel()
    received: list[int] = []

    async def consume() -> None:
        while len(received) < STREAM:
            received.append((await consumer.receive(channel))["n"])
            if len(received) == KILL_AT:
                one.kill()

    consuming = asyncio.create_task(consume())
    for n in range(STREAM):
        await sender.send(channel, {"n": n})
    await asyncio.wait_for(consuming, RECOVERY_TIMEOUT_S)
    assert received == list(range(STREAM))
    await assert_nothing_within(consumer, channel)
    one.start()  # so that the fixture's clean stop has a daemon to stop


async def test_two_senders_through_two_daemons_fill_a_channel_exactly(
    broker_factory: Callable[..., Any], make_layer: LayerFactory
) -> None:
    """Senders on daemons A and B take turns until each has raised ChannelFull: the room
    each daemon reserved counts in the other's checks, so the channel holds exactly its
    capacity."""
    capacity = 40
    one, two = broker_factory(), broker_factory()
    senders = [make_layer(hosts=[one.url], capacity=capacity)]
    senders.append(make_layer(hosts=[two.url], capacity=capacity))
    reader = make_layer(capacity=capacity)
    channel = channel_name()
    accepted: list[int] = []
    full: set[int] = set()
    n = 0
    while len(full) < len(senders):
        for index, sender in enumerate(senders):
            if index not in full:
                try:
                    await sender.send(channel, {"n": n})
                    accepted.append(n)
                except ChannelFull:
                    full.add(index)
                n += 1
    assert len(accepted) == capacity
    assert sorted(await read_all(reader, channel, capacity)) == accepted


async def test_room_a_killed_daemon_held_lapses(broker_factory: Callable[..., Any]) -> None:
    """1. Capacity 3: a client of A sends one message and gets room 1 (of the 2 free).
    2. A client of B (no window) fits one message, not two: A's room counts.
    3. A is killed with SIGKILL: nobody releases its room, yet after ``room_lapse`` B's
       next send is stored."""
    one, two = broker_factory(), broker_factory()
    a, b, channel = await room_held_by_a(one, two)
    one.kill()
    a.close()
    killed = time.monotonic()
    waited = await _until_stored(b, channel, 4)
    assert time.monotonic() - killed > ROOM_LAPSE_S - 0.5
    assert waited < ROOM_LAPSE_S + DELIVERY_TIMEOUT_S
    b.close()
    one.start()


async def _until_stored(client: Any, channel: str, request_id: int) -> float:
    """Send until the daemon stores it; return how long that took."""
    started = time.monotonic()
    while True:
        await client.write(encode_frame(Send(request_id, channel, message(request_id), 0)))
        reply = await client.next_frame()
        if isinstance(reply, Ok):
            return time.monotonic() - started
        assert isinstance(reply, Error) and reply.error_code is ErrorCode.CHANNEL_FULL
        assert time.monotonic() - started < RECOVERY_TIMEOUT_S
        await asyncio.sleep(POLL_S)
        request_id += 1
