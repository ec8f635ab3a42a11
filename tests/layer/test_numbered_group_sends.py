"""Numbered group sends through the layer (docs/flow.md, *Numbered group sends*):
``group_send`` returns once written, within a bound of unconfirmed ones, and a group
send whose confirmation was lost with its connection is sent again and delivered once.

memory://, Redis and PostgreSQL (the daemon keeps each client's seqs: its own ``Seqs``
on memory, storage's record on the shared ones).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from protocol import (
    FANOUT_VERSION,
    MAX_UNCONFIRMED_GROUP_SENDS,
    Error,
    ErrorCode,
    FrameDecoder,
    Hello,
    encode_frame,
)
from tests.conftest import LayerFactory
from tests.proxy import CutProxy
from tests.waits import RECOVERY_TIMEOUT_S, assert_nothing_within, receive

pytestmark = pytest.mark.backends("memory", "redis", "postgresql")

#: Group sends of the cut stream; at these, the sender's replies start to be held (its
#: CONFIRMs go unread), and ``CUT_AFTER_S`` later its connection is cut.
STREAM = 2000
STALLS = (300, 900, 1500)
CUT_AFTER_S = 0.2
#: Seconds a group send past the bound must keep waiting (for an answer that is held).
STILL_WAITING_S = 0.5


async def test_group_sends_whose_confirmations_were_lost_are_delivered_once(
    broker: Any, make_layer: LayerFactory, unique: Any
) -> None:
    """1. A sender, through a proxy, group_sends numbered messages to a group of one
       member, each awaited (they return once written).
    2. Three times, the proxy holds what the daemon sends back (CONFIRMs go unread: the
       group sends were delivered, the sender cannot know), and cuts the connection
       0.2 s later.
    3. The sender sends again every unconfirmed one, with its seq. The member gets each
       number once, in order, and its layer never had to drop a second copy: the daemon
       delivered none (``HandedIds.redelivered``)."""
    proxy = CutProxy(broker.address)
    await proxy.start()
    try:
        sender = make_layer(hosts=[proxy.url], capacity=STREAM)
        member = make_layer(capacity=STREAM)
        group, channel = unique("numbered"), await member.new_channel()
        await member.group_add(group, channel)
        received: list[int] = []

        async def consume() -> None:
            while len(received) < STREAM:
                received.append((await member.receive(channel))["n"])

        def cut() -> None:
            proxy.cut()
            proxy.resume()

        consuming = asyncio.create_task(consume())
        for n in range(STREAM):
            if n in STALLS:
                proxy.stall_replies()
                asyncio.get_running_loop().call_later(CUT_AFTER_S, cut)
            await sender.group_send(group, {"n": n})
        await asyncio.wait_for(consuming, RECOVERY_TIMEOUT_S)
        assert received == list(range(STREAM))
        await assert_nothing_within(member, channel)
        assert member.handed.redelivered == 0
        assert proxy.connections == 1 + len(STALLS)
    finally:
        await proxy.close()


async def test_group_send_waits_only_past_the_bound_of_unconfirmed_ones(
    broker: Any, make_layer: LayerFactory, unique: Any
) -> None:
    """1. The sender's connection is stalled both ways: nothing reaches the daemon.
    2. ``MAX_UNCONFIRMED_GROUP_SENDS`` group sends return at once all the same.
    3. The next one waits (for its answer), and returns once the stall ends; the member
       gets every one, once, in order."""
    proxy = CutProxy(broker.address)
    await proxy.start()
    try:
        count = MAX_UNCONFIRMED_GROUP_SENDS + 1
        sender = make_layer(hosts=[proxy.url], capacity=count)
        member = make_layer(capacity=count)
        group, channel = unique("bounded"), await member.new_channel()
        await member.group_add(group, channel)
        await sender.group_send(group, {"n": -1})  # connected: WELCOME agreed numbering
        assert (await receive(member, channel))["n"] == -1
        proxy.stall()
        for n in range(MAX_UNCONFIRMED_GROUP_SENDS):
            await asyncio.wait_for(sender.group_send(group, {"n": n}), STILL_WAITING_S)
        past = asyncio.create_task(sender.group_send(group, {"n": count - 1}))
        done, _ = await asyncio.wait({past}, timeout=STILL_WAITING_S)
        assert not done, "a group send past the bound returned before its answer"
        proxy.resume()
        await asyncio.wait_for(past, RECOVERY_TIMEOUT_S)
        assert [(await receive(member, channel))["n"] for _ in range(count)] == list(range(count))
        await assert_nothing_within(member, channel)
    finally:
        await proxy.close()


#: Members and group sends of the closed sender's test: on Redis the daemon is still
#: delivering most of them when the sender's close arrives.
ROOM, ROOM_SENDS = 500, 20


async def test_group_sends_of_a_sender_that_closed_are_all_delivered(
    broker: Any, make_layer: LayerFactory, unique: Any
) -> None:
    """1. A sender group_sends ``ROOM_SENDS`` messages to a group of ``ROOM`` members,
       each awaited (it returns once written), and closes at once, waiting for its
       CONFIRMs only 50 ms (``connect_timeout``).
    2. Each was accepted: every member gets every one, once, in order, though the
       daemon was still delivering them when the sender's connection closed."""
    sender = make_layer(connect_timeout=0.05)
    member = make_layer(capacity=ROOM_SENDS)
    group = unique("closed-sender")
    channels = [await member.new_channel() for _ in range(ROOM)]
    await asyncio.gather(*(member.group_add(group, channel) for channel in channels))
    for n in range(ROOM_SENDS):
        await sender.group_send(group, {"n": n})
    await sender.close()
    for channel in channels:
        got = [(await receive(member, channel, RECOVERY_TIMEOUT_S))["n"] for _ in range(ROOM_SENDS)]
        assert got == list(range(ROOM_SENDS)), channel
    await assert_nothing_within(member, channels[0])


class OlderDaemon:
    """A daemon of the release before numbered group sends, as its HELLO handling is:
    version 3 is refused with UNSUPPORTED_VERSION and the connection closed; a HELLO of
    version 2 or less goes through to the real daemon (``upstream``), and so does what
    follows it."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.refused = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"tcp://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder()
        while (hello := decoder.next_frame()) is None:
            decoder.receive_data(await reader.read(65536))
        assert isinstance(hello, Hello)
        if hello.version > FANOUT_VERSION:
            self.refused += 1
            message = f"protocol version {hello.version} unknown"
            writer.write(encode_frame(Error(0, ErrorCode.UNSUPPORTED_VERSION, message)))
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        up_writer.write(encode_frame(hello) + decoder.unread())
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.mark.backends("memory")
async def test_a_layer_speaks_the_version_before_to_an_older_daemon(
    broker: Any, make_layer: LayerFactory, unique: Any
) -> None:
    """1. An older daemon refuses the layer's HELLO (version 3) after it wrote its first
       request (a group_add, sent before WELCOME).
    2. The layer says version 2 on a new connection and writes that request again: its
       caller sees nothing of it. 3. Group sends are requests there, as before, and
       arrive; another loop of the layer starts at version 2."""
    older = OlderDaemon(broker.address)
    url = await older.start()
    try:
        sender = make_layer(hosts=[url])
        member = make_layer()
        group, channel = unique("older"), await member.new_channel()
        await sender.group_add(group, channel)
        for n in range(3):
            await sender.group_send(group, {"n": n})
        assert [(await receive(member, channel))["n"] for _ in range(3)] == [0, 1, 2]
        assert not sender._client().window.numbers_groups
        assert older.refused == 1
    finally:
        await older.close()
