"""The length-prefixed codec: round trips, byte splits, the size limit and bad bodies."""

from __future__ import annotations

import struct
import tracemalloc
from typing import Any

import msgpack
import pytest

from protocol import (
    FRAME_TYPES,
    HEADER_BYTES,
    LARGE_FIELD_BYTES,
    Ack,
    Cancel,
    Cancelled,
    Confirm,
    Deliver,
    Error,
    ErrorCode,
    Flush,
    Flushed,
    Frame,
    FrameDecoder,
    FrameEncoder,
    FrameTooLarge,
    GroupAdd,
    GroupDiscard,
    GroupSend,
    Hello,
    MalformedFrame,
    Ok,
    Ping,
    Pong,
    ProtocolError,
    Push,
    Receive,
    ReturnRoom,
    Send,
    SendMany,
    UnknownFrame,
    Welcome,
    encode_frame,
    encode_frame_parts,
    encode_frames,
    encode_into,
    split_message_id,
    with_message_id,
)

# One frame of every type, with distinct field values so a swapped field shows.
FRAMES: list[Frame] = [
    Hello(1, "s3cret", "", "site", 100, 60, 86400.5, (("^big", 1000), ("tiny", 1))),
    Welcome(1, "ab12", 4 * 1024 * 1024, "channels-broker 0.1.0", 64, "5f0c3a9e12d4b6a7"),
    Send(1, "chat", b"\x81\xa4type\xa5hello", 17),
    SendMany(2, (("a", b"1"), ("specific.ab12!x", b""))),
    Receive(3, "work"),
    Cancel(3),
    Ack((("specific.ab12!x", 2), ("specific.ab12!y", 1))),
    GroupAdd(4, "room", "specific.ab12!x"),
    GroupDiscard(5, "room", "specific.ab12!y"),
    GroupSend(6, "room", b"\x00\xff"),
    Flush(7),
    Ping(8),
    ReturnRoom("chat", 12),
    Ok(9, 2, (0, 3), 31),
    Error(10, ErrorCode.CHANNEL_FULL, "channel is full"),
    Deliver(11, "work", b"payload", 59_000),
    Cancelled(12),
    Push(("specific.ab12!x", "specific.ab12!y"), b"once", 1500),
    Pong(8),
    Flushed(),
    Confirm(18, (("chat", 4),)),
]


def _ids(frame: Frame) -> str:
    return type(frame).__name__


def _framed(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def _wire(*items: Any) -> bytes:
    """A frame built by hand: ``items`` packed as a msgpack array, length prefixed."""
    return _framed(msgpack.packb(list(items), use_bin_type=True))


def _drain(decoder: FrameDecoder) -> list[Frame]:
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    return frames


def _decode_one(data: bytes) -> Frame | None:
    decoder = FrameDecoder()
    decoder.receive_data(data)
    return decoder.next_frame()


def test_samples_cover_every_frame_type() -> None:
    assert sorted(type(frame).TYPE for frame in FRAMES) == sorted(FRAME_TYPES)


@pytest.mark.parametrize("frame", FRAMES, ids=_ids)
def test_frame_fed_whole_round_trips(frame: Frame) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(frame))

    assert decoder.next_frame() == frame
    assert decoder.next_frame() is None
    assert decoder.buffered_bytes == 0


@pytest.mark.parametrize("frame", FRAMES, ids=_ids)
def test_frame_fed_one_byte_at_a_time_round_trips(frame: Frame) -> None:
    data = encode_frame(frame)
    decoder = FrameDecoder()
    for i in range(len(data) - 1):
        decoder.receive_data(data[i : i + 1])
        assert decoder.next_frame() is None
    decoder.receive_data(data[-1:])

    assert decoder.next_frame() == frame
    assert decoder.next_frame() is None


@pytest.mark.parametrize("frame", FRAMES, ids=_ids)
def test_frame_followed_by_part_of_the_next_leaves_those_bytes_buffered(frame: Frame) -> None:
    following = encode_frame(Ping(77))
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(frame) + following[:3])

    assert decoder.next_frame() == frame
    assert decoder.next_frame() is None
    assert decoder.buffered_bytes == 3

    decoder.receive_data(following[3:])
    assert decoder.next_frame() == Ping(77)


