"""Codec properties: valid frames round-trip; any input gives frames, None or ProtocolError."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    FRAME_TYPES,
    Ack,
    Cancel,
    Cancelled,
    Confirm,
    Deliver,
    Error,
    Flush,
    Flushed,
    Frame,
    FrameDecoder,
    GroupAdd,
    GroupDiscard,
    GroupSend,
    Hello,
    Ok,
    Ping,
    Pong,
    ProtocolError,
    Push,
    Receive,
    ReturnRoom,
    Send,
    SendMany,
    Welcome,
    encode_frame,
    encode_frames,
)
from protocol.frames import MAX_REQUEST_ID

# Enough examples to find field-order and type slips; each property stays well under 2 s.
EXAMPLES = settings(max_examples=300, deadline=None)

ids = st.integers(0, MAX_REQUEST_ID)
counts = st.integers(0, MAX_REQUEST_ID)
texts = st.text(max_size=24)
payloads = st.binary(max_size=64)
seconds = st.floats(min_value=0, allow_nan=False, allow_infinity=False) | st.integers(0, 2**32)


def _tuples(elements: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.lists(elements, max_size=5).map(tuple)


FRAME_STRATEGIES: dict[type[Frame], st.SearchStrategy[Frame]] = {
    Hello: st.builds(
        Hello,
        ids,
        texts,
        texts,
        texts,
        st.integers(1, MAX_REQUEST_ID),
        seconds,
        seconds,
        _tuples(st.tuples(texts, counts)),
        payloads,
        counts,
    ),
    Welcome: st.builds(Welcome, ids, texts, st.integers(1, MAX_REQUEST_ID), texts, counts),
    Send: st.builds(Send, ids, texts, payloads, ids),
    SendMany: st.builds(SendMany, ids, _tuples(st.tuples(texts, payloads))),
    Receive: st.builds(Receive, ids, texts),
    Cancel: st.builds(Cancel, ids),
    Ack: st.builds(Ack, _tuples(st.tuples(texts, counts))),
    GroupAdd: st.builds(GroupAdd, ids, texts, texts),
    GroupDiscard: st.builds(GroupDiscard, ids, texts, texts),
    GroupSend: st.builds(GroupSend, ids, texts, payloads),
    Flush: st.builds(Flush, ids),
    Ping: st.builds(Ping, ids),
    ReturnRoom: st.builds(ReturnRoom, texts, counts),
    Ok: st.builds(Ok, ids, counts, _tuples(counts), counts),
    Error: st.builds(Error, ids, counts, texts),
    Deliver: st.builds(Deliver, ids, texts, payloads, counts),
    Cancelled: st.builds(Cancelled, ids),
    Push: st.builds(Push, _tuples(texts), payloads, counts),
    Pong: st.builds(Pong, ids),
    Flushed: st.builds(Flushed),
    Confirm: st.builds(Confirm, ids, _tuples(st.tuples(texts, counts))),
}
frames = st.one_of(*FRAME_STRATEGIES.values())

# msgpack values of every kind, to put behind a known type number.
wire_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=8,
)


def _decode_all(data: bytes, chunks: list[int]) -> list[Frame]:
    """Feed ``data`` cut at ``chunks`` offsets, draining frames after every read."""
    decoder = FrameDecoder()
    received = []
    start = 0
    for end in [*sorted(chunks), len(data)]:
        decoder.receive_data(data[start:end])
        start = end
        while (frame := decoder.next_frame()) is not None:
            received.append(frame)
    assert decoder.buffered_bytes == 0
    return received


def _frames_or_protocol_error(data: bytes) -> list[Frame]:
    """Drain ``data``; only a frame, ``None`` or a ``ProtocolError`` may come out."""
    decoder = FrameDecoder(max_frame_bytes=4096)
    decoder.receive_data(data)
    received: list[Frame] = []
    try:
        while (frame := decoder.next_frame()) is not None:
            received.append(frame)
    except ProtocolError:
        pass
    return received


def test_strategies_cover_every_frame_type() -> None:
    assert sorted(cls.TYPE for cls in FRAME_STRATEGIES) == sorted(FRAME_TYPES)


@EXAMPLES
@given(frames)
def test_every_valid_frame_round_trips(frame: Frame) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(frame))

    assert decoder.next_frame() == frame
    assert decoder.next_frame() is None


@EXAMPLES
@given(st.lists(frames, max_size=6), st.data())
def test_frames_split_at_random_points_round_trip_in_order(
    sent: list[Frame], data: st.DataObject
) -> None:
    wire = encode_frames(sent)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=8))

    assert _decode_all(wire, cuts) == sent


@EXAMPLES
@given(st.binary(max_size=256))
def test_random_bytes_give_frames_none_or_protocol_error(data: bytes) -> None:
    _frames_or_protocol_error(data)


@EXAMPLES
@given(st.binary(max_size=256))
def test_random_body_behind_a_valid_prefix_gives_a_frame_or_protocol_error(body: bytes) -> None:
    _frames_or_protocol_error(struct.pack(">I", len(body)) + body)


@EXAMPLES
@given(st.sampled_from(sorted(FRAME_TYPES)), st.lists(wire_values, max_size=9))
def test_known_type_with_random_fields_gives_a_frame_that_round_trips_or_protocol_error(
    type_number: int, fields: list[Any]
) -> None:
    body = msgpack.packb([type_number, *fields], use_bin_type=True)

    for frame in _frames_or_protocol_error(struct.pack(">I", len(body)) + body):
        # Whatever the decoder accepts is a valid frame: it encodes and comes back equal.
        assert _decode_all(encode_frame(frame), []) == [frame]
