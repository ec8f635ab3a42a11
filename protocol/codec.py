"""Length-prefixed msgpack framing: bytes in, frames out, and frames to bytes.

A frame on the wire is a 4-byte big-endian body length, then the msgpack body (an
array: frame type number, then fields). The decoder is sans-IO: ``receive_data``
stores bytes, ``next_frame`` returns one complete frame, ``None`` when more bytes
are needed, or raises ``ProtocolError``; it never raises anything else.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from .errors import FrameTooLarge, MalformedFrame, ProtocolError
from .frames import Frame, frame_from_wire
from .limits import DEFAULT_MAX_MESSAGE_BYTES, max_request_frame_bytes

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "HEADER_BYTES",
    "FrameDecoder",
    "encode_frame",
    "encode_frames",
]

#: Bytes of the length prefix before every frame body.
HEADER_BYTES = 4
#: What a daemon with the default message limit reads (see ``limits``).
DEFAULT_MAX_FRAME_BYTES = max_request_frame_bytes(DEFAULT_MAX_MESSAGE_BYTES)

_header = struct.Struct(">I")
_pack_header = _header.pack
_unpack_header = _header.unpack_from


def _to_wire(frame: Frame) -> list[Any]:
    # Field order is declaration order; slots give it without building a dict.
    return [frame.TYPE, *(getattr(frame, name) for name in frame.__slots__)]


def encode_frame(frame: Frame) -> bytes:
    """Serialize one frame, length prefix included."""
    body: bytes = msgpack.packb(_to_wire(frame), use_bin_type=True)
    return _pack_header(len(body)) + body


def encode_frames(frames: list[Frame]) -> bytes:
    """Serialize several frames into one buffer, for a single write."""
    return b"".join(encode_frame(frame) for frame in frames)


class FrameDecoder:
    """Turns a byte stream into frames, refusing any frame over ``max_frame_bytes``."""

    __slots__ = ("_buffer", "max_frame_bytes")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()

    def receive_data(self, data: bytes) -> None:
        """Store bytes read from the peer. Does nothing else."""
        self._buffer += data

    def unread(self) -> bytes:
        """Bytes received but not yet returned as frames (to hand them to another decoder)."""
        return bytes(self._buffer)

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buffer)

    def next_frame(self) -> Frame | None:
        """Return the next complete frame, or None if more bytes are needed.

        Raises ``FrameTooLarge`` as soon as a too-long prefix arrives (before its body
        is buffered) and ``MalformedFrame``/``UnknownFrame`` for a bad body.
        """
        buffer = self._buffer
        if len(buffer) < HEADER_BYTES:
            return None
        (length,) = _unpack_header(buffer)
        if length > self.max_frame_bytes:
            raise FrameTooLarge(
                f"frame of {length} bytes is over the limit of {self.max_frame_bytes}"
            )
        end = HEADER_BYTES + length
        if len(buffer) < end:
            return None
        # Decoded in place: a copy of the body first would cost a large frame (8 MiB)
        # two more copies, milliseconds each of the daemon's loop.
        with memoryview(buffer) as view, view[HEADER_BYTES:end] as body:
            try:
                return _decode_body(body)
            finally:
                body.release()
                view.release()
                del buffer[:end]


def _decode_body(body: bytes | memoryview) -> Frame:
    try:
        items = msgpack.unpackb(body, use_list=False, raw=False, strict_map_key=True)
    except Exception as exc:
        # msgpack raises several unrelated types (ExtraData, ValueError, FormatError,
        # StackError, UnicodeDecodeError...); all mean the same thing to us.
        raise MalformedFrame(f"body is not valid msgpack: {exc}") from exc
    try:
        return frame_from_wire(items)
    except ProtocolError:
        raise
    except Exception as exc:
        # A hostile body could still trip a comparison in validation (e.g. a nested
        # type where a number belongs); that is a malformed frame, not our crash.
        raise MalformedFrame(f"invalid frame: {exc}") from exc
