"""Message ids: every payload a layer sends carries (sender, seq), and a receiving layer
hands a message of one sender to ``receive()`` once, however often a fault redelivers it.

A redelivery is made here the way a fault makes one: the same payload, id and all,
stored in the channel again (a bare connection sends the bytes a layer sent).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgpack

from protocol import Deliver, Ok, Receive, Send, encode_frame, split_message_id, with_message_id
from tests.broker.raw_client import RawClient, hello
from tests.waits import assert_nothing_within


def payload(sender: bytes, seq: int, n: int) -> bytes:
    return with_message_id(sender, seq, msgpack.packb({"type": "t", "n": n}))


@contextlib.asynccontextmanager
async def opened(broker: Any) -> AsyncIterator[RawClient]:
    """A bare connection past HELLO."""
    raw = await RawClient.open(broker.address)
    try:
        await raw.write(hello())
        await raw.next_frame()
        yield raw
    finally:
        raw.close()


async def store(raw: RawClient, channel: str, payloads: list[bytes]) -> None:
    """Send each payload over a bare connection, as a layer would have."""
    for request_id, body in enumerate(payloads, start=1):
        await raw.write(encode_frame(Send(request_id, channel, body)))
        assert isinstance(await raw.next_frame(), Ok)


async def test_a_layer_sends_each_message_with_its_own_id(
    broker: Any, make_layer: Callable[..., Any], unique: Callable[[str], str]
) -> None:
    """Two sends of one layer: one sender, growing numbers; another layer: another sender."""
    first, second = make_layer(), make_layer()
    channel = unique("ids")
    for layer in (first, first, second):
        await layer.send(channel, {"type": "t"})
    ids = []
    async with opened(broker) as raw:
        for request_id in range(1, 4):
            await raw.write(encode_frame(Receive(request_id, channel)))
            delivered = await raw.next_frame()
            assert isinstance(delivered, Deliver)
            ids.append(split_message_id(delivered.payload)[:2])
    # A send may return before it is stored (send windows), so the second layer's
    # message may come between the first's: a sender's own come in order.
    senders = [sender for sender, _ in ids]
    [(a, twice)] = [(sender, n) for sender in set(senders) if (n := senders.count(sender)) > 1]
    [b] = [sender for sender in senders if sender != a]
    assert twice == 2 and len(a) == len(b) == 12
    s1, s2 = (seq for sender, seq in ids if sender == a)
    assert s2 > s1 > 0


async def test_a_redelivered_message_reaches_receive_once(
    broker: Any, make_layer: Callable[..., Any], unique: Callable[[str], str]
) -> None:
    """Sender A's 1, 2, then 2 and 1 again (redeliveries), sender B's 1, A's 3, then 5
    before 4 (out of order, as a worker beside others can get them: new all the same):
    the reader gets each message once."""
    reader = make_layer()
    channel = unique("redelivered")
    a, b = b"A" * 12, b"B" * 12
    async with opened(broker) as raw:
        await store(
            raw,
            channel,
            [payload(a, 1, 1), payload(a, 2, 2), payload(a, 2, 2), payload(a, 1, 1)]
            + [payload(b, 1, 10), payload(a, 3, 3), payload(a, 5, 5), payload(a, 4, 4)],
        )
    got = [(await reader.receive(channel))["n"] for _ in range(6)]
    assert got == [1, 2, 10, 3, 5, 4]
    await assert_nothing_within(reader, channel)
    assert reader.handed.redelivered == 2


async def test_a_message_without_an_id_is_handed_as_before(
    broker: Any, make_layer: Callable[..., Any], unique: Callable[[str], str]
) -> None:
    """A payload of plain msgpack (an older layer's): handed every time, never dropped."""
    reader = make_layer()
    channel = unique("plain")
    plain = msgpack.packb({"type": "t", "n": 7})
    async with opened(broker) as raw:
        await store(raw, channel, [plain, plain])
    assert [(await reader.receive(channel))["n"] for _ in range(2)] == [7, 7]