def test_decoded_error_code_is_a_plain_int_equal_to_the_enum() -> None:
    decoded = _decode_one(encode_frame(Error(0, ErrorCode.AUTH_FAILED, "bad token")))

    assert isinstance(decoded, Error)
    assert type(decoded.code) is int
    assert decoded.error_code is ErrorCode.AUTH_FAILED


def test_several_frames_in_one_buffer_come_out_in_order() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode_frames(FRAMES))

    assert _drain(decoder) == FRAMES
    assert decoder.buffered_bytes == 0


def test_encode_frames_is_the_concatenation_of_encode_frame() -> None:
    assert encode_frames(FRAMES) == b"".join(encode_frame(frame) for frame in FRAMES)
    assert encode_frames([]) == b""


@pytest.mark.parametrize("size", [0, 65_535, 65_536, 1 << 20])
def test_encode_frame_parts_join_to_encode_frame_with_a_large_payload_as_it_is(size: int) -> None:
    """A payload of LARGE_FIELD_BYTES or more is a part of its own, the object itself:
    a writer copies it once (a join) or not at all (written as a view)."""
    payload = b"p" * size
    for frame in [Push(("asgi.c!a", "asgi.c!b"), payload, 5), Deliver(3, "q", payload, 9)]:
        parts = encode_frame_parts(frame)
        assert b"".join(parts) == encode_frame(frame)
        assert any(part is payload for part in parts) == (size >= LARGE_FIELD_BYTES)
        output = [b"before"]
        assert encode_into(output, frame) == len(encode_frame(frame))
        assert b"".join(output) == b"before" + encode_frame(frame)


@pytest.mark.parametrize("size", [0, 65_535, 65_536, 1 << 20])
def test_the_encoders_push_is_encode_frame_with_a_large_payload_as_it_is(size: int) -> None:
    """The daemon's fast PUSH encoding gives ``encode_frame``'s bytes, and a large payload
    stays a part of its own (a burst of 8 MiB pushes once stalled other clients)."""
    payload, channels = b"p" * size, ["asgi.c!a", "asgi.c!b"]
    output = [b"before"]
    size_written = FrameEncoder().push_into(output, channels, payload, 5)
    expected = encode_frame(Push(tuple(channels), payload, 5))
    assert (size_written, b"".join(output)) == (len(expected), b"before" + expected)
    assert any(part is payload for part in output) == (size >= LARGE_FIELD_BYTES)


def test_the_encoders_ack_is_encode_frame() -> None:
    """The layer's fast ACK encoding gives ``encode_frame``'s bytes."""
    encoder = FrameEncoder()
    for counts in [(("asgi.c!a", 1),), (("asgi.c!a", 3), ("asgi.c!b", 70_000))]:
        assert encoder.ack(counts) == encode_frame(Ack(counts))


def test_frames_split_across_reads_at_every_offset_come_out_in_order() -> None:
    frames: list[Frame] = [Send(1, "a", b"x" * 10), Ping(2), Push(("specific.c!d",), b"y", 5)]
    data = encode_frames(frames)
    for cut in range(len(data) + 1):
        decoder = FrameDecoder()
        decoder.receive_data(data[:cut])
        received = _drain(decoder)
        decoder.receive_data(data[cut:])
        received += _drain(decoder)
        assert received == frames, f"cut at {cut}"


def test_trailing_optional_fields_may_be_absent_on_the_wire() -> None:
    assert _decode_one(_wire(Ok.TYPE, 5)) == Ok(5)
    assert _decode_one(_wire(Ok.TYPE, 5, 1)) == Ok(5, 1)
    hello = _decode_one(_wire(Hello.TYPE, 1, "", "", "site", 100, 60, 86400))
    assert hello == Hello(1, "", "", "site", 100, 60, 86400)
    assert isinstance(hello, Hello) and not hello.acks_deliveries


