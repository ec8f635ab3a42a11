"""Send windows, the layer's side: room to send without waiting, numbered sends, resends.

Theory of operation (docs/flow.md). Each ``send`` gets a number (``seq``: 1, 2, 3...
for the loop client's id, whatever its connection) once the daemon said it takes them
(WELCOME's ``send_window``). A send with no room on its channel is a request: it waits
for OK, which may grant room there (reserved against the channel's capacity). While
room is left, ``send`` writes a SEND with no request id, spends a unit and returns: the
message is accepted, as the room was reserved for it. Room unused for ``IDLE_ROOM_S``
goes back (RETURN_ROOM), so other senders are not starved.

Every numbered send is *unsettled* until its OK (which settles every earlier one too:
the daemon handles a connection's frames in order) or a CONFIRM covering it. After a
reconnect the unsettled ones are sent again, in order, as requests with their own seq,
before anything new; the daemon stores each at most once. A caller waiting for an OK
when the connection drops goes on waiting for the resend's answer, within
``connect_timeout``. Unsettled sends are bounded (``MAX_UNSETTLED_SENDS``, four windows,
``MAX_UNSETTLED_BYTES``): past that, a send waits for its answer.

A SEND or GROUP_SEND that waits for its answer and meets ``BrokerUnavailable`` (the
daemon's storage did not answer in time, the connection dropped) is sent again, with
the same payload and so the same message id, until ``connect_timeout`` has passed
since that failure (``resend_until_answered``): the first try may have been stored, so the receiving
layer drops the second copy by its id; and a send that raises was tried to the end.
A numbered one goes again with its seq, so storage, which records what each seq came
to, stores it at most once: a first try that was stored is answered OK, not refused.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from protocol import (
    MAX_UNCONFIRMED_GROUP_SENDS,
    MAX_UNSETTLED_SENDS,
    Confirm,
    Error,
    ErrorCode,
    Frame,
    FrameEncoder,
    Ok,
    Ping,
    ReturnRoom,
    Send,
)

from .errors import BrokerUnavailable, exception_for

__all__ = [
    "IDLE_ROOM_S",
    "MAX_UNSETTLED_BYTES",
    "WANTED_SEND_WINDOW",
    "SendWindow",
    "worth_resending",
]

log = logging.getLogger("channels_broker.layer")

#: Seconds a channel's room may go unused before it goes back to the daemon (it may be
#: kept up to twice as long: one timer looks at every channel).
IDLE_ROOM_S = 0.2
#: Payload bytes of unsettled windowed sends kept for a resend; past it, sends wait.
MAX_UNSETTLED_BYTES = 8 * 1024 * 1024
#: Seconds between two tries of a request that met an unavailable daemon or storage.
RESEND_DELAY_S = 0.1
#: The window HELLO asks for: the largest a daemon may agree (its --send-window caps it).
WANTED_SEND_WINDOW = MAX_UNSETTLED_SENDS // 4
#: Seconds before a connection whose storage failed an accepted send is dropped, to send
#: it (and every later one) again on the next: a pause, not a busy loop, while it is down.
STORAGE_RETRY_S = 0.25


def worth_resending(exc: BrokerUnavailable) -> bool:
    """True for a request the daemon may have carried out (its storage did not answer,
    the connection dropped mid-request), not for one no daemon was reached for (a
    refused connection, TLS, a name not found: the connect already tried its time)."""
    return type(exc) is BrokerUnavailable


class Sender(Protocol):
    """What the window needs of its event loop's client."""

    conn: Any
    max_message_bytes: int
    settings: Any

    async def connected(self) -> Any: ...

    async def request(self, frame: Frame) -> Frame: ...

    def next_id(self) -> int: ...

    def write(self, frame: Frame | bytes) -> None: ...


