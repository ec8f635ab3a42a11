"""Error codes carried on the wire and the exceptions that carry them."""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "ErrorCode",
    "FrameOverLimit",
    "FrameTooLarge",
    "HandshakeError",
    "MalformedFrame",
    "ProtocolError",
    "UnknownFrame",
]


class ErrorCode(IntEnum):
    """Why a request or a connection failed; stable numbers, shared by both ends."""

    #: The bytes were not a valid frame (bad msgpack, wrong field types or count).
    MALFORMED_FRAME = 1
    #: The frame type number is not one this protocol version knows.
    UNKNOWN_FRAME = 2
    #: The declared frame length is over the receiver's limit.
    FRAME_TOO_LARGE = 3
    #: A frame arrived out of order (anything before HELLO, a second HELLO).
    HANDSHAKE = 4
    #: The client speaks a protocol version the daemon does not.
    UNSUPPORTED_VERSION = 5
    #: The token in HELLO did not match the daemon's.
    AUTH_FAILED = 6
    #: A channel or group name is not valid.
    INVALID_NAME = 7
    #: The channel already holds its capacity of waiting messages.
    CHANNEL_FULL = 8
    #: The message is over the daemon's size limit.
    MESSAGE_TOO_LARGE = 9
    #: The storage backend failed or is unreachable; the request may be retried.
    BACKEND_UNAVAILABLE = 10
    #: The daemon is shutting down and takes no new requests.
    SHUTTING_DOWN = 11
    #: A request id is already in use by a pending request on this connection.
    DUPLICATE_REQUEST = 12
    #: An unexpected fault inside the daemon.
    INTERNAL = 13
    #: A value or a count is over a bound the daemon sets (capacity, expiry, items in
    #: one frame, pending pulls, patterns...); the message names the bound and its flag.
    OVER_LIMIT = 14
    #: The token may not do this: a namespace it is not bound to, another client's channel.
    FORBIDDEN = 15
    #: HELLO named a client id without the secret it was made from (``protocol.identity``):
    #: only its owner may attach to it, whether or not a connection holds it now.
    CLIENT_ID_TAKEN = 16
    #: The daemon, or this peer address, has as many connections as it allows.
    TOO_MANY_CONNECTIONS = 17
    #: A windowed SEND (no request id) on a channel where the connection holds no send
    #: room: the client broke the flow-control rules (docs/flow.md).
    NO_ROOM = 18


class ProtocolError(Exception):
    """A peer broke the protocol. ``code`` says how; the connection should close."""

    code: ErrorCode = ErrorCode.MALFORMED_FRAME

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class MalformedFrame(ProtocolError):
    """Bytes that do not decode to a valid frame."""

    code = ErrorCode.MALFORMED_FRAME


class UnknownFrame(ProtocolError):
    """A frame type number this version does not know."""

    code = ErrorCode.UNKNOWN_FRAME


class FrameTooLarge(ProtocolError):
    """A frame whose declared length is over the limit."""

    code = ErrorCode.FRAME_TOO_LARGE


class FrameOverLimit(ProtocolError):
    """A frame with more items than the receiver reads in one frame."""

    code = ErrorCode.OVER_LIMIT


class HandshakeError(ProtocolError):
    """A frame that the handshake state does not allow here."""

    code = ErrorCode.HANDSHAKE
