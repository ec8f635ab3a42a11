"""Owned identities: a client id belongs to the client that holds its secret.

The attacks of issue 14, each against real daemons on every backend: a HELLO naming
another client's id used to cut that client off and take its pushed messages; a
RECEIVE on another client's process-specific channel used to be served (with two
daemons on one Redis, 262 of 300 messages went to the attacker). Now the HELLO is
refused (CLIENT_ID_TAKEN) and the RECEIVE too (FORBIDDEN), and nothing is lost.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from typing import Any

import pytest
from channels.exceptions import ChannelFull

from broker.layer.identity import Family, Identity
from protocol import (
    PROTOCOL_VERSION,
    SECRET_BYTES,
    Deliver,
    Error,
    ErrorCode,
    Hello,
    Receive,
    Welcome,
    client_id_of,
    encode_frame,
)
from tests.broker.daemon.attack import limit_hits
from tests.broker.raw_client import RawClient
from tests.waits import DELIVERY_TIMEOUT_S, POLL_S, RETRY_S, receive

#: Messages sent to the victim while the attack goes on.
MESSAGES = 300
#: HELLOs (or RECEIVEs) the attacker makes during the sends.
ATTEMPTS = 30


def hello(client_id: str = "", secret: bytes = b"", prefix: str = "asgi") -> bytes:
    return encode_frame(
        Hello(PROTOCOL_VERSION, "", client_id, prefix, 100, 60.0, 86400.0, (), secret)
    )


async def said_hello(address: tuple[str, int], client_id: str, secret: bytes) -> RawClient:
    raw = await RawClient.open(address)
    await raw.write(hello(client_id, secret))
    return raw


async def refused(raw: RawClient, code: ErrorCode) -> None:
    """The daemon answers ``raw`` with one connection-level ERROR ``code`` and closes."""
    try:
        frames = await raw.frames_until_closed()
    finally:
        raw.close()
    assert len(frames) == 1 and isinstance(frames[0], Error), frames
    assert (frames[0].request_id, frames[0].error_code) == (0, code), frames[0]


async def victim(layer: Any) -> tuple[str, Any]:
    """A process-specific channel of ``layer``, whose client is connected, and that client."""
    channel = await layer.new_channel()
    await layer.send(channel, {"n": -1})
    assert await receive(layer, channel) == {"n": -1}
    return channel, layer._client().conn


async def gone(broker: Any) -> None:
    """Return once the daemon has no client connection open: a layer's ``close()``
    returns when its own side is closed, before the daemon has seen it."""
    deadline = asyncio.get_running_loop().time() + DELIVERY_TIMEOUT_S
    while (await asyncio.to_thread(limit_hits, broker)).get("connections", 0):
        assert asyncio.get_running_loop().time() < deadline, "the daemon kept the connection"
        await asyncio.sleep(POLL_S)


async def send_all(sender: Any, channel: str) -> None:
    for n in range(MESSAGES):
        await sender.send(channel, {"n": n})


async def send_all_to_a_reader(sender: Any, channel: str) -> None:
    """``send_all`` while the consumer reads: a full channel is waited out, as an
    application that must not drop a message would. The sender may run ahead of the
    consumer (under load) by more than the channel's capacity of 100 counts: what waits,
    what was pushed and not yet acknowledged, and the room the consumer's own first send
    (``victim``) was granted, 49 places, until its layer gives it back, idle (within
    0.4 s, later on a loaded machine). The channel must drain within DELIVERY_TIMEOUT_S."""
    loop = asyncio.get_running_loop()
    for n in range(MESSAGES):
        full_since = None
        while True:
            try:
                await sender.send(channel, {"n": n})
                break
            except ChannelFull:
                full_since = full_since or loop.time()
                assert loop.time() - full_since < DELIVERY_TIMEOUT_S, f"{channel} stayed full"
            await asyncio.sleep(RETRY_S)


async def receive_all(layer: Any, channel: str) -> list[int]:
    return [(await receive(layer, channel))["n"] for _ in range(MESSAGES)]


async def test_hello_with_another_clients_id_is_refused_and_steals_nothing(
    broker: Any, make_layer: Any
) -> None:
    """1. A consumer is connected with its process-specific channel.
    2. While 300 messages are sent to it, attackers say HELLO with its id: with no
       secret, a random one, and a valid secret of another id, over and over.
    3. Each HELLO gets CLIENT_ID_TAKEN; the consumer kept its connection and got every
       message, in order.
    """
    consumer, sender = make_layer(), make_layer()
    channel, connection = await victim(consumer)
    stolen_id = client_id_of(channel)
    secrets_tried = [b"", secrets.token_bytes(SECRET_BYTES), Family().mint().secret]

    async def attack() -> None:
        for attempt in range(ATTEMPTS):
            raw = await said_hello(broker.address, stolen_id, secrets_tried[attempt % 3])
            await refused(raw, ErrorCode.CLIENT_ID_TAKEN)

    _, got = await asyncio.gather(
        attack(),
        asyncio.gather(send_all_to_a_reader(sender, channel), receive_all(consumer, channel)),
    )
    assert got[1] == list(range(MESSAGES))
    assert consumer._client().conn is connection, "the consumer was cut off"
    broker.wait_for_log(lambda line: "without its secret" in line and stolen_id in line)
    assert "re-attached" not in broker.stderr_text()


async def test_a_reconnect_with_the_secret_takes_the_id_over(broker: Any) -> None:
    """1. A client says HELLO with an id and its secret: WELCOME, with that id.
    2. The same id and secret on a second connection (a reconnect whose old socket is
       not dead yet): WELCOME, and the daemon closes the first connection.
    """
    identity: Identity = Family().mint()
    first = await said_hello(broker.address, identity.client_id, identity.secret)
    welcome = await first.next_frame()
    assert isinstance(welcome, Welcome) and welcome.client_id == identity.client_id
    second = await said_hello(broker.address, identity.client_id, identity.secret)
    try:
        welcome = await second.next_frame()
        assert isinstance(welcome, Welcome) and welcome.client_id == identity.client_id
        assert await first.frames_until_closed() == []
    finally:
        first.close()
        second.close()


async def test_a_client_named_by_the_daemon_cannot_be_reattached_by_anyone(
    broker: Any,
) -> None:
    """A HELLO with no id still works (the daemon names the client); a later HELLO naming
    that id cannot prove it, so it is refused: nobody can take such a client's place."""
    named = await RawClient.open(broker.address)
    try:
        await named.write(hello())
        welcome = await named.next_frame()
        assert isinstance(welcome, Welcome) and welcome.client_id
        raw = await said_hello(broker.address, welcome.client_id, b"")
        await refused(raw, ErrorCode.CLIENT_ID_TAKEN)
    finally:
        named.close()


