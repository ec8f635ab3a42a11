"""One connection's bounds away from its message path: admission, the deadlines of HELLO
and of a started frame, turns at reading, pending pulls and group memberships (counted
in ``memberships``), the reader that stays behind.

``Connection`` keeps inline what every frame pays for (the input and output byte
counts, a couple of integer operations per frame, and the size of a push pass); this
module holds what runs once per connection or only when a bound is hit, so that the
message path stays in the modules docs/architecture.md lists.

Bytes in and out. Reading pauses once the frames decoded and not yet handled cost
``--max-input-bytes`` (as objects: ``FRAME_COST_BYTES`` each, ``ITEM_COST_BYTES`` per
SEND_MANY or ACK item, beyond their wire bytes), until the worker has handled them all.
The worker starts a pass only while the transport takes more (``pause_writing``), and
a pass writes a bounded amount: up to ``OUTPUT_HIGH_WATER`` of answers, as much of
pulls, about ``PUSH_PASS_BYTES`` of pushes (a pass takes as many messages as fit that
at the sizes the last pass pushed). So a reader that does not read leaves about one
pass unread; one that leaves more than ``--max-output-bytes`` anyway (a pass of far
larger messages than the last, many FLUSHED notices) is closed at once, dropping it.

Reads take turns. A connection that has read ``READ_TURN_BYTES`` of frames not yet
whole stops reading until the event loop's next turn, so the others read in between.
libuv (under uvloop) reads a ready socket up to 32 times in a row, 256 KiB each: a
client streaming 8 MiB frames had a whole frame copied three times and decoded in one
turn, and another client's PING waited 35 ms on a quiet machine (60 ms on a busy one);
with turns, 10 ms.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import deque
from collections.abc import Callable, Sized
from itertools import islice
from operator import attrgetter
from typing import Any, Protocol

from broker.config import Config
from protocol import (
    LARGE_FIELD_BYTES,
    Ack,
    Error,
    ErrorCode,
    Flushed,
    Frame,
    FrameDecoder,
    Handshake,
    ProtocolError,
    SendMany,
    encode_frame,
)

from . import strangers
from .bounds import Bounds
from .held import Held
from .memberships import Memberships

__all__ = [
    "BATCH_ITEMS",
    "FRAME_COST_BYTES",
    "ITEM_COST_BYTES",
    "PARTIAL_FRAME_TIMEOUT_S",
    "PASS_FRAMES",
    "PUSH_PASS_BYTES",
    "PUSH_PASS_MESSAGES",
    "READ_TURN_BYTES",
    "WORK_SLICE_S",
    "Guard",
    "Guarded",
    "first_of",
    "write_apart",
]

log = logging.getLogger("channels_broker.connection")

#: What a decoded request costs beyond its wire bytes, as ``--max-input-bytes`` counts
#: it: the frame object and its strings (measured 65-190 bytes, CPython 3.11).
FRAME_COST_BYTES = 256
#: What each SEND_MANY or ACK item costs beyond its wire bytes: its tuple and strings
#: (measured 55-130 bytes for items of 4-9 wire bytes).
ITEM_COST_BYTES = 128
#: Bytes of PUSH frames a pass aims at (or a quarter of --max-output-bytes, if less):
#: a pass (one storage call, one write) still carries thousands of small messages.
PUSH_PASS_BYTES = 4 * 1024 * 1024
#: Most messages one push pass takes, however small, and most requests one pass
#: answers: what bounds how long a pass holds the loop (a few milliseconds).
PUSH_PASS_MESSAGES = 4096
PASS_FRAMES = 256
#: Bytes of started frames a connection reads in one turn of the event loop.
READ_TURN_BYTES = 512 * 1024
#: Seconds of requests one pass handles before the other connections have their turn:
#: a burst of requests that each cost a millisecond (a name matched by a client's slow
#: patterns, a message of megabytes) must not hold another client's PING for long.
WORK_SLICE_S = 0.005
#: asyncio's default high-water mark of a transport's write buffer.
_ASYNCIO_HIGH_WATER = 64 * 1024
#: The requests that carry items, and how to get them (C getters: ``Connection`` calls
#: them for every such frame, and they add no module to the message path).
BATCH_ITEMS: dict[type[Frame], Callable[[Any], Sized]] = {
    SendMany: attrgetter("items"),
    Ack: attrgetter("counts"),
}

#: Seconds a started frame may take to arrive whole before the connection is failed.
PARTIAL_FRAME_TIMEOUT_S = 30.0


class Guarded(Protocol):
    """What the guard needs of its connection."""

    peer: str
    closing: bool
    handshake: Handshake
    decoder: FrameDecoder
    inbox: deque[Frame]
    transport: asyncio.Transport | None
    reading_paused: bool  # by the connection itself, until its worker resumes it

    held: Held

    def write(self, frame: Frame) -> None: ...

    def flush(self) -> None: ...

    def fail(self, request_id: int, code: ErrorCode, message: str) -> None: ...

    def fatal(self, code: ErrorCode, message: str) -> None: ...


class Guard:
    """The bounds of one connection that cost nothing per frame."""

    __slots__ = (
        "_turn_bytes",
        "_turn_waiting",
        "_bounds",
        "_config",
        "_connection",
        "_hello_timer",
        "_host",
        "_partial_timer",
        "admitted",
        "max_input_bytes",
        "max_output_bytes",
        "memberships",
        "pass_bytes",
        "watching_partial",
    )

    def __init__(self, connection: Guarded, bounds: Bounds, config: Config) -> None:
        # A proxy: no cycle through us keeps a closed connection's buffers until a GC.
        self._connection: Guarded = weakref.proxy(connection)
        self._bounds = bounds
        self._config = config
        self.max_input_bytes = config.max_input_bytes
        self.max_output_bytes = config.max_output_bytes
        #: Bytes of pushes one pass aims at (``PUSH_PASS_BYTES``).
        self.pass_bytes = min(PUSH_PASS_BYTES, config.max_output_bytes // 4)
        self._host: str | None = None
        self._hello_timer: asyncio.TimerHandle | None = None
        self._partial_timer: asyncio.TimerHandle | None = None
        #: True while a started frame has a deadline (``watch_partial_frame``).
        self.watching_partial = False
        #: Bytes of started frames read in this turn (``READ_TURN_BYTES``).
        self._turn_bytes = 0
        self._turn_waiting = False
        #: True once ``admit`` counted the connection (``close`` gives it back).
        self.admitted = False
        self.memberships = Memberships(config.max_memberships)

    def admit(self, transport: asyncio.Transport, hello_timeout_s: float) -> bool:
        """Count the new connection and start its HELLO deadline; or, over a connection
        bound, write TOO_MANY_CONNECTIONS, close and return False (nothing is read)."""
        peer = transport.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) else None
        refusal = self._bounds.admit(host)
        if refusal is not None:
            self._bounds.metrics.count_error(ErrorCode.TOO_MANY_CONNECTIONS)
            error = Error(0, int(ErrorCode.TOO_MANY_CONNECTIONS), refusal)
            self._connection.closing = True
            transport.write(encode_frame(error))
            transport.close()
            return False
        self._host, self.admitted = host, True
        if self.max_output_bytes < _ASYNCIO_HIGH_WATER:
            # The output bound is checked once writing pauses: it must pause by then.
            transport.set_write_buffer_limits(high=self.max_output_bytes)
        loop = asyncio.get_running_loop()
        self._hello_timer = loop.call_later(hello_timeout_s, self._hello_expired, hello_timeout_s)
        return True

    def close(self) -> None:
        """The connection is gone: give back its place, stop its deadlines."""
        for timer in (self._hello_timer, self._partial_timer):
            if timer is not None:
                timer.cancel()
        self._hello_timer = self._partial_timer = None
        self.watching_partial = False
        if self.admitted:
            self.admitted = False
            self._bounds.release(self._host)

    def _hello_expired(self, timeout_s: float) -> None:
        self._hello_timer = None
        connection = self._connection
        if connection.handshake.is_ready or connection.closing:
            return
        message = f"no HELLO within {timeout_s:g} s (--hello-timeout)"
        self._bounds.hit(
            "hello-timeout", f"closing the connection from {connection.peer}: {message}"
        )
        connection.fatal(ErrorCode.OVER_LIMIT, message)

    def watch_partial_frame(self, read_bytes: int) -> None:
        """Give a started frame ``PARTIAL_FRAME_TIMEOUT_S`` to arrive whole (after a read
        of ``read_bytes``), and let the others read once this one read a turn's worth.

        A peer that sends half a frame and then nothing would otherwise hold its
        connection (and the bytes) forever without any error being logged.
        """
        self._turn_bytes += read_bytes
        if self._turn_bytes >= READ_TURN_BYTES:
            self._wait_a_turn()
        if self._partial_timer is not None:
            self._partial_timer.cancel()
            self._partial_timer = None
        connection = self._connection
        self.watching_partial = bool(connection.decoder.buffered_bytes) and not connection.closing
        if self.watching_partial:
            loop = asyncio.get_running_loop()
            self._partial_timer = loop.call_later(PARTIAL_FRAME_TIMEOUT_S, self._partial_expired)

    def _wait_a_turn(self) -> None:
        transport = self._connection.transport
        if not self._turn_waiting and transport is not None and not transport.is_closing():
            self._turn_waiting = True
            transport.pause_reading()
            asyncio.get_running_loop().call_soon(self._next_turn, transport)

    def _next_turn(self, transport: asyncio.Transport) -> None:
        self._turn_bytes, self._turn_waiting = 0, False
        connection = self._connection
        if not (transport.is_closing() or connection.closing or connection.reading_paused):
            transport.resume_reading()  # unless the connection holds reading for itself

    def _partial_expired(self) -> None:
        self._partial_timer, self.watching_partial = None, False
        connection = self._connection
        message = f"incomplete frame: {connection.decoder.buffered_bytes} bytes, then silence"
        log.warning("protocol error from %s: %s", connection.peer, message)
        connection.fatal(ErrorCode.MALFORMED_FRAME, message)

    def eof_received(self) -> None:
        """The peer closed its side: say so if it left a frame unfinished."""
        connection = self._connection
        count = connection.decoder.buffered_bytes
        if count and not connection.closing:
            log.warning(
                "protocol error from %s: connection closed inside a frame (%d bytes)",
                connection.peer,
                count,
            )

    def protocol_error(self, error: ProtocolError) -> None:
        """The peer sent what the decoder refuses: log it, answer with its ERROR, close.
        A peer that opened with HTTP or TLS instead of HELLO is told so in words."""
        connection = self._connection
        kind = None
        if not connection.handshake.is_ready:
            kind = strangers.kind_of(connection.decoder.unread()[:4])
        if kind is not None:
            self._turn_away(kind, error)
            return
        log.warning("protocol error from %s: %s (%s)", connection.peer, error, error.code.name)
        if error.code is ErrorCode.OVER_LIMIT:
            self._bounds.metrics.count_limit("max-batch")
        connection.fatal(error.code, str(error))

    def _turn_away(self, kind: str, error: ProtocolError) -> None:
        """Log (a line a minute) what spoke; answer an HTTP client in HTTP and close. A
        TLS client still gets the ERROR frame: its TLS library reads those bytes as a
        record of no TLS version, which a layer reports as a daemon without TLS."""
        connection, config = self._connection, self._config
        message = strangers.what_to_say(kind, connection.peer, config)
        self._bounds.notice(kind, message, strangers.STRANGER_LOG_INTERVAL_S, log)
        if kind == "TLS":
            connection.fatal(error.code, "this port speaks plain TCP, not TLS")
            return
        connection.closing = True
        connection.inbox.clear()
        transport = connection.transport
        if transport is not None:
            transport.write(strangers.http_answer(config))
            transport.close()

    def left_out(self, channel: str) -> None:
        """A message came for one more of the client's own channels while it holds messages
        of ``--max-channels`` of them: storage keeps it until the client reads some."""
        connection = self._connection
        connection.held.left_out = True
        self._bounds.hit(
            "max-channels",
            f"{connection.peer} holds messages of {connection.held.limit} of its channels"
            f" (--max-channels): those of {channel} wait in storage until it reads some",
        )

    def flushed(self) -> None:
        """The namespace was flushed: the backend dropped the held counts and memberships
        along with the messages, and so do we."""
        connection = self._connection
        connection.held.clear()
        self.memberships.clear()
        connection.write(Flushed())
        # Out now, before the flusher's OK: a client that sees the OK and then asks
        # another connection must find that connection's buffer already cleared.
        connection.flush()

    def over_limit(self, request_id: int, flag: str, message: str) -> None:
        """Refuse one request past the bound ``flag``: OVER_LIMIT, counted and logged."""
        connection = self._connection
        message = f"over the limit of --{flag}: {message}"
        self._bounds.hit(flag, f"refused a request from {connection.peer}: {message}")
        connection.fail(request_id, ErrorCode.OVER_LIMIT, message)

    def check_output(self, transport: asyncio.Transport) -> None:
        """Writing paused: if the peer left more than ``max_output_bytes`` unread, close
        at once, dropping them (a reader that is not reading would not read an ERROR)."""
        unread = transport.get_write_buffer_size()
        if unread <= self.max_output_bytes:
            return
        connection = self._connection
        self._bounds.hit(
            "max-output-bytes",
            f"closing the connection from {connection.peer}: it left {unread} bytes unread, "
            f"over the limit of {self.max_output_bytes} (--max-output-bytes)",
        )
        connection.closing = True
        connection.inbox.clear()
        transport.abort()


def first_of(ready: dict[str, None], count: int) -> dict[str, None]:
    """Remove the first ``count`` channels from an insertion-ordered set and return them:
    a push pass with more ready channels than its budget serves those, the rest later."""
    first = dict.fromkeys(islice(ready, count))
    for channel in first:
        del ready[channel]
    return first


def write_apart(transport: asyncio.Transport, buffers: list[bytes]) -> None:
    """Write ``buffers``, joined, but each large one (a payload of megabytes: see
    ``protocol.encode_into``) on its own and as a view, so that asyncio copies of it only
    what the socket does not take at once, and the loop is not held copying it."""
    run: list[bytes] = []
    for data in buffers:
        if len(data) < LARGE_FIELD_BYTES:
            run.append(data)
            continue
        if run:
            transport.write(b"".join(run))
            run = []
        transport.write(memoryview(data))
    if run:
        transport.write(b"".join(run))
