"""The handshake table: HELLO first and once for the daemon, WELCOME or ERROR for the client."""

from __future__ import annotations

from dataclasses import fields

import pytest

from protocol import (
    FRAME_TYPES,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    Error,
    ErrorCode,
    Frame,
    Handshake,
    HandshakeError,
    Hello,
    Ping,
    Push,
    Role,
    Send,
    Welcome,
)
from protocol.frames import frame_from_wire
from protocol.handshake import State

# A valid value per field annotation, to build one frame of every type.
_EXAMPLE_VALUES: dict[str, object] = {
    "int": 1,
    "str": "x",
    "bytes": b"x",
    "bool": True,
    "float": 1.0,
    "tuple[str, ...]": ("x",),
    "tuple[int, ...]": (1,),
    "tuple[tuple[str, int], ...]": (("x", 1),),
    "tuple[tuple[str, bytes], ...]": (("x", b"x"),),
    "tuple[tuple[str, str], ...]": (("x", "1.1"),),
}


def _example(cls: type[Frame]) -> Frame:
    return frame_from_wire((cls.TYPE, *(_EXAMPLE_VALUES[str(f.type)] for f in fields(cls))))


HELLO = Hello(PROTOCOL_VERSION, "token", "", "site", 100, 60, 86400)
WELCOME = Welcome(PROTOCOL_VERSION, "ab12", 1024, "channels-broker")
ERROR = Error(0, ErrorCode.AUTH_FAILED, "bad token")
NOT_HELLO = [_example(cls) for cls in FRAME_TYPES.values() if cls is not Hello]
NOT_WELCOME_OR_ERROR = [
    _example(cls) for cls in FRAME_TYPES.values() if cls not in (Welcome, Error)
]


def _name(frame: Frame) -> str:
    return type(frame).__name__


def _daemon_after_hello() -> Handshake:
    handshake = Handshake(Role.DAEMON)
    handshake.receive(HELLO)
    return handshake


def test_protocol_version_is_supported() -> None:
    assert PROTOCOL_VERSION in SUPPORTED_VERSIONS


def test_daemon_accepts_hello_first() -> None:
    handshake = Handshake(Role.DAEMON)

    handshake.receive(HELLO)
    assert handshake.state is State.READY


@pytest.mark.parametrize("frame", NOT_HELLO, ids=_name)
def test_daemon_refuses_anything_but_hello_first(frame: Frame) -> None:
    handshake = Handshake(Role.DAEMON)

    with pytest.raises(HandshakeError) as caught:
        handshake.receive(frame)
    assert caught.value.code is ErrorCode.HANDSHAKE


def test_refused_frame_leaves_the_state_unchanged() -> None:
    handshake = Handshake(Role.DAEMON)
    with pytest.raises(HandshakeError):
        handshake.receive(Ping(1))

    assert handshake.state is State.AWAIT_HELLO
    handshake.receive(HELLO)
    handshake.receive(Ping(1))


def test_daemon_refuses_a_second_hello() -> None:
    handshake = _daemon_after_hello()

    with pytest.raises(HandshakeError) as caught:
        handshake.receive(HELLO)
    assert caught.value.code is ErrorCode.HANDSHAKE


def test_daemon_refuses_welcome_from_a_client() -> None:
    with pytest.raises(HandshakeError):
        _daemon_after_hello().receive(WELCOME)


@pytest.mark.parametrize("frame", [Send(1, "chat", b"x"), Ping(2), ERROR], ids=_name)
def test_daemon_after_hello_lets_requests_through(frame: Frame) -> None:
    handshake = _daemon_after_hello()

    handshake.receive(frame)
    handshake.receive(frame)
    assert handshake.state is State.READY


def test_client_becomes_ready_on_welcome() -> None:
    handshake = Handshake(Role.CLIENT)

    handshake.receive(WELCOME)
    assert handshake.state is State.READY
    handshake.receive(Push(("site.ab12!x",), b"m", 1000))
    assert handshake.state is State.READY


def test_client_is_closed_by_an_error_instead_of_welcome() -> None:
    handshake = Handshake(Role.CLIENT)

    handshake.receive(ERROR)
    assert handshake.state is State.CLOSED


@pytest.mark.parametrize("frame", [WELCOME, ERROR, Ping(1)], ids=_name)
def test_closed_client_refuses_every_frame(frame: Frame) -> None:
    handshake = Handshake(Role.CLIENT)
    handshake.receive(ERROR)

    with pytest.raises(HandshakeError):
        handshake.receive(frame)


@pytest.mark.parametrize("frame", NOT_WELCOME_OR_ERROR, ids=_name)
def test_client_refuses_anything_but_welcome_or_error_first(frame: Frame) -> None:
    handshake = Handshake(Role.CLIENT)

    with pytest.raises(HandshakeError) as caught:
        handshake.receive(frame)
    assert caught.value.code is ErrorCode.HANDSHAKE
    assert handshake.state is State.AWAIT_WELCOME


@pytest.mark.parametrize("frame", [WELCOME, HELLO], ids=_name)
def test_ready_client_refuses_handshake_frames(frame: Frame) -> None:
    handshake = Handshake(Role.CLIENT)
    handshake.receive(WELCOME)

    with pytest.raises(HandshakeError):
        handshake.receive(frame)


def test_ready_client_takes_a_request_error() -> None:
    handshake = Handshake(Role.CLIENT)
    handshake.receive(WELCOME)

    handshake.receive(Error(7, ErrorCode.CHANNEL_FULL, "full"))
    assert handshake.state is State.READY
