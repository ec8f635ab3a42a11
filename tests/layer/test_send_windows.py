"""Send windows through the layer (docs/flow.md): sends that do not wait, and still
``ChannelFull`` exactly when a channel is full, room that goes back to other senders, and
a stream that loses nothing and doubles nothing when its connection is cut.

memory://, Redis and PostgreSQL: the backends that reserve room (Redis Cluster agrees
no window, and its sends are the contract tests').
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from channels.exceptions import ChannelFull

from tests.conftest import LayerFactory
from tests.proxy import CutProxy
from tests.waits import (
    DELIVERY_TIMEOUT_S,
    POLL_S,
    RECOVERY_TIMEOUT_S,
    assert_nothing_within,
    receive,
)

pytestmark = pytest.mark.backends("memory", "redis", "postgresql")

#: Messages of the cut stream, and after how many received the sender's connection is cut.
STREAM = 3000
CUTS = (400, 1200, 2000, 2600)


def window_of(layer: Any) -> Any:
    """The send window of ``layer``'s client on the running loop."""
    return layer._client().window


async def fill(layer: Any, channel: str, first: int = 0) -> list[int]:
    """Send ``{"n": first}``, ``first + 1``... until ``ChannelFull``; the numbers sent."""
    sent: list[int] = []
    with pytest.raises(ChannelFull):
        while True:
            await layer.send(channel, {"n": first + len(sent)})
            sent.append(first + len(sent))
    return sent


async def read_all(layer: Any, channel: str, count: int) -> list[int]:
    numbers = [(await receive(layer, channel))["n"] for _ in range(count)]
    await assert_nothing_within(layer, channel)
    return numbers


async def send_when_room_comes_back(layer: Any, channel: str, n: int) -> None:
    """Send until the channel takes it: room another sender gave back (unused for a while,
    or at its close) reaches the daemon with no event a test can wait for."""
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S
    while True:
        try:
            await layer.send(channel, {"n": n})
            return
        except ChannelFull:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(POLL_S)


@pytest.mark.parametrize("capacity", [1, 2, 3, 10, 100])
async def test_one_sender_fills_a_channel_of_capacity_c_exactly(
    make_layer: LayerFactory, unique: Callable[[str], str], capacity: int
) -> None:
    """C sends return (most without waiting: room), the C+1th raises ChannelFull, and
    the channel holds exactly the C, in order."""
    sender, reader = make_layer(capacity=capacity), make_layer(capacity=capacity)
    channel = unique("queue")
    sent = await fill(sender, channel)
    assert sent == list(range(capacity))
    assert window_of(sender).size == 64
    assert await read_all(reader, channel, capacity) == sent


async def test_two_senders_fill_a_channel_exactly_between_them(
    make_layer: LayerFactory, unique: Callable[[str], str]
) -> None:
    """Two senders take turns until each has raised ChannelFull: a sender asks only when it
    holds no room, so by then neither holds any, and the channel holds exactly its
    capacity of their messages."""
    capacity = 40
    senders = [make_layer(capacity=capacity), make_layer(capacity=capacity)]
    reader = make_layer(capacity=capacity)
    channel = unique("queue")
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


@pytest.mark.parametrize("how", ["idle", "close"])
async def test_room_given_back_lets_another_sender_fill_the_channel(
    make_layer: LayerFactory, unique: Callable[[str], str], how: str
) -> None:
    """1. A sends one message to a channel of capacity 20 and holds room for 9 more.
    2. B fills it: full after 10 of its own, as A's room counts as held.
    3. A leaves its room unused (it goes back within 0.4 s) or closes.
    4. B fills the rest: the channel holds exactly 20."""
    capacity = 20
    a, b, reader = (make_layer(capacity=capacity) for _ in range(3))
    channel = unique("queue")
    await a.send(channel, {"n": 0})
    first = await fill(b, channel, first=1)
    assert len(first) == capacity - 1 - (capacity - 1) // 2
    if how == "close":
        await a.close()
    await send_when_room_comes_back(b, channel, 1 + len(first))
    rest = await fill(b, channel, first=2 + len(first))
    assert 1 + len(first) + 1 + len(rest) == capacity
    assert await read_all(reader, channel, capacity) == list(range(capacity))


async def test_a_stream_whose_connection_is_cut_loses_nothing_and_doubles_nothing(
    broker: Any, make_layer: LayerFactory
) -> None:
    """1. A sender, through a proxy, streams numbered messages to a consumer's channel,
       each send awaited (most return at once: room).
    2. The proxy cuts the sender's connection four times mid-stream, dropping whatever
       was in flight either way: sends not yet stored, OKs and CONFIRMs not yet read.
    3. The consumer gets every number exactly once, in order: the layer sent again what
       was unconfirmed, and the daemon stored each seq once."""
    proxy = CutProxy(broker.address)
    await proxy.start()
    try:
        sender = make_layer(hosts=[proxy.url], capacity=STREAM)
        consumer = make_layer()
        channel = await consumer.new_channel()
        received: list[int] = []

        async def consume() -> None:
            while len(received) < STREAM:
                received.append((await consumer.receive(channel))["n"])
                if len(received) in CUTS:
                    proxy.cut()

        consuming = asyncio.create_task(consume())
        for n in range(STREAM):
            await sender.send(channel, {"n": n})
        await asyncio.wait_for(consuming, RECOVERY_TIMEOUT_S)
        assert received == list(range(STREAM))
        await assert_nothing_within(consumer, channel)
        assert proxy.connections == 1 + len(CUTS)
    finally:
        await proxy.close()
