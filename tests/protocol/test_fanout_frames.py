"""The frames of a group fan-out at the edge: PUSH with a capacity, ACK with counts."""

from __future__ import annotations

import pytest

from protocol import (
    LARGE_FIELD_BYTES,
    Ack,
    FrameDecoder,
    FrameEncoder,
    Push,
    encode_channels,
    encode_frame,
)

CHANNELS = ["asgi.c1!a", "asgi.c1!b", "asgi.c1!" + "x" * 80]


@pytest.mark.parametrize("size", [0, 10, LARGE_FIELD_BYTES - 1, LARGE_FIELD_BYTES, 300_000])
def test_a_fanout_push_is_the_frame_encode_frame_gives(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + b"p" * (size % 256)
    buffers: list[bytes] = []
    written = FrameEncoder().fanout_into(buffers, encode_channels(CHANNELS), payload, 60_000, 100)
    wire = b"".join(buffers)
    assert written == len(wire)
    assert wire == encode_frame(Push(tuple(CHANNELS), payload, 60_000, 100))
    decoder = FrameDecoder()
    decoder.receive_data(wire)
    assert decoder.next_frame() == Push(tuple(CHANNELS), payload, 60_000, 100)


def test_a_push_from_storage_is_the_frame_of_the_earlier_release() -> None:
    """fanout_capacity 0 stays off the wire: a layer of version 1 reads it."""
    assert encode_frame(Push(("asgi.c1!a",), b"m", 5)) == encode_frame(
        Push(("asgi.c1!a",), b"m", 5, 0)
    )
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(Push(("asgi.c1!a",), b"m", 5)))
    assert decoder.next_frame() == Push(("asgi.c1!a",), b"m", 5, 0)


def test_an_ack_carries_fanout_counts_after_its_pairs() -> None:
    frames = [Ack((("asgi.c1!a", 2),)), Ack((), 1250, 3), Ack((("asgi.c1!b", 1),), 7, 0)]
    decoder = FrameDecoder()
    decoder.receive_data(b"".join(encode_frame(frame) for frame in frames))
    assert [decoder.next_frame() for _ in frames] == frames
    assert encode_frame(Ack((("asgi.c1!a", 2),))) == encode_frame(Ack((("asgi.c1!a", 2),), 0, 0))
