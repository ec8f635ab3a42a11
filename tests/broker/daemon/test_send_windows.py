"""Send windows on the wire (docs/flow.md): what a daemon grants, what it takes without a
request id, what it confirms, and what it stores once when a client sends again.

memory://, Redis and PostgreSQL (the shared ones keep the record of stored seqs in
storage: see tests/broker/daemon/test_shared_windows.py for two daemons on one).

A raw client speaks the frames itself, as a layer does, so that each rule is seen in the
frames: WELCOME's window, OK's room, a windowed SEND stored into that room and confirmed,
one without room refused (NO_ROOM, counted), a retry of a stored seq answered without a
second copy, and room given back with RETURN_ROOM or by closing.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import msgpack
import pytest

from broker.layer.identity import Family
from protocol import (
    PROTOCOL_VERSION,
    Confirm,
    Error,
    ErrorCode,
    Hello,
    Ok,
    Ping,
    Pong,
    Push,
    ReturnRoom,
    Send,
    Welcome,
    encode_frame,
)
from tests.broker.raw_client import RawClient
from tests.broker.samples import scrape, value
from tests.conftest import LayerFactory
from tests.waits import DELIVERY_TIMEOUT_S, POLL_S, assert_nothing_within, receive

#: What the layer asks for: the largest window a daemon may agree.
ASKED = 256


def hello(
    capacity: int = 10, window: int = ASKED, client_id: str = "", secret: bytes = b""
) -> Hello:
    return Hello(
        PROTOCOL_VERSION, "", client_id, "asgi", capacity, 60.0, 86400.0, (), secret, window
    )


async def windowed(broker: Any, **asking: Any) -> tuple[RawClient, Welcome]:
    client = await RawClient.open(broker.address)
    await client.write(encode_frame(hello(**asking)))
    welcome = await client.next_frame()
    assert isinstance(welcome, Welcome)
    return client, welcome


def message(n: int) -> bytes:
    """A payload a layer can read back: ``{"n": n}``."""
    packed: bytes = msgpack.packb({"n": n})
    return packed


async def holds(make_layer: LayerFactory, channel: str, numbers: list[int]) -> None:
    """``channel`` holds exactly these messages, in this order."""
    reader = make_layer()
    assert [(await receive(reader, channel))["n"] for _ in numbers] == numbers
    await assert_nothing_within(reader, channel)


async def until_ok(client: RawClient, send: Send) -> None:
    """Send ``send`` until it is stored: a close reaches the daemon with no event to show."""
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S
    while True:
        await client.write(encode_frame(send))
        answer = await client.next_frame()
        if isinstance(answer, Ok) or time.monotonic() > deadline:
            assert isinstance(answer, Ok), answer
            return
        await asyncio.sleep(POLL_S)


def channel_name() -> str:
    return f"windows-{uuid.uuid4().hex[:12]}"


async def test_welcome_agrees_the_smaller_of_the_asked_and_the_daemons_window(
    backend_url: str, broker: Any
) -> None:
    """memory://, Redis and PostgreSQL reserve room: they agree the default 64 (or less,
    if asked less); a client that asks none gets none. Redis Cluster cannot: 0."""
    reserves = not backend_url.startswith("redis+cluster:")
    for asked, agreed in ((ASKED, 64), (5, 5), (0, 0)):
        client, welcome = await windowed(broker, window=asked)
        client.close()
        assert welcome.send_window == (agreed if reserves else 0)


@pytest.mark.backends("memory", "redis", "postgresql")
async def test_no_window_is_agreed_with_send_window_off(broker_factory: Any) -> None:
    daemon = broker_factory(extra_args=("--send-window", "0"))
    client, welcome = await windowed(daemon)
    client.close()
    assert welcome.send_window == 0


@pytest.mark.backends("memory", "redis", "postgresql")
async def test_room_granted_is_spent_by_windowed_sends_and_confirmed(
    broker: Any, make_layer: LayerFactory
) -> None:
    """1. Capacity 10: a SEND with a request id is stored, and its OK grants half of the
       nine still free, 4.
    2. Four windowed SENDs (no id, seqs 2-5) are stored into that room and answered by
       one CONFIRM of seq 5, which grants room again: 2, half of the five free.
    3. A request now gets room 1: half of the two free once it is in and 2 are held."""
    client, _ = await windowed(broker, capacity=10)
    channel = channel_name()
    await client.write(encode_frame(Send(1, channel, message(1), 1)))
    assert await client.next_frame() == Ok(1, room=4)
    await client.write(
        b"".join(encode_frame(Send(0, channel, message(n), n)) for n in (2, 3, 4, 5))
    )
    assert await client.next_frame() == Confirm(5, ((channel, 2),))
    await client.write(encode_frame(Send(7, channel, message(6), 6)))
    assert await client.next_frame() == Ok(7, room=1)
    client.close()
    await holds(make_layer, channel, [1, 2, 3, 4, 5, 6])


@pytest.mark.backends("memory")
async def test_a_windowed_send_over_the_size_limit_is_refused_where_room_is_held(
    broker_factory: Any,
) -> None:
    """Room on a channel proves its name valid (a request reserved it), not a message's
    size: a windowed SEND over --max-message-bytes there closes the connection with
    MESSAGE_TOO_LARGE, and one with an invalid name, where no room can be, INVALID_NAME."""
    daemon = broker_factory(extra_args=("--max-message-bytes", "1024"))
    client, _ = await windowed(daemon, capacity=100)
    channel = channel_name()
    await client.write(encode_frame(Send(1, channel, message(1), 1)))
    ok = await client.next_frame()
    assert isinstance(ok, Ok) and ok.room, ok
    await client.write(encode_frame(Send(0, channel, b"x" * 1025, 2)))
    [error] = await client.frames_until_closed()
    client.close()
    assert isinstance(error, Error) and error.error_code is ErrorCode.MESSAGE_TOO_LARGE, error
    client, _ = await windowed(daemon, capacity=100)
    await client.write(encode_frame(Send(0, "not valid", message(1), 1)))
    [error] = await client.frames_until_closed()
    client.close()
    assert isinstance(error, Error) and error.error_code is ErrorCode.INVALID_NAME, error


@pytest.mark.backends("memory", "redis", "postgresql")
async def test_a_windowed_send_without_room_closes_the_connection_and_is_counted(
    broker: Any, make_layer: LayerFactory
) -> None:
    client, _ = await windowed(broker)
    before = value(scrape(broker), "channels_broker_protocol_errors_total", code="no_room")
    channel = channel_name()
    await client.write(encode_frame(Send(0, channel, message(1), 1)))
    [error] = await client.frames_until_closed()
    client.close()
    assert isinstance(error, Error) and error.request_id == 0
    assert error.error_code is ErrorCode.NO_ROOM and channel in error.message
    after = value(scrape(broker), "channels_broker_protocol_errors_total", code="no_room")
    assert after == before + 1
    await holds(make_layer, channel, [])


@pytest.mark.backends("memory", "redis", "postgresql")
async def test_a_retry_of_a_stored_seq_is_answered_and_not_stored_again(
    broker: Any, make_layer: LayerFactory
) -> None:
    """A client with an owned id sends seqs 1-3 (2 and 3 windowed) and drops its
    connection before reading any answer. Its next connection sends all three again, as
    requests: each is answered OK, and the channel holds three, not six. A fourth, new,
    is stored."""
    identity = Family().mint()
    owned = {"client_id": identity.client_id, "secret": identity.secret, "capacity": 100}
    channel = channel_name()
    first, _ = await windowed(broker, **owned)
    await first.write(encode_frame(Send(1, channel, message(1), 1)))
    assert await first.next_frame() == Ok(1, room=49)
    await first.write(b"".join(encode_frame(Send(0, channel, message(n), n)) for n in (2, 3)))
    confirm = await first.next_frame()  # handled: the retry must not store again
    assert isinstance(confirm, Confirm) and confirm.through_seq == 3
    first.close()
    second, _ = await windowed(broker, **owned)
    resent = [encode_frame(Send(10 + seq, channel, message(seq), seq)) for seq in (1, 2, 3, 4)]
    await second.write(b"".join(resent))
    answers = [await second.next_frame() for _ in range(4)]
    assert answers[:3] == [Ok(11), Ok(12), Ok(13)]
    assert isinstance(answers[3], Ok) and answers[3].request_id == 14
    second.close()
    await holds(make_layer, channel, [1, 2, 3, 4])


@pytest.mark.backends("memory", "redis", "postgresql")
async def test_room_goes_back_with_return_room_and_with_the_connection(broker: Any) -> None:
    """Capacity 3: A's first send leaves 2 free and takes 1 of it as room, so B fits one
    message, not two. RETURN_ROOM frees it for B; A's next grant, freed by A's close, too."""
    channel = channel_name()
    a, _ = await windowed(broker, capacity=3)
    b, _ = await windowed(broker, capacity=3, window=0)
    await a.write(encode_frame(Send(1, channel, message(1), 1)))
    assert await a.next_frame() == Ok(1, room=1)
    await b.write(b"".join(encode_frame(Send(n, channel, message(n), 0)) for n in (1, 2)))
    assert await b.next_frame() == Ok(1)
    full = await b.next_frame()
    assert isinstance(full, Error) and full.error_code is ErrorCode.CHANNEL_FULL
    # 5: more than A holds; the daemon frees what it holds, 1, and no more.
    await a.write(encode_frame(ReturnRoom(channel, 5)) + encode_frame(Ping(9)))
    assert await a.next_frame() == Pong(9)
    await b.write(encode_frame(Send(3, channel, message(3), 0)))
    assert await b.next_frame() == Ok(3)
    b_full = encode_frame(Send(4, channel, message(4), 0))
    await b.write(b_full)
    full = await b.next_frame()
    assert isinstance(full, Error) and full.error_code is ErrorCode.CHANNEL_FULL
    a.close()
    b.close()


async def room_held_by_a(on_a: Any, on_b: Any) -> tuple[RawClient, RawClient, str]:
    """Capacity 3: a client A of daemon ``on_a`` sends one message and gets room 1 (of
    the 2 free); a client B of ``on_b`` (no window) fits one message, not two: A's room
    counts. Return A, B and the channel."""
    channel = channel_name()
    a, _ = await windowed(on_a, capacity=3)
    b, _ = await windowed(on_b, capacity=3, window=0)
    await a.write(encode_frame(Send(1, channel, message(1), 1)))
    assert await a.next_frame() == Ok(1, room=1)
    await b.write(b"".join(encode_frame(Send(n, channel, message(n), 0)) for n in (2, 3)))
    assert await b.next_frame() == Ok(2)
    full = await b.next_frame()
    assert isinstance(full, Error) and full.error_code is ErrorCode.CHANNEL_FULL
    return a, b, channel


@pytest.mark.backends("memory", "redis", "postgresql")
async def test_room_goes_back_when_its_connection_closes(broker: Any) -> None:
    """Capacity 3: A's send takes 1 of the 2 free as room, B's send the other: full. Once
    A's connection closes, its room is released and B's next send is stored."""
    a, b, channel = await room_held_by_a(broker, broker)
    a.close()
    await until_ok(b, Send(4, channel, message(4), 0))
    b.close()


@pytest.mark.backends("memory", "redis", "postgresql")
async def test_confirms_are_held_and_merged_and_come_before_a_pong(broker_factory: Any) -> None:
    """--confirm-delay 1: five windowed SENDs, each in its own burst (stored, as a reader
    sees, before the next is written), get no CONFIRM of their own; a PING gets one
    CONFIRM of them all (seq 6) and then its PONG, as a PONG promises."""
    daemon = broker_factory(extra_args=("--confirm-delay", "1"))
    client, _ = await windowed(daemon, capacity=100)
    channel, layers = channel_name(), LayerFactory(daemon)
    reader = layers()
    await client.write(encode_frame(Send(1, channel, message(1), 1)))
    ok = await client.next_frame()
    assert isinstance(ok, Ok) and ok.room >= 5
    assert (await receive(reader, channel))["n"] == 1
    for n in range(2, 7):
        await client.write(encode_frame(Send(0, channel, message(n), n)))
        assert (await receive(reader, channel))["n"] == n  # stored: its burst is over
    await client.write(encode_frame(Ping(9)))
    confirm = await client.next_frame()
    assert isinstance(confirm, Confirm) and confirm.through_seq == 6, confirm
    assert await client.next_frame() == Pong(9)
    client.close()
    await layers.aclose()


@pytest.mark.backends("memory", "redis", "postgresql")
async def test_a_held_confirm_goes_with_the_next_write_to_its_client(
    broker_factory: Any,
) -> None:
    """--confirm-delay 1: a client that sends to its own channel (as a consumer answers a
    peer on the same connection) gets the PUSH of each windowed SEND at once; the held
    CONFIRM rides in the first write to it after half the delay, not a write of its own
    when the delay is up.

    1. SEND 2 (windowed): its PUSH comes, and no CONFIRM with it (held: too young).
    2. 0.55 s later, SEND 3: its PUSH comes with the CONFIRM of 2 and 3 right behind it,
       before the second is up. (On PostgreSQL the PUSH of 3 goes out directly, in the
       very storage call that records 3, before 3 can be confirmed: the CONFIRM of 2
       rides with it, and 3's is held in turn.)"""
    daemon = broker_factory(extra_args=("--confirm-delay", "1"))
    client, welcome = await windowed(daemon, capacity=100)
    channel = f"specific.{welcome.client_id}!{uuid.uuid4().hex[:12]}"
    await client.write(encode_frame(Send(1, channel, message(1), 1)))
    frames = [await client.next_frame(), await client.next_frame()]  # its OK and its PUSH
    assert any(isinstance(frame, Ok) and frame.room for frame in frames), frames
    started = time.monotonic()
    await client.write(encode_frame(Send(0, channel, message(2), 2)))
    push = await client.next_frame()
    assert isinstance(push, Push) and push.payload == message(2), push
    await asyncio.sleep(0.55)  # the held CONFIRM ages: no event says so
    await client.write(encode_frame(Send(0, channel, message(3), 3)))
    push, confirm = await client.next_frame(), await client.next_frame()
    assert isinstance(push, Push) and push.payload == message(3), push
    through = 2 if daemon.backend_url.startswith("postgresql") else 3
    assert isinstance(confirm, Confirm) and confirm.through_seq == through, confirm
    assert time.monotonic() - started < 1, "the CONFIRM waited for --confirm-delay"
    client.close()


@pytest.mark.backends("memory")
async def test_a_held_confirm_goes_at_once_when_the_client_needs_it(
    broker_factory: Any,
) -> None:
    """--confirm-delay 1: a burst that spends all the room a client holds on a channel
    is confirmed at once (with new room), not a second later."""
    daemon = broker_factory(extra_args=("--confirm-delay", "1"))
    client, _ = await windowed(daemon, capacity=1000)
    channel = channel_name()
    await client.write(encode_frame(Send(1, channel, message(1), 1)))
    ok = await client.next_frame()
    assert isinstance(ok, Ok) and ok.room > 1
    seqs = range(2, 2 + ok.room)
    started = time.monotonic()
    await client.write(b"".join(encode_frame(Send(0, channel, message(n), n)) for n in seqs))
    confirm = await client.next_frame()
    assert isinstance(confirm, Confirm) and confirm.through_seq == seqs[-1] and confirm.room
    assert time.monotonic() - started < 0.5  # not held for the delay
    client.close()
