"""Length-prefixed msgpack framing: bytes in, frames out, and frames to bytes.

A frame on the wire is a 4-byte big-endian body length, then the msgpack body (an
array: frame type number, then fields). The decoder is sans-IO: ``receive_data``
stores bytes, ``next_frame`` returns one complete frame, ``None`` when more bytes
are needed, or raises ``ProtocolError``; it never raises anything else.

A daemon also bounds the work of decoding one frame (``max_items``): 8 MiB of one-byte
msgpack objects take half a second to build. An array longer than ``max_items`` is
refused from its header; a body that could hold more objects than a frame of
``max_items`` pairs needs (or 64 K) is decoded counting them, and refused past them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import MISSING, fields
from operator import attrgetter
from typing import Any

import msgpack

from .errors import FrameOverLimit, FrameTooLarge, MalformedFrame, ProtocolError
from .frames import FRAME_TYPES, Ack, Deliver, Frame, Push, Send, frame_from_wire
from .limits import DEFAULT_MAX_MESSAGE_BYTES, max_request_frame_bytes

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "HEADER_BYTES",
    "SENDER_BYTES",
    "LARGE_FIELD_BYTES",
    "FrameDecoder",
    "FrameEncoder",
    "encode_channels",
    "encode_frame",
    "encode_frame_parts",
    "encode_frames",
    "split_message_id",
    "with_message_id",
    "encode_into",
    "packb",
]

HEADER_BYTES = 4  # the length prefix before every frame body
#: What a daemon with the default message limit reads (see ``limits``).
DEFAULT_MAX_FRAME_BYTES = max_request_frame_bytes(DEFAULT_MAX_MESSAGE_BYTES)

#: Objects per item of the longest array a frame carries (a pair: array, two fields),
#: and room for the frame's own fields: a bounded body holds no more.
_OBJECTS_PER_ITEM, _FIELD_OBJECTS = 3, 64
#: Objects any bounded body may hold (a few ms to build); a shorter body is not counted.
_UNCOUNTED_OBJECTS = 64 * 1024
#: Bodies from this size up are decoded from a view of the buffer (not copied).
_IN_PLACE_BYTES = 64 * 1024

#: A payload that starts with this byte carries its message id before the body: 0xC1
#: is the one byte msgpack never uses, and a Fernet token is base64 text, so neither
#: kind of body can start with it, and a payload without an id reads as before.
MESSAGE_ID_MARK = 0xC1
#: Random bytes naming the sending layer client: 96 bits, so two never meet.
SENDER_BYTES = 12
#: Bytes fields from this size up are parts of their own in ``encode_frame_parts`` (bin 32).
LARGE_FIELD_BYTES = 64 * 1024
_BIN32 = b"\xc6"
#: The frames a daemon writes with a payload (a tuple: ``isinstance`` is fastest with one).
_CARRIERS = (Push, Deliver)
_pack_array_header = msgpack.Packer().pack_array_header
#: A fan-out PUSH up to its channels: an array of its five fields, then its type.
_FANOUT_HEAD = _pack_array_header(5) + msgpack.packb(Push.TYPE)
#: A one-off packer's first buffer: msgpack's own 256 KiB is past the mmap threshold the
#: daemon pins (broker/ops/malloc.py), so each frame cost an mmap and a munmap (10 us).
PACK_BUFFER_BYTES = 4096

_header = struct.Struct(">I")
_message_id = struct.Struct(f">B{SENDER_BYTES}sQ")
_pack_message_id = _message_id.pack
_unpack_message_id = _message_id.unpack_from
_pack_header = _header.pack
_unpack_header = _header.unpack_from


def _wire_form(cls: type[Frame]) -> tuple[Callable[[Frame], tuple[Any, ...]], tuple[Any, ...]]:
    """How a frame type goes on the wire: a getter of its fields in declaration order
    (one C call for most types), and the defaults of its trailing optional fields, last
    first."""
    names = tuple(f.name for f in fields(cls))
    getter: Callable[[Frame], tuple[Any, ...]]
    if len(names) > 1:
        getter = attrgetter(*names)
    else:  # attrgetter of one name returns the value itself, not a tuple
        getter = lambda frame: tuple(getattr(frame, name) for name in names)  # noqa: E731
    tail = []
    for f in reversed(fields(cls)):
        if f.default is MISSING:
            break
        tail.append(f.default)
    return getter, tuple(tail)


#: Per frame type: its fields getter and trailing defaults (``_to_wire``).
_WIRE_FORMS = {cls: _wire_form(cls) for cls in FRAME_TYPES.values()}


def _to_wire(frame: Frame) -> list[Any]:
    """The frame as a msgpack array: type number, then fields, less the trailing fields
    that hold their default. A peer fills those in (``frame_from_wire``), and a peer of
    an earlier release, which knows fewer fields, still reads the frame while the fields
    it does not know are unused (a SEND without ``seq``, an OK without ``room``)."""
    getter, tail = _WIRE_FORMS[type(frame)]
    items = [frame.TYPE, *getter(frame)]
    for default in tail:
        if items[-1] != default:
            break
        items.pop()
    return items


def packb(value: Any) -> bytes:
    """``value`` as frames pack it, by a packer of its own (any thread may call)."""
    return msgpack.packb(value, use_bin_type=True, buf_size=PACK_BUFFER_BYTES)  # type: ignore[no-any-return]


def encode_frame(frame: Frame) -> bytes:
    """Serialize one frame, length prefix included."""
    return _pack_header(len(body := packb(_to_wire(frame)))) + body


def encode_frame_parts(frame: Frame) -> list[bytes]:
    """``encode_frame(frame)`` in parts whose concatenation it is, each bytes field of
    ``LARGE_FIELD_BYTES`` or more a part of its own, the object itself: packing copies a
    message of megabytes several times over (buffer doublings, to bytes, a prefix); these
    parts copy it once when joined, or never when written one by one."""
    parts: list[bytes] = []
    pending = [_pack_array_header(len(wire := _to_wire(frame)))]
    for value in wire:
        if type(value) is bytes and len(value) >= LARGE_FIELD_BYTES:
            pending.append(_BIN32 + _pack_header(len(value)))  # msgpack's bin 32
            parts += (b"".join(pending), value)
            pending = []
        else:
            pending.append(packb(value))
    parts.append(b"".join(pending))
    return [_pack_header(sum(map(len, parts))) + parts[0], *parts[1:]]


def encode_into(buffers: list[bytes], frame: Frame) -> int:
    """Append ``frame``'s encoding to ``buffers`` (joined once a write); return its size.
    A large payload's PUSH or DELIVER goes in parts (the join is the one copy of it)."""
    if isinstance(frame, _CARRIERS) and len(frame.payload) >= LARGE_FIELD_BYTES:
        parts = encode_frame_parts(frame)
        buffers += parts
        return sum(map(len, parts))
    data = encode_frame(frame)
    buffers.append(data)
    return len(data)


