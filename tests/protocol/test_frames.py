"""Frame types: stable numbers, constructor validation, and the errors they raise."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest

from protocol import (
    FRAME_TYPES,
    Ack,
    Deliver,
    Error,
    ErrorCode,
    FrameOverLimit,
    FrameTooLarge,
    HandshakeError,
    Hello,
    MalformedFrame,
    Ok,
    Ping,
    ProtocolError,
    Push,
    Send,
    SendMany,
    UnknownFrame,
    Welcome,
)
from protocol.frames import MAX_REQUEST_ID, frame_from_wire


def _hello(**changes: object) -> Hello:
    fields: dict[str, object] = {
        "version": 1,
        "token": "",
        "client_id": "",
        "prefix": "site",
        "capacity": 100,
        "expiry_s": 60,
        "group_expiry_s": 86400,
    }
    fields.update(changes)
    return Hello(**fields)  # type: ignore[arg-type]


def test_frame_types_keep_their_wire_numbers() -> None:
    assert {number: cls.__name__ for number, cls in FRAME_TYPES.items()} == {
        1: "Hello",
        2: "Welcome",
        3: "Send",
        4: "SendMany",
        5: "Receive",
        6: "Cancel",
        7: "Ack",
        8: "GroupAdd",
        9: "GroupDiscard",
        10: "GroupSend",
        11: "Flush",
        12: "Ping",
        13: "ReturnRoom",
        20: "Ok",
        21: "Error",
        22: "Deliver",
        23: "Cancelled",
        24: "Push",
        25: "Pong",
        26: "Flushed",
        27: "Confirm",
    }


def test_error_codes_keep_their_wire_numbers() -> None:
    assert {code.name: code.value for code in ErrorCode} == {
        "MALFORMED_FRAME": 1,
        "UNKNOWN_FRAME": 2,
        "FRAME_TOO_LARGE": 3,
        "HANDSHAKE": 4,
        "UNSUPPORTED_VERSION": 5,
        "AUTH_FAILED": 6,
        "INVALID_NAME": 7,
        "CHANNEL_FULL": 8,
        "MESSAGE_TOO_LARGE": 9,
        "BACKEND_UNAVAILABLE": 10,
        "SHUTTING_DOWN": 11,
        "DUPLICATE_REQUEST": 12,
        "INTERNAL": 13,
        "OVER_LIMIT": 14,
        "FORBIDDEN": 15,
        "CLIENT_ID_TAKEN": 16,
        "TOO_MANY_CONNECTIONS": 17,
        "NO_ROOM": 18,
    }


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (MalformedFrame, ErrorCode.MALFORMED_FRAME),
        (UnknownFrame, ErrorCode.UNKNOWN_FRAME),
        (FrameTooLarge, ErrorCode.FRAME_TOO_LARGE),
        (HandshakeError, ErrorCode.HANDSHAKE),
        (FrameOverLimit, ErrorCode.OVER_LIMIT),
    ],
)
def test_every_protocol_error_carries_its_code(error: type[ProtocolError], code: ErrorCode) -> None:
    raised = error("message")

    assert isinstance(raised, ProtocolError)
    assert raised.code is code
    assert str(raised) == "message"


def test_protocol_error_code_can_be_given_per_instance() -> None:
    assert ProtocolError("bad token", ErrorCode.AUTH_FAILED).code is ErrorCode.AUTH_FAILED
    assert HandshakeError("old", ErrorCode.UNSUPPORTED_VERSION).code is (
        ErrorCode.UNSUPPORTED_VERSION
    )
    # The class default is untouched by an instance's override.
    assert HandshakeError("x").code is ErrorCode.HANDSHAKE


def test_frames_are_frozen_and_slotted() -> None:
    frame = Send(1, "chat", b"x")

    with pytest.raises(dataclasses.FrozenInstanceError):
        frame.channel = "other"  # type: ignore[misc]
    assert not hasattr(frame, "__dict__")


def test_frames_compare_and_hash_by_value() -> None:
    assert Send(1, "chat", b"x") == Send(1, "chat", b"x")
    assert Send(1, "chat", b"x") != Send(2, "chat", b"x")
    assert len({Ping(1), Ping(1), Ping(2)}) == 2


def test_ok_results_default_to_nothing() -> None:
    assert Ok(3) == Ok(3, 0, ())


def test_request_id_accepts_the_full_unsigned_range() -> None:
    assert Ping(0).request_id == 0
    assert Ping(MAX_REQUEST_ID).request_id == MAX_REQUEST_ID


@pytest.mark.parametrize("request_id", [-1, MAX_REQUEST_ID + 1])
def test_request_id_out_of_range_is_refused(request_id: int) -> None:
    with pytest.raises(MalformedFrame):
        Ping(request_id)


BOOL_WHERE_INT: dict[str, Callable[[], object]] = {
    "request id": lambda: Ping(True),
    "send request id": lambda: Send(False, "c", b""),
    "hello version": lambda: _hello(version=True),
    "hello capacity": lambda: _hello(capacity=True),
    "hello expiry": lambda: _hello(expiry_s=True),
    "hello channel capacity": lambda: _hello(channel_capacity=(("a", True),)),
    "welcome max bytes": lambda: Welcome(1, "ab", True, "v"),
    "ok count": lambda: Ok(1, True),
    "ok rejected": lambda: Ok(1, 0, (False,)),
    "ack count": lambda: Ack((("a", True),)),
    "error code": lambda: Error(1, True, "m"),
    "deliver ttl": lambda: Deliver(1, "c", b"", True),
    "push ttl": lambda: Push(("c",), b"", False),
}


@pytest.mark.parametrize("build", BOOL_WHERE_INT.values(), ids=BOOL_WHERE_INT.keys())
def test_bool_where_an_int_belongs_is_refused(build: Callable[[], object]) -> None:
    with pytest.raises(MalformedFrame) as caught:
        build()
    assert caught.value.code is ErrorCode.MALFORMED_FRAME


WRONG_TYPES: dict[str, Callable[[], object]] = {
    "channel as bytes": lambda: Send(1, b"chat", b"x"),  # type: ignore[arg-type]
    "payload as str": lambda: Send(1, "chat", "x"),  # type: ignore[arg-type]
    "payload as bytearray": lambda: Send(1, "chat", bytearray(b"x")),  # type: ignore[arg-type]
    "items as list": lambda: SendMany(1, [("a", b"x")]),  # type: ignore[arg-type]
    "item of three": lambda: SendMany(1, (("a", b"x", b"y"),)),  # type: ignore[arg-type]
    "item as list": lambda: SendMany(1, (["a", b"x"],)),  # type: ignore[arg-type]
    "channels as list": lambda: Push(["a"], b"x", 1),  # type: ignore[arg-type]
    "channel of int": lambda: Push(("a", 1), b"x", 1),  # type: ignore[arg-type]
    "ack count negative": lambda: Ack((("a", -1),)),
    "rejected as list": lambda: Ok(1, 0, [1]),  # type: ignore[arg-type]
    "rejected negative": lambda: Ok(1, 0, (-1,)),
    "error code as str": lambda: Error(1, "4", "m"),  # type: ignore[arg-type]
    "hello capacity zero": lambda: _hello(capacity=0),
    "hello token as None": lambda: _hello(token=None),
    "hello expiry as str": lambda: _hello(expiry_s="60"),
    "hello expiry negative": lambda: _hello(group_expiry_s=-1),
    "hello expiry nan": lambda: _hello(expiry_s=math.nan),
    "hello expiry infinite": lambda: _hello(group_expiry_s=math.inf),
    "welcome max bytes zero": lambda: Welcome(1, "ab", 0, "v"),
}


@pytest.mark.parametrize("build", WRONG_TYPES.values(), ids=WRONG_TYPES.keys())
def test_constructor_refuses_a_wrong_field(build: Callable[[], object]) -> None:
    with pytest.raises(MalformedFrame):
        build()


def test_hello_expiry_may_be_int_or_float() -> None:
    assert _hello(expiry_s=0, group_expiry_s=0.5).expiry_s == 0
    assert _hello(expiry_s=60.25).expiry_s == 60.25


def test_error_frame_takes_an_error_code_and_stores_a_plain_int() -> None:
    frame = Error(0, ErrorCode.SHUTTING_DOWN, "bye")

    assert type(frame.code) is int
    assert frame == Error(0, 11, "bye")
    assert frame.error_code is ErrorCode.SHUTTING_DOWN


def test_error_frame_with_a_code_from_a_newer_version_has_no_error_code() -> None:
    assert Error(1, 999, "new").error_code is None


def test_frame_from_wire_builds_the_frame_of_the_type_number() -> None:
    assert frame_from_wire((Send.TYPE, 1, "chat", b"x")) == Send(1, "chat", b"x")


@pytest.mark.parametrize("items", [(), [Ping.TYPE, 1], None, b"\x0c\x01", {Ping.TYPE: 1}])
def test_frame_from_wire_refuses_anything_but_a_non_empty_tuple(items: object) -> None:
    with pytest.raises(MalformedFrame):
        frame_from_wire(items)