class Unsettled:
    """A numbered send not yet answered nor confirmed."""

    __slots__ = ("accepted", "channel", "payload", "reply", "request_id", "seq")

    def __init__(self, seq: int, channel: str, payload: bytes, accepted: bool) -> None:
        self.seq, self.channel, self.payload = seq, channel, payload
        #: ``send`` returned for it (windowed): a later refusal loses an accepted message.
        self.accepted = accepted
        #: The request id of its latest SEND with one (0: windowed, not resent yet).
        self.request_id = 0
        #: Its caller's wait: the answer, or None when the connection dropped.
        self.reply: asyncio.Future[Frame | None] | None = None


class SendWindow:
    """The send room, sequence and unsettled sends of one loop's client."""

    def __init__(
        self,
        client: Sender,
        loop: asyncio.AbstractEventLoop,
        size: int = 0,
        last_seq: int = 0,
        numbers_groups: bool = False,
    ) -> None:
        self._client, self._loop = client, loop
        #: The window the daemon agreed on this connection; 0: no numbers, no room. A
        #: parked connection's, if its client goes on with it (else WELCOME says).
        self.size = size
        #: The latest seq used: numbers go on across connections (a parked one's too, as
        #: the daemon knows its client id's numbers).
        self.last_seq = last_seq
        #: The daemon numbers group sends (WELCOME's version): they take seqs from here.
        self.numbers_groups = numbers_groups
        self._rooms: dict[str, int] = {}
        self._used: set[str] = set()  # channels whose room was spent since the last tick
        self._timer: asyncio.TimerHandle | None = None
        self.unsettled: deque[Unsettled] = deque()
        self._unsettled_bytes = 0
        self._requests: dict[int, Unsettled] = {}  # request id -> its numbered send
        self._encoder = FrameEncoder()
        #: Storage failed an accepted send: answers are ignored until the connection goes.
        self.dropping = False

    # -- sending -------------------------------------------------------------

    async def send(self, channel: str, payload: bytes) -> None:
        """Send; return once accepted. Raise ``ChannelFull`` when the channel is full."""
        room = self._rooms.get(channel)
        if room and self._is_writable() and self._has_space(payload):
            if room > 1:
                self._rooms[channel] = room - 1
            else:
                del self._rooms[channel]
            self._used.add(channel)
            entry = self._number(channel, payload, accepted=True)
            self._client.write(self._encoder.send(0, channel, payload, entry.seq))
            return
        await self._request(channel, payload)

    def _has_space(self, payload: bytes) -> bool:
        return (
            # The daemon remembers MAX_UNSETTLED_SENDS seqs; group sends may take the rest.
            len(self.unsettled)
            < min(4 * self.size, MAX_UNSETTLED_SENDS - MAX_UNCONFIRMED_GROUP_SENDS)
            and self._unsettled_bytes + len(payload) <= MAX_UNSETTLED_BYTES
        )

    def _number(self, channel: str, payload: bytes, accepted: bool) -> Unsettled:
        self.last_seq += 1
        entry = Unsettled(self.last_seq, channel, payload, accepted)
        self.unsettled.append(entry)
        self._unsettled_bytes += len(payload)
        return entry

    async def _request(self, channel: str, payload: bytes) -> None:
        """A SEND that waits for its answer; numbered (and so resent) if windows are on."""
        client = self._client
        await client.connected()
        if not self.size or not self._has_space(payload):
            try:
                reply = await client.request(Send(client.next_id(), channel, payload))
            except BrokerUnavailable as exc:  # it may have been stored: again, same id
                if not worth_resending(exc):
                    raise
                again = functools.partial(Send, channel=channel, payload=payload)
                reply = await self.resend_until_answered(again)
            if type(reply) is Ok:
                self._grant(channel, reply.room)
            return
        entry = self._number(channel, payload, accepted=False)
        entry.reply = self._loop.create_future()
        self._write_request(entry)
        try:
            reply = await self._answer_of(entry)
        finally:
            entry.reply = None  # cancelled or not: nobody waits for it any more
        if type(reply) is Error:
            await self._refused(entry, reply)

    async def _refused(self, entry: Unsettled, reply: Error) -> None:
        """A numbered request answered by an ERROR: raise it, unless it can go again."""
        channel, payload = entry.channel, entry.payload
        if reply.error_code is ErrorCode.CHANNEL_FULL and self._rooms.get(channel):
            # Room came meanwhile (the CONFIRM of earlier sends): it is this sender's,
            # reserved for it, so the channel is not full for it.
            await self.send(channel, payload)
            return
        if reply.error_code is not ErrorCode.BACKEND_UNAVAILABLE:
            raise exception_for(reply)
        # Storage failed it, or ran it and its answer was lost: sent again with its seq,
        # which storage (or the daemon) stores at most once, until answered.
        again = functools.partial(Send, channel=channel, payload=payload, seq=entry.seq)
        answer = await self.resend_until_answered(again)
        if type(answer) is Ok:
            self._grant(channel, answer.room)

    async def _answer_of(self, entry: Unsettled) -> Frame:
        """The answer to ``entry``, across reconnects (each resends it)."""
        while True:
            assert entry.reply is not None
            reply = await entry.reply
            if reply is not None:
                return reply
            try:
                await self._client.connected()  # the reconnect resends it, or this raises
            except BaseException:
                self._forget(entry)  # the caller hears it failed: no resend later
                raise

    async def resend_until_answered(self, request: Callable[[int], Frame]) -> Frame:
        """A request that met ``BrokerUnavailable``, which the daemon may have carried
        out all the same (its storage stalled, the connection dropped): sent again, each
        time with a new request id and the same payload (so the same message id: a copy
        stored twice is dropped by the receiving layer), until answered or
        ``connect_timeout`` has passed. ``request(request_id)`` makes the frame."""
        client = self._client
        give_up_at = self._loop.time() + client.settings.connect_timeout_s
        while True:
            await asyncio.sleep(RESEND_DELAY_S)
            try:
                return await client.request(request(client.next_id()))
            except BrokerUnavailable:
                if self._loop.time() + RESEND_DELAY_S >= give_up_at:
                    raise

    def _is_writable(self) -> bool:
        """Whether a numbered send may go out now: not while no connection is up, nor
        while one waits to be dropped after storage failed an accepted send (that send
        goes again first on the next connection: a later one must not overtake it)."""
        return self._client.conn is not None and not self.dropping

    def _write_request(self, entry: Unsettled) -> None:
        if not self._is_writable():
            return  # the reconnect sends it (it is unsettled)
        entry.request_id = request_id = self._client.next_id()
        self._requests[request_id] = entry
        self._client.write(self._encoder.send(request_id, entry.channel, entry.payload, entry.seq))

    # -- answers -------------------------------------------------------------

    def answer(self, frame: Frame) -> bool:
        """Take the OK or ERROR of a numbered send (True), or leave another frame."""
        entry = self._requests.pop(getattr(frame, "request_id", 0), None)
        if entry is None:
            return False
        if self.dropping or self._storage_failed(entry, frame):
            return True  # it, and every later one, goes again on the next connection
        self.confirm(entry.seq)  # the daemon handled it, and every earlier one
        if type(frame) is Ok:
            self._grant(entry.channel, frame.room)
        elif entry.accepted:
            log.warning("a message sent to %s was lost on a reconnect: %s", entry.channel, frame)
        if entry.reply is not None and not entry.reply.done():
            entry.reply.set_result(frame)
        return True

    def _storage_failed(self, entry: Unsettled, frame: Frame) -> bool:
        """An accepted send that storage failed (BACKEND_UNAVAILABLE): it must not be
        lost, nor overtaken, so the connection goes, after a pause, and the next one
        sends it and every later unsettled one again, in order."""
        if not entry.accepted or type(frame) is not Error:
            return False
        if frame.error_code is not ErrorCode.BACKEND_UNAVAILABLE:
            return False
        self.drop_later()
        return True

    def drop_later(self) -> None:
        """Storage failed an accepted send (or group send): drop the connection after a
        pause, ignoring answers meanwhile; the next one sends it and every later one."""
        conn = self._client.conn
        if conn is not None and conn.transport is not None and not self.dropping:
            self.dropping = True
            self._loop.call_later(STORAGE_RETRY_S, conn.transport.abort)

    def confirmed(self, frame: Confirm) -> None:
        """CONFIRM: every numbered send up to its seq was handled, and room came."""
        if self.dropping:
            return
        self.confirm(frame.through_seq)
        for channel, room in frame.room:
            self._grant(channel, room)

    def confirm(self, through_seq: int) -> None:
        """Every numbered send up to ``through_seq`` was handled: settle them."""
        unsettled = self.unsettled
        while unsettled and unsettled[0].seq <= through_seq:
            entry = unsettled.popleft()
            self._unsettled_bytes -= len(entry.payload)
            self._requests.pop(entry.request_id, None)

    def _forget(self, entry: Unsettled) -> None:
        if entry in self.unsettled:
            self.unsettled.remove(entry)
            self._unsettled_bytes -= len(entry.payload)
        self._requests.pop(entry.request_id, None)

    # -- room ----------------------------------------------------------------

    def _grant(self, channel: str, room: int) -> None:
        if room and self._client.conn is not None:
            self._rooms[channel] = self._rooms.get(channel, 0) + room
            self._used.add(channel)  # about to be spent: not idle before the next look
            if self._timer is None:
                self._timer = self._loop.call_later(IDLE_ROOM_S, self._give_back_idle)

    def _give_back_idle(self) -> None:
        """Give back the room of every channel not sent to since the last look."""
        self._timer = None
        for channel in [channel for channel in self._rooms if channel not in self._used]:
            self._client.write(ReturnRoom(channel, self._rooms.pop(channel)))
        self._used.clear()
        if self._rooms:
            self._timer = self._loop.call_later(IDLE_ROOM_S, self._give_back_idle)

    def give_back_all(self) -> None:
        """Give back all room (the connection goes to another loop: ``parking``)."""
        for channel, room in self._rooms.items():
            self._client.write(ReturnRoom(channel, room))
        self._drop_room()

    def _drop_room(self) -> None:
        self._rooms.clear()
        self._used.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- the connection ------------------------------------------------------

    def open(self, size: int, numbers_groups: bool) -> None:
        """WELCOME agreed ``size`` (0: no windows), and numbered group sends or not."""
        self.size = size
        self.numbers_groups = numbers_groups

    def resend(self) -> list[tuple[int, bytes]]:
        """A new connection: the unsettled sends as requests, in order (after HELLO), as
        (seq, frame), to go in seq order with the group sends resent."""
        frames = []
        for entry in self.unsettled:
            entry.request_id = request_id = self._client.next_id()
            self._requests[request_id] = entry
            if entry.reply is not None:
                entry.reply = self._loop.create_future()
            send = self._encoder.send(request_id, entry.channel, entry.payload, entry.seq)
            frames.append((entry.seq, send))
        return frames

    def lost(self) -> None:
        """The connection dropped: its room went with it; waiting callers are told, to
        wait for the resend (unsettled sends stay, for the next connection)."""
        self.dropping = False
        self._drop_room()
        self._requests.clear()
        for entry in self.unsettled:
            if entry.reply is not None and not entry.reply.done():
                entry.reply.set_result(None)

    def fail(self, error: Exception) -> None:
        """No connection will come (closed, or refused for good): callers hear ``error``."""
        for entry in self.unsettled:
            if entry.reply is not None and not entry.reply.done():
                entry.reply.set_exception(error)
            elif entry.accepted:
                log.warning("a message sent to %s was lost: %s", entry.channel, error)
        self.unsettled.clear()
        self._unsettled_bytes = 0
        self.lost()

    async def settle(self, timeout_s: float, groups: bool = False) -> None:
        """Wait (up to ``timeout_s``) until every unsettled send (and group send, if
        ``groups`` are unconfirmed) is handled: a PING's PONG comes after the answers
        and CONFIRMs of every frame written before it."""
        if (self.unsettled or groups) and self._client.conn is not None:
            client = self._client
            try:
                await asyncio.wait_for(client.request(Ping(client.next_id())), timeout_s)
            except (BrokerUnavailable, TimeoutError):
                return
