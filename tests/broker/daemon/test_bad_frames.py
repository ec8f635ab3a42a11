"""A misbehaving client loses its own connection, and nobody else notices.

Each case opens a raw socket to the daemon and sends bytes no layer would send,
while a layer client of the same daemon waits in ``receive``. The daemon answers
with a connection-level ERROR (request id 0) where the protocol allows, closes that
connection only, logs the protocol error, and keeps serving the layer. (Peers that
speak HTTP or TLS instead are told so in words: test_strangers.py.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from protocol import (
    PROTOCOL_VERSION,
    Error,
    ErrorCode,
    Ping,
    Send,
    Welcome,
    encode_frame,
)
from tests.broker.raw_client import RawClient, hello, raw_frame
from tests.waits import DELIVERY_TIMEOUT_S, IN_FLIGHT_S


@dataclass(frozen=True)
class Case:
    #: Bytes sent after the handshake (or instead of it, if ``handshake`` is False).
    data: bytes
    #: Complete the HELLO/WELCOME handshake first.
    handshake: bool
    #: The ERROR the daemon must send before it closes; None: it just closes.
    code: ErrorCode | None
    #: Half-close our side after sending, as a client that gives up would.
    close_after: bool = False


MALFORMED, TOO_LARGE, HANDSHAKE = (
    ErrorCode.MALFORMED_FRAME,
    ErrorCode.FRAME_TOO_LARGE,
    ErrorCode.HANDSHAKE,
)

CASES = {
    "garbage-body": Case(b"\x00\x00\x00\x03\xc1\xc1\xc1", True, MALFORMED),
    "truncated-hello-then-close": Case(hello()[:9], False, None, close_after=True),
    "truncated-frame-then-close": Case(encode_frame(Ping(1))[:-1], True, None, close_after=True),
    "oversized-length-prefix": Case(b"\xff\xff\xff\xff", True, TOO_LARGE),
    "oversized-length-prefix-first": Case(b"\xff\xff\xff\xff", False, TOO_LARGE),
    "unknown-frame-type": Case(raw_frame([99, 1]), True, ErrorCode.UNKNOWN_FRAME),
    "wrong-field-types": Case(raw_frame([Send.TYPE, 1, 2, 3]), True, MALFORMED),
    "frame-before-hello": Case(encode_frame(Ping(1)), False, HANDSHAKE),
    "second-hello": Case(hello(), True, HANDSHAKE),
    "unsupported-version": Case(
        hello(version=PROTOCOL_VERSION + 100), False, ErrorCode.UNSUPPORTED_VERSION
    ),
}


async def assert_layer_still_works(layer: Any, sender: Any, unique: Callable[[str], str]) -> None:
    queue = unique("queue")
    await sender.send(queue, {"still": "fine"})
    assert await asyncio.wait_for(layer.receive(queue), DELIVERY_TIMEOUT_S) == {"still": "fine"}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
async def test_bad_frame_closes_only_that_connection(
    broker: Any, make_layer: Any, unique: Callable[[str], str], case: Case
) -> None:
    """A protocol error ends one connection only.

    1. A layer client waits in ``receive`` on its own channel.
    2. A raw client (after HELLO/WELCOME, if the case says so) sends the bad bytes.
    3. The daemon sends a connection-level ERROR with the expected code (if any) and closes.
    4. The daemon logged a protocol error for that peer (a cut-short frame too).
    5. The waiting receive gets a message sent afterwards; the layer still sends and receives.
    """
    layer, sender = make_layer(), make_layer()
    channel = await layer.new_channel()
    waiting = asyncio.create_task(layer.receive(channel))
    await asyncio.sleep(IN_FLIGHT_S)  # let the receive reach the daemon

    raw = await RawClient.open(broker.address)
    try:
        if case.handshake:
            await raw.write(hello())
            assert isinstance(await raw.next_frame(), Welcome)
        await raw.write(case.data, close_after=case.close_after)
        frames = await raw.frames_until_closed()
    finally:
        raw.close()

    if case.code is None:
        assert frames == [], f"unexpected frames: {frames}"
    else:
        assert frames, "the daemon closed without an ERROR frame"
        error = frames[-1]
        assert isinstance(error, Error), f"last frame is {error!r}"
        assert (error.request_id, error.error_code) == (0, case.code), error
    peer = f"127.0.0.1:{raw.local_port}"
    broker.wait_for_log(lambda line: peer in line and "protocol error" in line.lower())

    assert broker.is_running()
    assert not waiting.done()
    await sender.send(channel, {"after": "bad client"})
    assert await asyncio.wait_for(waiting, DELIVERY_TIMEOUT_S) == {"after": "bad client"}
    await assert_layer_still_works(layer, sender, unique)


async def test_wrong_token_is_refused_and_others_are_served(
    broker_factory: Callable[..., Any], make_layer: Any, unique: Callable[[str], str]
) -> None:
    """HELLO with a wrong token gets ERROR(AUTH_FAILED) and a close; the right token works."""
    guarded = broker_factory(token="s3cret")
    layer = make_layer(hosts=[guarded.url], token="s3cret")
    sender = make_layer(hosts=[guarded.url], token="s3cret")
    raw = await RawClient.open(guarded.address)
    try:
        await raw.write(hello(token="guess"))
        frames = await raw.frames_until_closed()
    finally:
        raw.close()
    assert len(frames) == 1 and isinstance(frames[0], Error), frames
    assert (frames[0].request_id, frames[0].error_code) == (0, ErrorCode.AUTH_FAILED)
    guarded.wait_for_log(lambda line: "authentication failed" in line.lower())
    await assert_layer_still_works(layer, sender, unique)