def test_leases_ride_at_the_end_of_deliver_and_ack() -> None:
    """A DELIVER without a lease and an ACK without leases are the earlier frames,
    byte for byte; with them, the fields come last."""
    assert encode_frame(Deliver(1, "c", b"p", 5)) == _wire(Deliver.TYPE, 1, "c", b"p", 5)
    assert encode_frame(Ack((("c", 1),))) == _wire(Ack.TYPE, [["c", 1]])
    leased = Deliver(1, "c", b"p", 5, "12.1")
    assert _decode_one(encode_frame(leased)) == leased
    acked = Ack((), leases=(("c", "12.1"),))
    assert _decode_one(encode_frame(acked)) == acked


def test_a_lease_is_bounded() -> None:
    with pytest.raises(MalformedFrame):
        _decode_one(_wire(Deliver.TYPE, 1, "c", b"p", 5, "1" * 65))
    with pytest.raises(MalformedFrame):
        _decode_one(_wire(Ack.TYPE, [], [["c", "1" * 65]]))


@pytest.mark.parametrize("frame", FRAMES, ids=_ids)
def test_truncated_frame_returns_none_and_keeps_its_bytes(frame: Frame) -> None:
    data = encode_frame(frame)
    for size in range(len(data)):
        decoder = FrameDecoder()
        decoder.receive_data(data[:size])
        assert decoder.next_frame() is None
        assert decoder.buffered_bytes == size


def test_empty_decoder_returns_none() -> None:
    assert FrameDecoder().next_frame() is None


def test_receive_data_only_stores_bytes() -> None:
    decoder = FrameDecoder(max_frame_bytes=1)
    # Neither a too-long prefix nor garbage is looked at before next_frame.
    decoder.receive_data(struct.pack(">I", 2**32 - 1))
    decoder.receive_data(b"\xc1" * 10)

    assert decoder.buffered_bytes == HEADER_BYTES + 10


def test_oversized_prefix_is_refused_before_body_arrives() -> None:
    decoder = FrameDecoder(max_frame_bytes=1024)
    decoder.receive_data(struct.pack(">I", 1025))

    with pytest.raises(FrameTooLarge) as caught:
        decoder.next_frame()
    assert caught.value.code is ErrorCode.FRAME_TOO_LARGE


def test_oversized_prefix_is_refused_on_its_fourth_byte() -> None:
    prefix = struct.pack(">I", 2**32 - 1)
    decoder = FrameDecoder()
    for byte in prefix[:-1]:
        decoder.receive_data(bytes([byte]))
        assert decoder.next_frame() is None
    decoder.receive_data(prefix[-1:])

    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


def test_frame_of_exactly_the_limit_is_accepted() -> None:
    data = encode_frame(Send(1, "chat", b"x" * 100))
    body_bytes = len(data) - HEADER_BYTES

    decoder = FrameDecoder(max_frame_bytes=body_bytes)
    decoder.receive_data(data)
    assert decoder.next_frame() == Send(1, "chat", b"x" * 100)

    decoder = FrameDecoder(max_frame_bytes=body_bytes - 1)
    decoder.receive_data(data)
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


def test_limit_applies_to_each_frame_in_a_buffer() -> None:
    decoder = FrameDecoder(max_frame_bytes=16)
    decoder.receive_data(encode_frame(Ping(1)) + encode_frame(Send(2, "c", b"x" * 64)))

    assert decoder.next_frame() == Ping(1)
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


def _bad_utf8_str() -> bytes:
    # fixstr of two bytes that are not UTF-8, where a channel name belongs.
    return _framed(b"\x93" + msgpack.packb(Receive.TYPE) + b"\x01" + b"\xa2\xff\xfe")


MALFORMED = ErrorCode.MALFORMED_FRAME
UNKNOWN = ErrorCode.UNKNOWN_FRAME

