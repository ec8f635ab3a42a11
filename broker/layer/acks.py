"""Acknowledgements both ways: what a loop client owes the daemon for pushed messages
and group fan-outs kept, and which of its numbered group sends the daemon has not yet
confirmed.

Messages the daemon took from storage count against their channel until this client
acknowledges them, per channel, as ``receive`` takes them (``owe``). A group fan-out
(``Push.fanout_capacity``) was never stored: the client applies each member's capacity
to its own buffer as the fan-out arrives (``keep_fanout``), where those messages wait,
and tells the daemon in aggregate how many it kept and how many it dropped as full, so
the daemon's counts of accepted and dropped messages add up.

A ``group_send`` to a daemon that numbers them (WELCOME's version, docs/flow.md) is a
GROUP_SEND with a ``seq`` and no request id: it returns once written, and waits in
``Unconfirmed`` until a CONFIRM covers its seq. After a reconnect each is sent again as
a request with its seq, in seq order among the unsettled SENDs, and the daemon delivers
it at most once. Group sends raise nothing for full members, so nothing is lost by not
waiting for the answer; what can be refused (a name, a size) is checked before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sized
from typing import Protocol

from protocol import (
    MAX_ACK_PAIRS,
    MAX_UNCONFIRMED_GROUP_SENDS,
    Ack,
    Confirm,
    Error,
    ErrorCode,
    Frame,
    FrameEncoder,
    GroupSend,
    Ok,
    Push,
    encode_frame,
)

__all__ = [
    "FANOUT_REPORT_S",
    "MAX_UNCONFIRMED_GROUP_BYTES",
    "Acks",
    "Buffer",
    "Entry",
    "Inbox",
    "Numbering",
    "Unconfirmed",
    "Waiter",
    "wake_one",
]

log = logging.getLogger("channels_broker.layer")

#: How late the counts of fan-outs kept and dropped may reach the daemon when nothing
#: else is written: they only feed its metrics (nothing waits for them, unlike the
#: acknowledgements that free a channel's capacity), so a frame per PUSH would cost the
#: daemon a wake-up per connection and group_send for nothing.
FANOUT_REPORT_S = 0.5
#: Payload bytes of unconfirmed group sends kept for a resend; past it, they wait too.
MAX_UNCONFIRMED_GROUP_BYTES = 8 * 1024 * 1024

#: The clock of buffered messages' deadlines: the C call itself (asyncio's ``loop.time()``
#: is a Python method around it, read for every message).
_now = time.monotonic

#: A buffered message: (deadline, payload, held: acknowledged per channel).
Entry = tuple[float, bytes, bool]
#: A channel's buffered messages.
Buffer = deque[Entry]
#: A waiting receiver: woken with the message handed to it, or None to take one.
Waiter = asyncio.Future[Entry | None]


def wake_one(waiters: deque[Waiter] | None, entry: Entry | None = None) -> bool:
    """Wake the first receiver waiting in ``waiters``, if any, handing it ``entry``
    (None: it takes from the buffer), and take it out of them (its ``Inbox.wait`` need
    not look for it); True if one was woken."""
    while waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(entry)
            return True
    return False


class Acks:
    """Acknowledgements owed: per channel, and fan-outs kept and dropped."""

    __slots__ = ("_encoder", "_report", "counts", "fanout_dropped", "fanout_kept")

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.fanout_kept = self.fanout_dropped = 0
        self._report: asyncio.TimerHandle | None = None
        self._encoder = FrameEncoder()  # our own counts: no ``Ack`` built and checked

    def report_later(self, loop: asyncio.AbstractEventLoop, flush: Callable[[], None]) -> None:
        """Have ``flush`` tell the fan-out counts within ``FANOUT_REPORT_S``, unless a
        frame written meanwhile carries them."""
        if self._report is None:
            self._report = loop.call_later(FANOUT_REPORT_S, self._reported, flush)

    def _reported(self, flush: Callable[[], None]) -> None:
        self._report = None
        if self.fanout_kept or self.fanout_dropped:
            flush()

    def __bool__(self) -> bool:
        return bool(self.counts or self.fanout_kept or self.fanout_dropped)

    def owe(self, channel: str) -> None:
        """``receive`` took a held message of ``channel``."""
        self.counts[channel] = self.counts.get(channel, 0) + 1

    def keep_fanout(
        self,
        frame: Push,
        buffers: dict[str, Buffer],
        waiters: dict[str, deque[Waiter]],
        now: float,
    ) -> None:
        """Buffer a fan-out for each listed channel with room under its capacity, as the
        daemon would have stored it (expired messages take no room), and wake a receiver
        of it; drop it for the others. One entry, shared: it is the same message. A
        channel with nothing buffered and a receiver waiting hands it to that receiver
        (a big room's every member: no buffer made and emptied per message)."""
        capacity = frame.fanout_capacity
        entry = (now + frame.ttl_ms / 1000, frame.payload, False)
        kept = 0
        for channel in frame.channels:
            buffer = buffers.get(channel)
            if buffer is None:
                if channel in waiters and wake_one(waiters[channel], entry):
                    kept += 1
                    continue
                buffer = buffers[channel] = deque()
            elif len(buffer) >= capacity:
                while buffer and buffer[0][0] < now:  # expired: ``receive`` would skip it
                    buffer.popleft()
                if len(buffer) >= capacity:
                    continue
            buffer.append(entry)
            kept += 1
            if channel in waiters:
                wake_one(waiters[channel])
        self.fanout_kept += kept
        self.fanout_dropped += len(frame.channels) - kept

    def frames(self) -> list[bytes]:
        """The ACK frames that say everything owed (then nothing is), in ACKs of
        ``MAX_ACK_PAIRS`` pairs at most: a daemon allows that many items a frame."""
        pairs, ack = tuple(self.counts.items()), self._encoder.ack
        frames = [
            ack(pairs[start : start + MAX_ACK_PAIRS])
            for start in range(0, len(pairs), MAX_ACK_PAIRS)
        ]
        if self.fanout_kept or self.fanout_dropped:
            frames.append(encode_frame(Ack((), self.fanout_kept, self.fanout_dropped)))
        self.clear()
        return frames

    def clear(self) -> None:
        self.counts.clear()
        self.fanout_kept = self.fanout_dropped = 0

    def connection_lost(self, buffers: dict[str, Buffer]) -> None:
        """Owe the next connection nothing for what the lost one pushed: its daemon gave
        back what it did not hear acknowledged and pushes it again (docs/flow.md,
        *Pushed messages*), and the copies are what the next connection counts. The
        messages still buffered are kept, unheld: each reaches ``receive`` once, and
        its copy is dropped by its message id (and acknowledged then)."""
        self.counts.clear()
        for buffer in buffers.values():
            if any(held for _, _, held in buffer):
                kept = [(deadline, payload, False) for deadline, payload, _ in buffer]
                buffer.clear()
                buffer.extend(kept)


class Inbox:
    """What was pushed (or delivered for a cancelled pull) to one loop client's channels,
    per channel, until ``receive`` takes it, its waiting receivers, and what is owed
    for it (``Acks``)."""

    __slots__ = ("_loop", "_schedule_flush", "acks", "buffers", "waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop, schedule_flush: Callable[[], None]):
        self._loop = loop
        self._schedule_flush = schedule_flush  # writes what is owed with the next pass
        self.buffers: dict[str, Buffer] = {}
        self.waiters: dict[str, deque[Waiter]] = {}
        self.acks = Acks()

    def take(self, channel: str) -> bytes | None:
        """The next unexpired message of ``channel``, or None."""
        buffer = self.buffers.get(channel)
        if not buffer:  # the usual case of a receive that waits: no clock read
            if buffer is not None:
                del self.buffers[channel]
            return None
        now = _now()
        while buffer:
            deadline, payload, held = buffer.popleft()
            if held:
                self.acks.owe(channel)
                self._schedule_flush()
            if deadline >= now:
                if not buffer:
                    del self.buffers[channel]
                return payload
        self.buffers.pop(channel, None)
        return None

    def keep(self, channel: str, payload: bytes, ttl_ms: int, held: bool) -> None:
        """Buffer a message of ``channel`` for its next ``receive``."""
        deadline = _now() + ttl_ms / 1000
        self.buffers.setdefault(channel, deque()).append((deadline, payload, held))
        wake_one(self.waiters.get(channel))

    def keep_push(self, frame: Push) -> None:
        if frame.fanout_capacity:  # a group fan-out: its capacity applies here
            self.acks.keep_fanout(frame, self.buffers, self.waiters, _now())
            self.acks.report_later(self._loop, self._schedule_flush)
            return
        for channel in frame.channels:
            self.keep(channel, frame.payload, frame.ttl_ms, held=True)

    async def wait(self, channel: str) -> bytes | None:
        """Until a message of ``channel`` is kept (or at once, if one is); the message if
        it was handed to this receiver (``keep_fanout``), else None: ``take`` it."""
        if channel in self.buffers:
            return None
        waiter: Waiter = self._loop.create_future()
        waiters = self.waiters.get(channel)
        if waiters is None:
            waiters = self.waiters[channel] = deque()
        waiters.append(waiter)
        try:
            entry = await waiter
        except BaseException:
            if waiter in waiters:  # not woken (``wake_one`` takes out whom it wakes)
                waiters.remove(waiter)
            elif not waiter.cancelled() and waiter.exception() is None:
                handed = waiter.result()  # handed to us, then cancelled: not lost
                if handed is not None:
                    self.buffers.setdefault(channel, deque()).appendleft(handed)
            # Cancelled, perhaps just after a push woke us: another receiver of this
            # channel must not sleep on a message we leave in the buffer.
            if channel in self.buffers:
                wake_one(waiters)
            raise
        finally:
            if not waiters and self.waiters.get(channel) is waiters:
                del self.waiters[channel]
        return entry[1] if entry is not None and entry[0] >= _now() else None

    def fail(self, error: Exception) -> None:
        """Every waiting receiver hears ``error``."""
        for waiter in [w for waiters in self.waiters.values() for w in waiters if not w.done()]:
            waiter.set_exception(error)


class Numbering(Protocol):
    """The numbers of one client's sends (``window.SendWindow``; a sync thread's
    ``sync_session.SyncNumbers``): one sequence for SENDs and group sends."""

    #: WELCOME agreed numbered group sends.
    numbers_groups: bool
    #: A send failed in storage: everything goes again on the next connection.
    dropping: bool
    last_seq: int

    @property
    def unsettled(self) -> Sized: ...  # numbered SENDs not settled

    def confirmed(self, frame: Confirm) -> None: ...

    def drop_later(self) -> None: ...


class Unconfirmed:
    """The numbered group sends of one loop client that no CONFIRM covers yet."""

    __slots__ = ("_bytes", "_encoder", "_requests", "_waiters", "entries")

    def __init__(self) -> None:
        #: (seq, group, payload), oldest first.
        self.entries: deque[tuple[int, str, bytes]] = deque()
        self._bytes = 0
        self._requests: dict[int, int] = {}  # request id of a resend -> its seq
        self._encoder = FrameEncoder()
        self._waiters: list[asyncio.Future[None]] = []  # group sends waiting for room

    def __bool__(self) -> bool:
        return bool(self.entries)

    def is_full(self, size: int) -> bool:
        """True if one more group send of ``size`` payload bytes would pass the bound
        (one goes whatever its size when none waits)."""
        entries = self.entries
        return bool(entries) and (
            len(entries) >= MAX_UNCONFIRMED_GROUP_SENDS
            or self._bytes + size > MAX_UNCONFIRMED_GROUP_BYTES
        )

    async def room(self, loop: asyncio.AbstractEventLoop) -> None:
        """Until a CONFIRM (or the answer to a resend) settles some: the bound's wait."""
        waiter = loop.create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            self._waiters.remove(waiter)

    def number(self, window: Numbering, group: str, payload: bytes) -> bytes | None:
        """The numbered GROUP_SEND of a group send, encoded and kept until confirmed; or
        None if the daemon does not number them (then it goes as a request)."""
        if not window.numbers_groups or window.dropping:
            return None
        window.last_seq = seq = window.last_seq + 1  # one sequence with the SENDs
        self.entries.append((seq, group, payload))
        self._bytes += len(payload)
        return self._encoder.numbered(GroupSend.TYPE, 0, group, payload, seq)

    def confirmed(self, frame: Confirm, window: Numbering) -> None:
        """CONFIRM: settle the group sends it covers, and the window's sends."""
        if window.dropping:
            return  # a send failed: everything goes again on the next connection
        self.confirm(frame.through_seq)
        if window.unsettled or frame.room:
            window.confirmed(frame)

    def confirm(self, through_seq: int) -> None:
        """Every numbered send up to ``through_seq`` was handled: forget those."""
        entries = self.entries
        if not entries or entries[0][0] > through_seq:
            return
        while entries and entries[0][0] <= through_seq:
            self._bytes -= len(entries.popleft()[2])
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def resend(self, next_id: Callable[[], int], numbered: bool) -> list[tuple[int, bytes]]:
        """A new connection: each as a request with its seq, as (seq, frame); without it
        (not ``numbered``) to a daemon older than numbered group sends, which delivers
        again what it delivered before (the receiving layers drop it by its id)."""
        frames = []
        for seq, group, payload in self.entries:
            request_id = next_id()
            self._requests[request_id] = seq
            wire_seq = seq if numbered else 0
            frame = self._encoder.numbered(GroupSend.TYPE, request_id, group, payload, wire_seq)
            frames.append((seq, frame))
        return frames

    def answer(self, frame: Frame, window: Numbering) -> bool:
        """Take the OK or ERROR of a resend (True), or leave another frame (False)."""
        seq = self._requests.pop(getattr(frame, "request_id", 0), None)
        if seq is None:
            return False
        if window.dropping:
            return True  # a send failed: everything goes again on the next connection
        if type(frame) is Error:
            if frame.error_code is ErrorCode.BACKEND_UNAVAILABLE:
                window.drop_later()  # storage failed it: again, on the next connection
                return True
            log.warning("a group message (seq %d) was lost on a reconnect: %s", seq, frame)
        elif type(frame) is Ok and frame.count:
            log.info("a group_send sent again skipped %d full members", frame.count)
        self.confirm(seq)  # the daemon handled it, and every earlier one
        return True

    def lost(self) -> None:
        """The connection dropped: the resends' answers will not come."""
        self._requests.clear()

    def fail(self, error: Exception) -> None:
        """No connection will come: what was not confirmed is never sent again; say so
        (those the daemon read are delivered: it handles a closed connection's reads)."""
        if self.entries:
            count = len(self.entries)
            log.warning(
                "%d group messages sent were not confirmed and will not be sent again "
                "(those the daemon read are delivered): %s",
                count,
                error,
            )
        self.entries.clear()
        self._bytes = 0
        self._requests.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(error)