def encode_frames(frames: list[Frame]) -> bytes:
    """Serialize several frames into one buffer, for a single write."""
    return b"".join(encode_frame(frame) for frame in frames)


def with_message_id(sender: bytes, seq: int, body: bytes) -> bytes:
    """A message payload carrying its id: the sending client and its send number.

    Daemons and backends store and move payloads whole, so the id reaches the receiving
    layer with the message, whatever path it took, and that layer can tell a message
    it was handed before (a redelivery after a fault) from a new one.
    """
    return _pack_message_id(MESSAGE_ID_MARK, sender, seq) + body


def split_message_id(payload: bytes) -> tuple[bytes, int, bytes]:
    """(sender, seq, body) of a payload; (b"", 0, payload) for one without an id."""
    if payload[:1] != b"\xc1" or len(payload) < _message_id.size:
        return b"", 0, payload
    _, sender, seq = _unpack_message_id(payload)
    return sender, seq, payload[_message_id.size :]


class FrameEncoder:
    """Frames to bytes for one connection, with one msgpack packer kept (not shared
    between threads: each connection, on its one event loop, has its own).

    ``push_into``, ``send``, ``numbered`` and ``ack`` encode a PUSH, a SEND, a GROUP_SEND
    and an ACK from values their caller checked already, without building and checking
    a frame object (most of the cost of a pushed, a windowed or an acknowledged message),
    as ``encode_frame``.
    """

    __slots__ = ("_pack",)

    def __init__(self) -> None:
        self._pack = msgpack.Packer(use_bin_type=True).pack

    def frame(self, frame: Frame) -> bytes:
        body: bytes = self._pack(_to_wire(frame))
        return _pack_header(len(body)) + body

    def push_into(
        self, buffers: list[bytes], channels: list[str], payload: bytes, ttl_ms: int
    ) -> int:
        """Append a PUSH to ``buffers`` and return its size. A payload of
        ``LARGE_FIELD_BYTES`` or more goes as a part of its own, not copied into the
        packer's buffer (a burst of 8 MiB messages copied each one several times, and
        another client's PING waited for the copies)."""
        if len(payload) >= LARGE_FIELD_BYTES:
            return encode_into(buffers, Push(tuple(channels), payload, ttl_ms))
        body: bytes = self._pack([Push.TYPE, channels, payload, ttl_ms])
        buffers.append(_pack_header(len(body)) + body)
        return len(body) + HEADER_BYTES

    def fanout_into(
        self, buffers: list[bytes], channels: bytes, payload: bytes, ttl_ms: int, capacity: int
    ) -> int:
        """Append a PUSH of a group fan-out to ``buffers`` and return its size; ``channels``
        is the member list as ``encode_channels`` made it (kept ready by storage, so a
        group send does not pack each member's name again)."""
        head = _FANOUT_HEAD + channels
        tail = self._pack(ttl_ms) + self._pack(capacity)
        if len(payload) >= LARGE_FIELD_BYTES:  # a part of its own, as in ``push_into``
            head += _BIN32 + _pack_header(len(payload))
            size = len(head) + len(payload) + len(tail)
            buffers += (_pack_header(size) + head, payload, tail)
            return size + HEADER_BYTES
        body = head + self._pack(payload) + tail
        buffers.append(_pack_header(len(body)) + body)
        return len(body) + HEADER_BYTES

    def send(self, request_id: int, channel: str, payload: bytes, seq: int) -> bytes:
        return self.numbered(Send.TYPE, request_id, channel, payload, seq)

    def numbered(self, code: int, request_id: int, name: str, payload: bytes, seq: int) -> bytes:
        """A SEND or GROUP_SEND (``code``: its ``TYPE``); a ``seq`` of 0 is left off."""
        items = [code, request_id, name, payload, seq] if seq else [code, request_id, name, payload]
        body: bytes = self._pack(items)
        return _pack_header(len(body)) + body

    def ack(self, counts: tuple[tuple[str, int], ...]) -> bytes:
        """An ACK of (channel, count) pairs, one at least, and nothing else."""
        body: bytes = self._pack([Ack.TYPE, counts])
        return _pack_header(len(body)) + body


