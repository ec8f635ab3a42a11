"""Numbered GROUP_SENDs on the wire (docs/flow.md, *Numbered group sends*): agreed by
WELCOME's version, confirmed by one CONFIRM per run, delivered once when a client sends
one again (through the same daemon or, on shared storage, another), and a numbered one
that breaks the rules closes the connection, counted.

A raw client speaks the frames, as a layer does; the member is a normal channel, read
by a layer, and the payloads carry no message id, so a second copy would be read too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from broker.layer.identity import Family
from protocol import (
    FANOUT_VERSION,
    NUMBERED_GROUP_SEND_VERSION,
    Confirm,
    Error,
    ErrorCode,
    Frame,
    GroupAdd,
    GroupSend,
    Hello,
    Ok,
    Welcome,
    encode_frame,
)
from tests.broker.daemon.test_send_windows import channel_name, holds, message
from tests.broker.raw_client import RawClient
from tests.broker.samples import scrape, value
from tests.conftest import LayerFactory
from tests.waits import RECOVERY_TIMEOUT_S, assert_nothing_within

pytestmark = pytest.mark.backends("memory", "redis", "postgresql")

#: Group sends of the killed stream, and after how many received the first daemon dies.
STREAM = 2000
KILL_AT = 700


def owned() -> dict[str, Any]:
    """A client id and the secret that proves it: the daemon keeps its seqs."""
    identity = Family().mint()
    return {"client_id": identity.client_id, "secret": identity.secret}


async def numbered_client(
    broker: Any, version: int = NUMBERED_GROUP_SEND_VERSION, **identity: Any
) -> tuple[RawClient, Welcome]:
    client = await RawClient.open(broker.address)
    hello = Hello(
        version,
        "",
        identity.get("client_id", ""),
        "asgi",
        100,
        60.0,
        86400.0,
        (),
        identity.get("secret", b""),
    )
    await client.write(encode_frame(hello))
    welcome = await client.next_frame()
    assert isinstance(welcome, Welcome)
    return client, welcome


async def with_member(client: RawClient) -> tuple[str, str]:
    """A new group with one member, a normal channel: (group, channel)."""
    group, channel = channel_name(), channel_name()
    await client.write(encode_frame(GroupAdd(99, group, channel)))
    assert await client.next_frame() == Ok(99)
    return group, channel


def numbered(group: str, seqs: range, request_id: int = 0) -> bytes:
    """GROUP_SENDs of ``message(seq)`` with their seq; requests from ``request_id + seq``."""
    return b"".join(
        encode_frame(GroupSend(request_id + seq if request_id else 0, group, message(seq), seq))
        for seq in seqs
    )


async def frames_until_confirm(client: RawClient, through_seq: int) -> list[Frame]:
    frames = [await client.next_frame()]
    while not (isinstance(frames[-1], Confirm) and frames[-1].through_seq >= through_seq):
        frames.append(await client.next_frame())
    return frames


async def test_welcome_agrees_numbering_with_a_client_that_asks_for_it(broker: Any) -> None:
    """Version 3 is answered 3 (every backend keeps seqs); version 2, 2, and its
    GROUP_SEND is a request as before."""
    client, welcome = await numbered_client(broker)
    client.close()
    assert welcome.version == NUMBERED_GROUP_SEND_VERSION
    old, welcome = await numbered_client(broker, version=FANOUT_VERSION)
    assert welcome.version == FANOUT_VERSION
    group, _ = await with_member(old)
    await old.write(encode_frame(GroupSend(5, group, message(1))))
    assert await old.next_frame() == Ok(5)
    old.close()


async def test_a_run_of_numbered_group_sends_is_confirmed_once_and_delivered(
    broker: Any, make_layer: LayerFactory
) -> None:
    """Three numbered GROUP_SENDs in one write: no OK, a CONFIRM of seq 3 (the daemon may
    split the run in passes, each confirmed), and the member holds each once."""
    client, _ = await numbered_client(broker, **owned())
    group, channel = await with_member(client)
    await client.write(numbered(group, range(1, 4)))
    frames = await frames_until_confirm(client, 3)
    client.close()
    assert all(isinstance(frame, Confirm) for frame in frames), frames
    await holds(make_layer, channel, [1, 2, 3])


async def test_a_resent_numbered_group_send_is_delivered_once(
    broker: Any, make_layer: LayerFactory
) -> None:
    """1. A client with an owned id sends seqs 1-3, numbered, reads their CONFIRM, and
       drops its connection.
    2. Its next connection sends 1-3 again, as requests with their seq (as a layer does
       after a reconnect when the CONFIRM was lost), and a new 4: each is answered OK,
       and the member holds 1, 2, 3, 4 once each."""
    identity = owned()
    first, _ = await numbered_client(broker, **identity)
    group, channel = await with_member(first)
    await first.write(numbered(group, range(1, 4)))
    await frames_until_confirm(first, 3)
    first.close()
    second, _ = await numbered_client(broker, **identity)
    await second.write(numbered(group, range(1, 5), request_id=10))
    answers = [await second.next_frame() for _ in range(4)]
    second.close()
    assert [answer.request_id for answer in answers] == [11, 12, 13, 14]  # type: ignore[union-attr]
    assert all(isinstance(answer, Ok) for answer in answers), answers
    await holds(make_layer, channel, [1, 2, 3, 4])


async def test_a_numbered_group_send_to_a_bad_name_closes_the_connection_and_is_counted(
    broker: Any,
) -> None:
    """Its sender heard nothing and will hear nothing: the daemon closes the connection
    with INVALID_NAME, as for a windowed SEND, and counts it."""
    before = value(scrape(broker), "channels_broker_protocol_errors_total", code="invalid_name")
    client, _ = await numbered_client(broker, **owned())
    await client.write(encode_frame(GroupSend(0, "no good!", message(1), 1)))
    [error] = await client.frames_until_closed()
    client.close()
    assert isinstance(error, Error) and error.request_id == 0
    assert error.error_code is ErrorCode.INVALID_NAME
    after = value(scrape(broker), "channels_broker_protocol_errors_total", code="invalid_name")
    assert after == before + 1


@pytest.mark.backends("redis", "postgresql")
async def test_a_resend_through_another_daemon_is_delivered_once(
    broker_factory: Callable[..., Any], make_layer: LayerFactory
) -> None:
    """As above, the second connection to another daemon on the same storage: storage's
    record of the client's seqs says 1-3 were delivered."""
    one, two = broker_factory(), broker_factory()
    identity = owned()
    first, _ = await numbered_client(one, **identity)
    group, channel = await with_member(first)
    await first.write(numbered(group, range(1, 4)))
    await frames_until_confirm(first, 3)
    first.close()
    second, _ = await numbered_client(two, **identity)
    await second.write(numbered(group, range(1, 5), request_id=10))
    answers = [await second.next_frame() for _ in range(4)]
    second.close()
    assert all(isinstance(answer, Ok) for answer in answers), answers
    await holds(make_layer, channel, [1, 2, 3, 4])