BAD_BODIES: list[tuple[str, bytes, ErrorCode]] = [
    # Not msgpack at all, or not one complete object.
    ("empty body", _framed(b""), MALFORMED),
    ("reserved byte 0xc1", _framed(b"\xc1"), MALFORMED),
    ("truncated array", _framed(b"\x93\x0c"), MALFORMED),
    ("extra data after body", _framed(msgpack.packb([Ping.TYPE, 1]) + b"\x00"), MALFORMED),
    ("invalid utf-8 in a str", _bad_utf8_str(), MALFORMED),
    ("map with int keys", _framed(msgpack.packb([Ping.TYPE, {1: 2}])), MALFORMED),
    # Valid msgpack that is not an array.
    ("int body", _framed(msgpack.packb(Ping.TYPE)), MALFORMED),
    ("str body", _framed(msgpack.packb("ping")), MALFORMED),
    ("bin body", _framed(msgpack.packb(b"\x0c\x01", use_bin_type=True)), MALFORMED),
    ("nil body", _framed(msgpack.packb(None)), MALFORMED),
    ("map body", _framed(msgpack.packb({"type": Ping.TYPE})), MALFORMED),
    ("empty array", _wire(), MALFORMED),
    # Type numbers this version does not know.
    ("type 0", _wire(0, 1), UNKNOWN),
    ("type 99", _wire(99, 1), UNKNOWN),
    ("negative type", _wire(-Ping.TYPE, 1), UNKNOWN),
    ("type as str", _wire("12", 1), UNKNOWN),
    ("type as float", _wire(12.0, 1), UNKNOWN),
    ("type as bool", _wire(True), UNKNOWN),
    ("type as nil", _wire(None, 1), UNKNOWN),
    # Wrong field counts.
    ("ping without id", _wire(Ping.TYPE), MALFORMED),
    ("ping with two ids", _wire(Ping.TYPE, 1, 2), MALFORMED),
    ("send missing payload", _wire(Send.TYPE, 1, "chat"), MALFORMED),
    ("ok without id", _wire(Ok.TYPE), MALFORMED),
    ("ok with extra field", _wire(Ok.TYPE, 1, 0, [], 0, 0), MALFORMED),
    ("hello missing expiry", _wire(Hello.TYPE, 1, "", "", "p", 100, 60), MALFORMED),
    ("flushed with a field", _wire(Flushed.TYPE, 1), MALFORMED),
    # Wrong field types.
    ("request id as str", _wire(Ping.TYPE, "1"), MALFORMED),
    ("request id as float", _wire(Ping.TYPE, 1.0), MALFORMED),
    ("request id as nil", _wire(Ping.TYPE, None), MALFORMED),
    ("request id negative", _wire(Ping.TYPE, -1), MALFORMED),
    ("request id over int64", _wire(Ping.TYPE, 2**64 - 1), MALFORMED),
    ("request id as array", _wire(Ping.TYPE, [1]), MALFORMED),
    ("request id as map", _wire(Ping.TYPE, {"id": 1}), MALFORMED),
    ("channel as bin", _wire(Send.TYPE, 1, b"chat", b"x"), MALFORMED),
    ("payload as str", _wire(Send.TYPE, 1, "chat", "x"), MALFORMED),
    ("send many item of one", _wire(SendMany.TYPE, 1, [["chat"]]), MALFORMED),
    ("send many str payload", _wire(SendMany.TYPE, 1, [["chat", "x"]]), MALFORMED),
    ("send many items as map", _wire(SendMany.TYPE, 1, {"chat": b"x"}), MALFORMED),
    ("push channel as int", _wire(Push.TYPE, ["a", 1], b"x", 5), MALFORMED),
    ("push channels as str", _wire(Push.TYPE, "a", b"x", 5), MALFORMED),
    ("ack negative count", _wire(Ack.TYPE, [["a", -1]]), MALFORMED),
    ("ack count as float", _wire(Ack.TYPE, [["a", 1.5]]), MALFORMED),
    ("hello capacity zero", _wire(Hello.TYPE, 1, "", "", "p", 0, 60, 60), MALFORMED),
    ("hello expiry as str", _wire(Hello.TYPE, 1, "", "", "p", 1, "60", 60), MALFORMED),
    ("hello expiry negative", _wire(Hello.TYPE, 1, "", "", "p", 1, -0.5, 60), MALFORMED),
    ("hello expiry nan", _wire(Hello.TYPE, 1, "", "", "p", 1, float("nan"), 60), MALFORMED),
    ("hello expiry inf", _wire(Hello.TYPE, 1, "", "", "p", 1, 60, float("inf")), MALFORMED),
    ("hello expiry as array", _wire(Hello.TYPE, 1, "", "", "p", 1, [60], 60), MALFORMED),
    (
        "hello capacity pair str",
        _wire(Hello.TYPE, 1, "", "", "p", 1, 6, 6, [["a", "1"]]),
        MALFORMED,
    ),
    ("welcome max bytes zero", _wire(Welcome.TYPE, 1, "ab", 0, "v"), MALFORMED),
    ("ok rejected as int", _wire(Ok.TYPE, 1, 0, 3), MALFORMED),
    ("ok rejected of str", _wire(Ok.TYPE, 1, 0, ["3"]), MALFORMED),
    ("error code as float", _wire(Error.TYPE, 1, 1.5, "m"), MALFORMED),
    ("error message as bin", _wire(Error.TYPE, 1, 1, b"m"), MALFORMED),
    ("deliver ttl as str", _wire(Deliver.TYPE, 1, "c", b"x", "5"), MALFORMED),
    ("group as nil", _wire(GroupAdd.TYPE, 1, None, "c"), MALFORMED),
    ("group discard channel as int", _wire(GroupDiscard.TYPE, 1, "g", 7), MALFORMED),
    ("group send payload as nil", _wire(GroupSend.TYPE, 1, "g", None), MALFORMED),
    ("receive channel as array", _wire(Receive.TYPE, 1, ["c"]), MALFORMED),
    # bool is an int to Python, never to us.
    ("request id as bool", _wire(Ping.TYPE, True), MALFORMED),
    ("send request id as bool", _wire(Send.TYPE, False, "chat", b"x"), MALFORMED),
    ("ok count as bool", _wire(Ok.TYPE, 1, True), MALFORMED),
    ("ok rejected of bool", _wire(Ok.TYPE, 1, 0, [True]), MALFORMED),
    ("hello version as bool", _wire(Hello.TYPE, True, "", "", "p", 1, 6, 6), MALFORMED),
    ("hello capacity as bool", _wire(Hello.TYPE, 1, "", "", "p", True, 6, 6), MALFORMED),
    ("hello expiry as bool", _wire(Hello.TYPE, 1, "", "", "p", 1, True, 6), MALFORMED),
    ("ack count as bool", _wire(Ack.TYPE, [["a", True]]), MALFORMED),
    ("deliver ttl as bool", _wire(Deliver.TYPE, 1, "c", b"x", False), MALFORMED),
    ("cancel id as bool", _wire(Cancel.TYPE, True), MALFORMED),
    ("cancelled id as bool", _wire(Cancelled.TYPE, True), MALFORMED),
    ("pong id as bool", _wire(Pong.TYPE, False), MALFORMED),
    ("flush id as bool", _wire(Flush.TYPE, True), MALFORMED),
]