def encode_channels(channels: list[str]) -> bytes:
    """A list of channel names as a PUSH carries it (``FrameEncoder.fanout_into``)."""
    return packb(channels)


class FrameDecoder:
    """Turns a byte stream into frames, refusing any frame over ``max_frame_bytes``.

    With ``max_items``, it also refuses (``FrameOverLimit``) a frame with an array of
    more items, or with more objects than such a frame holds; ``limit_name`` (a flag)
    is named in the refusal. Without it (the layer, which reads PUSH frames listing a
    whole group's members), frames are bounded by bytes only.
    """

    __slots__ = ("_buffer", "_max_objects", "_start", "limit_name", "max_frame_bytes", "max_items")

    def __init__(
        self,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_items: int | None = None,
        limit_name: str = "",
    ) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.max_items = max_items
        self.limit_name = limit_name
        self._max_objects = max(
            _OBJECTS_PER_ITEM * (max_items or 0) + _FIELD_OBJECTS, _UNCOUNTED_OBJECTS
        )
        self._buffer = bytearray()
        # Where the next frame starts in the buffer: frames are read from there, and the
        # bytes before it dropped once per read, not once per frame (a read of a burst
        # holds many small frames, and each drop moves what follows).
        self._start = 0

    def receive_data(self, data: bytes | memoryview) -> None:
        """Store bytes read from the peer. Does nothing else."""
        if self._start:
            del self._buffer[: self._start]
            self._start = 0
        self._buffer += data

    def unread(self) -> bytes:
        """Bytes received but not yet returned as frames (to hand them to another decoder)."""
        return bytes(self._buffer[self._start :])

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buffer) - self._start

    def next_frame(self) -> Frame | None:
        """Return the next complete frame, or None if more bytes are needed.

        Raises ``FrameTooLarge`` as soon as a too-long prefix arrives (before its body
        is buffered) and ``MalformedFrame``/``UnknownFrame`` for a bad body.
        """
        buffer, start = self._buffer, self._start
        if len(buffer) - start < HEADER_BYTES:
            return None
        (length,) = _unpack_header(buffer, start)
        if length > self.max_frame_bytes:
            raise FrameTooLarge(
                f"frame of {length} bytes is over the limit of {self.max_frame_bytes}"
            )
        end = start + HEADER_BYTES + length
        if len(buffer) < end:
            return None
        if length >= _IN_PLACE_BYTES:
            return self._decode_in_place(start, end)
        body = bytes(buffer[start + HEADER_BYTES : end])
        if end == len(buffer):
            buffer.clear()
            self._start = 0
        else:
            self._start = end
        if self.max_items is None:
            return _decode_body(body)
        return self._decode_bounded(body)

    def _decode_in_place(self, start: int, end: int) -> Frame:
        # A large body is decoded from a view of the buffer: copying it first would cost
        # two copies (an 8 MiB frame: milliseconds each of the daemon's loop).
        buffer = self._buffer
        with memoryview(buffer) as view, view[start + HEADER_BYTES : end] as body:
            try:
                if self.max_items is None:
                    return _decode_body(body)
                return self._decode_bounded(body)
            finally:
                body.release()
                view.release()
                del buffer[:end]
                self._start = 0

    def _decode_bounded(self, body: bytes | memoryview) -> Frame:
        max_items = self.max_items
        assert max_items is not None
        # Each object takes a byte at least: a short body needs no counting.
        hook = None if len(body) <= self._max_objects else _ObjectCount(self._max_objects)
        try:
            items = msgpack.unpackb(
                body,
                use_list=False,
                raw=False,
                strict_map_key=True,
                max_array_len=max_items,
                max_map_len=0,  # no frame holds a map
                list_hook=hook,
            )
        except (ValueError, FrameOverLimit) as exc:
            if isinstance(exc, FrameOverLimit) or "max_array_len" in str(exc):
                where = f" ({self.limit_name})" if self.limit_name else ""
                message = f"a frame over the limit of {max_items} items per array{where}: {exc}"
                raise FrameOverLimit(message) from None
            raise MalformedFrame(f"body is not valid msgpack: {exc}") from exc
        except Exception as exc:
            raise MalformedFrame(f"body is not valid msgpack: {exc}") from exc
        return _frame(items)


class _ObjectCount:
    """msgpack's ``list_hook``: counts the items of each array as it completes."""

    __slots__ = ("left", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit

    def __call__(self, array: tuple[Any, ...]) -> tuple[Any, ...]:
        self.left -= len(array)
        if self.left < 0:
            raise FrameOverLimit(f"a frame of more than {self.limit} objects")
        return array


def _decode_body(body: bytes | memoryview) -> Frame:
    try:
        items = msgpack.unpackb(body, use_list=False, raw=False, strict_map_key=True)
    except Exception as exc:
        # msgpack raises several unrelated types (ExtraData, ValueError, FormatError,
        # StackError, UnicodeDecodeError...); all mean the same thing to us.
        raise MalformedFrame(f"body is not valid msgpack: {exc}") from exc
    return _frame(items)


def _frame(items: Any) -> Frame:
    try:
        return frame_from_wire(items)
    except ProtocolError:
        raise
    except Exception as exc:
        # A hostile body could still trip a comparison in validation (e.g. a nested
        # type where a number belongs); that is a malformed frame, not our crash.
        raise MalformedFrame(f"invalid frame: {exc}") from exc