async def forbidden_receives(address: tuple[str, int], channel: str, client_id: str = "") -> None:
    """RECEIVEs of ``channel`` from a raw client (named by the daemon, or with a proven id
    of another family): each answered FORBIDDEN, none with a message."""
    identity = Family().mint() if client_id else None
    raw = await RawClient.open(address)
    try:
        if identity is None:
            await raw.write(hello())
        else:
            await raw.write(hello(identity.client_id, identity.secret))
        assert isinstance(await raw.next_frame(), Welcome)
        await raw.write(b"".join(encode_frame(Receive(n, channel)) for n in range(1, ATTEMPTS)))
        for _ in range(1, ATTEMPTS):
            answer = await raw.next_frame()
            assert not isinstance(answer, Deliver), "a message was stolen"
            assert isinstance(answer, Error) and answer.error_code is ErrorCode.FORBIDDEN, answer
    finally:
        raw.close()


async def test_receive_of_another_clients_channel_is_forbidden(
    broker: Any, make_layer: Any
) -> None:
    """1. A consumer's channel fills while the consumer is away (no owner connected).
    2. Another layer's receive of it raises PermissionError; raw RECEIVEs, from a client
       the daemon named and from one with a proven id of another family, get FORBIDDEN.
    3. The consumer's layer, on a new connection of the same process, gets every message.
    """
    consumer, sender, attacker = make_layer(), make_layer(capacity=MESSAGES), make_layer()
    channel, _ = await victim(consumer)
    await consumer.close()
    # Away: nobody owns the channel now. (A message pushed in the moment between the
    # layer's close and the daemon seeing it is lost: leases of pushes will fix that.)
    await gone(broker)
    await send_all(sender, channel)
    with pytest.raises(PermissionError, match="another client's channel"):
        await attacker.receive(channel)
    await forbidden_receives(broker.address, channel)
    await forbidden_receives(broker.address, channel, client_id="proven")
    # The consumer's next client has an id of its own, of the same family: it may pull.
    assert await receive_all(consumer, channel) == list(range(MESSAGES))


@pytest.mark.backends("shared")
async def test_no_daemon_serves_another_clients_channel(
    broker_factory: Callable[..., Any], make_layer: Any
) -> None:
    """Two daemons on one Redis or PostgreSQL: the consumer on daemon 1, the attacker on
    daemon 2, where nobody owns the consumer's id (so a RECEIVE used to be served).

    1. While 300 messages go to the consumer through daemon 2, the attacker sends RECEIVEs
       of its channel there, and tries to take its id: FORBIDDEN and CLIENT_ID_TAKEN.
    2. The consumer gets every message, in order, on the connection it had.
    """
    one, two = broker_factory(), broker_factory()
    consumer = make_layer(hosts=[one.url])
    sender = make_layer(hosts=[two.url])
    channel, connection = await victim(consumer)

    async def attack() -> None:
        for _ in range(3):
            await forbidden_receives(two.address, channel)
            await forbidden_receives(two.address, channel, client_id="proven")
            raw = await said_hello(two.address, client_id_of(channel), b"")
            await refused(raw, ErrorCode.CLIENT_ID_TAKEN)

    _, got = await asyncio.gather(
        attack(),
        asyncio.gather(send_all_to_a_reader(sender, channel), receive_all(consumer, channel)),
    )
    assert got[1] == list(range(MESSAGES))
    assert consumer._client().conn is connection