@pytest.mark.parametrize(
    ("data", "code"),
    [(data, code) for _, data, code in BAD_BODIES],
    ids=[name for name, _, _ in BAD_BODIES],
)
def test_bad_body_raises_protocol_error_with_its_code(data: bytes, code: ErrorCode) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(data)

    with pytest.raises(ProtocolError) as caught:
        decoder.next_frame()
    assert caught.value.code is code
    assert isinstance(caught.value, UnknownFrame if code is UNKNOWN else MalformedFrame)


def test_a_message_id_goes_before_the_body_and_comes_off_whole() -> None:
    body = msgpack.packb({"type": "t"})
    sender = bytes(range(12))
    assert split_message_id(with_message_id(sender, 2**40, body)) == (sender, 2**40, body)


def test_a_payload_without_an_id_is_its_own_body() -> None:
    """Plain msgpack and a Fernet token (base64 text) can never start with the mark."""
    for payload in (msgpack.packb({"type": "t"}), b"gAAAAABk-token", b"", b"\xc1short"):
        assert split_message_id(payload) == (b"", 0, payload)


def test_encoding_a_frame_takes_no_large_buffer() -> None:
    """msgpack's packer starts with 256 KiB, past the mmap threshold the daemon pins
    (broker/ops/malloc.py): a frame packed with it cost an mmap and a munmap."""
    frame = Ok(7, room=3)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        encoded = encode_frame(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    decoder = FrameDecoder()
    decoder.receive_data(encoded)
    assert decoder.next_frame() == frame
    assert peak < 64 * 1024