@pytest.mark.backends("redis", "postgresql")
async def test_a_group_stream_loses_nothing_when_its_daemon_is_killed(
    broker_factory: Callable[..., Any], make_layer: LayerFactory, unique: Any
) -> None:
    """1. A sender on daemon A (B its second host) group_sends numbered messages, each
       awaited (they return once written), to a group whose member is on B.
    2. A is killed with SIGKILL mid-stream, with group sends read and not delivered,
       delivered and not confirmed, and CONFIRMs written that never arrived.
    3. The sender goes on through B, sending again what was not confirmed: the member
       gets every number, once, in order (a group send A delivered and had not yet
       recorded comes twice, and its layer drops the second copy by its id)."""
    one, two = broker_factory(), broker_factory()
    sender = make_layer(hosts=[one.url, two.url], capacity=STREAM)
    member = make_layer(hosts=[two.url], capacity=STREAM)
    group, channel = unique("killed"), await member.new_channel()
    await member.group_add(group, channel)
    received: list[int] = []

    async def consume() -> None:
        while len(received) < STREAM:
            received.append((await member.receive(channel))["n"])
            if len(received) == KILL_AT:
                one.kill()

    consuming = asyncio.create_task(consume())
    for n in range(STREAM):
        await sender.group_send(group, {"n": n})
    await asyncio.wait_for(consuming, RECOVERY_TIMEOUT_S)
    assert received == list(range(STREAM))
    await assert_nothing_within(member, channel)
    one.start()  # so that the fixture's clean stop has a daemon to stop
