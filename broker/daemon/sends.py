"""SEND frames (and SEND_MANY): answered one by one or as a burst, and, with send windows,
stored into the room the connection holds (docs/flow.md; ``windows`` keeps the counts).

Without windows (the backend cannot reserve room, ``--send-window 0``, or a client that
asked for none) a SEND is a request answered by OK or CHANNEL_FULL, and a burst of them
is one ``send_many``. With windows, a SEND with a request id also reserves room on its
channel in the same storage step, and its OK says how much; a SEND with none (and a
``seq``) spends a unit of that room and is stored without a capacity check; one on a
channel where the connection holds no room breaks the protocol (``NO_ROOM``). A burst
that held a windowed SEND is confirmed by a CONFIRM of the highest seq handled, held
back and merged with the next bursts' (``confirms`` says until when).
Shared storage dedupes numbered SENDs itself (a client may come back through another
daemon) and counts room per connection (``holder``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from bisect import bisect_left
from time import monotonic, perf_counter
from typing import TYPE_CHECKING

from backends import ALREADY_STORED, BackendError, ReservesRoom
from protocol import ErrorCode, Hello, Ok, Send, SendMany, is_valid_channel

from .confirms import HeldConfirm
from .context import Context
from .shell import Shell
from .windows import Room, Seqs

if TYPE_CHECKING:
    from broker.ops.metrics import Histogram

__all__ = ["SEND_BATCH", "Sends"]

log = logging.getLogger("channels_broker.connection")

#: Consecutive SENDs answered with one backend call: a layer's whole send window.
SEND_BATCH = 256

#: Numbers the connections of this daemon that hold room (``ReservesRoom``'s holder).
_HOLDERS = itertools.count(1)


class Sends:
    """The SENDs of one connection."""

    def __init__(self, shell: Shell, ctx: Context) -> None:
        self.shell = shell
        self.ctx = ctx
        backend = ctx.backend
        #: The storage, if it can reserve room (and windows are on); else None.
        self.reserves = backend if isinstance(backend, ReservesRoom) else None
        #: Storage keeps what numbered SENDs came to, with the messages (shared storage:
        #: a client may come back through another daemon); else ``seqs`` says.
        self.seqs_in_storage = self.reserves is not None and self.reserves.dedupes_sends
        #: None until HELLO agrees a window, and for good if none is agreed.
        self.room: Room | None = None
        #: What this client's numbered SENDs came to: its own (``windows.Senders``) if
        #: its id is owned, else this connection's.
        self.seqs = Seqs()
        #: Who holds this connection's room in storage: "<client id> <number>".
        self.holder = ""
        #: The CONFIRM of the latest bursts, not yet written (``confirms``).
        self.held_confirm = HeldConfirm()
        self._loop = asyncio.get_running_loop()

    def open(self, hello: Hello) -> int:
        """Agree the window HELLO asks for, within ``--send-window``; return it (0: none)."""
        config = self.ctx.config
        reserves = self.reserves
        can = reserves is not None and reserves.can_reserve_room()
        window = min(hello.send_window, config.send_window) if can else 0
        if window:
            self.room = Room(window, config.max_send_room)
            session = self.shell.session
            assert session is not None  # set before the window is agreed
            self.holder = f"{session.client_id} {next(_HOLDERS)}"
        return window

    async def handle(self, first: Send) -> None:
        """Answer ``first`` and the SENDs right behind it in the inbox, as one burst."""
        inbox = self.shell.inbox
        frames = [first]
        while inbox and type(inbox[0]) is Send and len(frames) < SEND_BATCH:
            frames.append(inbox.popleft())  # type: ignore[arg-type]
        started = perf_counter()
        if self.room is not None:
            await self._windowed(frames)
        elif len(frames) == 1:
            await self._one(first)
        else:
            await self._many(frames)
        _observe(self.ctx.metrics.request_by_type[Send], perf_counter() - started, len(frames))

    # -- without windows -----------------------------------------------------

    async def _one(self, frame: Send) -> None:
        if not self._is_valid(frame):
            return
        session = self.shell.session
        assert session is not None  # no request before HELLO
        try:
            accepted = await self.ctx.backend.send(
                session.ns,
                frame.channel,
                frame.payload,
                capacity=session.capacity_of(frame.channel),
                expiry_s=session.expiry_s,
            )
        except BackendError as exc:
            log.warning("backend error for Send: %s", exc)
            self.shell.fail(frame.request_id, ErrorCode.BACKEND_UNAVAILABLE, str(exc))
            return
        self._answer(frame, accepted)

    async def _many(self, frames: list[Send]) -> None:
        """Consecutive SENDs as one ``send_many``: one backend round trip, the same replies.

        A layer keeps many sends in flight; a shared backend would otherwise pay a
        round trip for each, one after the other.
        """
        valid = [frame for frame in frames if self._is_valid(frame)]
        session = self.shell.session
        assert session is not None
        try:
            refused = await self.ctx.backend.send_many(
                session.ns,
                [(frame.channel, frame.payload) for frame in valid],
                capacity_of=session.capacity_of,
                expiry_s=session.expiry_s,
            )
        except BackendError as exc:
            log.warning("backend error for %d Sends: %s", len(valid), exc)
            for frame in valid:
                self.shell.fail(frame.request_id, ErrorCode.BACKEND_UNAVAILABLE, str(exc))
            return
        full = set(refused)
        for index, frame in enumerate(valid):
            self._answer(frame, index not in full)

    async def handle_many(self, frame: SendMany) -> None:
        """SEND_MANY: stored unless full, answered by one OK listing those refused."""
        rid = frame.request_id
        for channel, payload in frame.items:
            if not self._is_valid(Send(rid, channel, payload)):
                return
        session = self.shell.session
        assert session is not None
        rejected = await self.ctx.backend.send_many(
            session.ns, frame.items, capacity_of=session.capacity_of, expiry_s=session.expiry_s
        )
        self.ctx.metrics.accepted["send_many"] += len(frame.items) - len(rejected)
        self.ctx.metrics.rejected["send_many"] += len(rejected)
        self.shell.write(Ok(rid, len(frame.items) - len(rejected), tuple(rejected)))

    def _answer(self, frame: Send, accepted: bool, room: int = 0) -> None:
        if accepted:
            self.shell.write(Ok(frame.request_id, room=room))
            self.ctx.metrics.accepted["send"] += 1
        else:
            self.ctx.metrics.rejected["send"] += 1
            message = f"channel {frame.channel} is full"
            self.shell.fail(frame.request_id, ErrorCode.CHANNEL_FULL, message)

    def _is_valid(self, frame: Send) -> bool:
        """Check name and size; answer the request with an ERROR if either is wrong."""
        rid = frame.request_id
        if not is_valid_channel(frame.channel):
            message = f"invalid channel name {frame.channel!r}"
            self.shell.fail(rid, ErrorCode.INVALID_NAME, message)
            return False
        limit = self.ctx.config.max_message_bytes
        if len(frame.payload) > limit:
            message = f"message of {len(frame.payload)} bytes is over the limit of {limit}"
            self.shell.fail(rid, ErrorCode.MESSAGE_TOO_LARGE, message)
            return False
        return True

    # -- with windows --------------------------------------------------------

    async def _windowed(self, frames: list[Send]) -> None:
        """The burst in order: requests one by one (each reserves room), runs of windowed
        SENDs in one storage call; then one CONFIRM if any was windowed."""
        run: list[Send] = []
        windowed = 0
        spent: dict[str, int] = {}  # channel -> size of its latest windowed message
        for frame in frames:
            if frame.request_id or not frame.seq:  # a request (an old client's may use id 0)
                if run:
                    await self._store(run)
                    run = []
                    if self.shell.closing:
                        return  # storage failed them: nothing later may overtake them
                await self._reserving(frame)
            elif not self._spend(frame):
                return  # the connection is closing: nothing more of it is handled
            else:
                windowed += 1
                spent[frame.channel] = len(frame.payload)
                if self.seqs_in_storage or not self.seqs.was_stored(frame.seq):
                    run.append(frame)
                elif self.reserves is not None:  # a retry: its unit goes back to storage
                    await self._release(frame.channel, 1)
        if run:
            await self._store(run)
        if windowed and not self.shell.closing:
            held, room = self.held_confirm, self.room
            assert room is not None  # windowed SENDs were handled
            held.add(self.seqs.highest, await self._refill(spent), windowed)
            delay = self.ctx.config.confirm_delay_s
            if not delay or held.is_urgent(room, spent):
                self.write_held_confirm()
            elif held.timer is None:
                held.timer = self._loop.call_later(delay, self._confirm_due)
                held.ripe_at = monotonic() + delay / 2

    def write_held_confirm(self) -> None:
        """Write the CONFIRM held back (``confirms``), if any."""
        frame = self.held_confirm.take()
        if frame is not None and not self.shell.closing:
            self.shell.write(frame)

    def confirm_in_write(self) -> None:
        """The connection writes to the client: the held CONFIRM goes in that write if it
        has waited half its delay, so that a client answered as it sends (a consumer
        replying to each event) never gets one in a write of its own; a younger one
        waits for a later write (each would cost a frame to make and read)."""
        if monotonic() >= self.held_confirm.ripe_at:
            self.write_held_confirm()

    def _confirm_due(self) -> None:
        self.held_confirm.timer = None
        self.write_held_confirm()
        self.shell.flush()

    async def _refill(self, spent: dict[str, int]) -> tuple[tuple[str, int], ...]:
        """Room again on the channels a burst spent room on, as much as a request would
        get (the sender keeps sending: it need not stop to ask), once half the window
        is spent there: a sender of one message at a time would otherwise cost a
        reservation per message, and its CONFIRM a grant each."""
        session, room, reserves = self.shell.session, self.room, self.reserves
        assert session is not None and room is not None and reserves is not None
        granted = []
        held, half = room.by_channel, room.window // 2
        for channel, size in spent.items():
            want = room.wanted(channel) if held.get(channel, 0) <= half else 0
            if want:
                got = await self._reserve_room(channel, want, size)
                if got:
                    room.grant(channel, got)
                    granted.append((channel, got))
        return tuple(granted)

    async def _reserve_room(self, channel: str, want: int, size: int) -> int:
        """Room reserved for a refill; none if storage fails: what the burst stored is
        confirmed all the same, and the sender asks again (a request reserves room)."""
        session, reserves = self.shell.session, self.reserves
        assert session is not None and reserves is not None
        try:
            return await reserves.reserve_room(
                session.ns,
                channel,
                capacity=session.capacity_of(channel),
                window=want,
                size=size,
                holder=self.holder,
            )
        except BackendError as exc:  # counted in backend_errors (broker.ops.instrumented)
            log.warning("could not reserve room on %s after windowed SENDs: %s", channel, exc)
            return 0

    async def _reserving(self, frame: Send) -> None:
        """A request: stored if there is room, with room reserved for the next ones."""
        seqs, seq = self.seqs, frame.seq
        if not self.seqs_in_storage and seqs.was_stored(seq):  # a retry: it was stored
            self.shell.write(Ok(frame.request_id))
            return
        if not self._is_valid(frame):
            seqs.handled(seq, stored=False)
            return
        session, room, reserves = self.shell.session, self.room, self.reserves
        assert session is not None and room is not None and reserves is not None
        channel = frame.channel
        if room.total >= room.limit:  # no more room for this connection until some goes
            self.ctx.metrics.count_limit("max-send-room")
        try:
            granted = await reserves.send_reserving(
                session.ns,
                channel,
                frame.payload,
                capacity=session.capacity_of(channel),
                expiry_s=session.expiry_s,
                window=room.wanted(channel),
                client=session.client_id,
                seq=seq,
                holder=self.holder,
            )
        except BackendError as exc:
            log.warning("backend error for Send: %s", exc)
            seqs.handled(seq, stored=False)
            self.shell.fail(frame.request_id, ErrorCode.BACKEND_UNAVAILABLE, str(exc))
            return
        if granted == ALREADY_STORED:  # a retry after a reconnect, stored the first time
            seqs.handled(seq, stored=True)
            self.shell.write(Ok(frame.request_id))
            return
        seqs.handled(seq, stored=granted is not None)
        if granted is not None:
            room.grant(channel, granted)
        self._answer(frame, granted is not None, granted or 0)

    def _spend(self, frame: Send) -> bool:
        """Take a unit of room for a windowed SEND; close the connection if it breaks the
        rules (no room there, or what a request would have been refused for)."""
        room = self.room
        assert room is not None
        too_large = len(frame.payload) > self.ctx.config.max_message_bytes
        # Room is granted only on a channel whose name a request proved valid: a SEND
        # that spends some needs no name check (a regular expression per message).
        if not too_large and room.spend(frame.channel):
            return True
        if not is_valid_channel(frame.channel):
            code, message = ErrorCode.INVALID_NAME, f"invalid channel name {frame.channel!r}"
        elif too_large:
            code, message = ErrorCode.MESSAGE_TOO_LARGE, "a windowed SEND over the size limit"
        else:
            code = ErrorCode.NO_ROOM
            message = f"a SEND with no request id on {frame.channel}, where it holds no room"
        log.warning("protocol error from %s: %s", self.shell.peer, message)
        self.shell.fatal(code, message)
        return False

    async def _store(self, run: list[Send]) -> None:
        """Store windowed SENDs into the room they spent, in one storage call."""
        session, reserves = self.shell.session, self.reserves
        assert session is not None and reserves is not None
        items = [(frame.channel, frame.payload) for frame in run]
        try:
            await reserves.send_reserved(
                session.ns,
                items,
                expiry_s=session.expiry_s,
                client=session.client_id,
                seqs=[frame.seq for frame in run],
                holder=self.holder,
            )
        except BackendError as exc:
            # No answer can say so: close, and the client sends them again elsewhere.
            for frame in run:
                self.seqs.handled(frame.seq, stored=False)
            self.shell.fatal(ErrorCode.BACKEND_UNAVAILABLE, f"windowed SENDs not stored: {exc}")
            return
        seqs = self.seqs
        for frame in run:
            seqs.handled(frame.seq, stored=True)
        self.ctx.metrics.accepted["send"] += len(run)

    # -- room given back -----------------------------------------------------

    async def give_back(self, channel: str, count: int) -> None:
        """RETURN_ROOM: release what the connection holds of ``count`` units."""
        if self.room is not None and self.reserves is not None:
            await self._release(channel, self.room.give_back(channel, count))

    async def release_all(self) -> None:
        """The connection closed: release all its room."""
        if self.room is not None:
            for channel, count in self.room.take_all().items():
                await self._release(channel, count)

    async def _release(self, channel: str, count: int) -> None:
        session, reserves = self.shell.session, self.reserves
        if count and session is not None and reserves is not None:
            try:
                await reserves.release_room(session.ns, channel, count, holder=self.holder)
            except BackendError:
                log.warning("could not release %d units of room on %s", count, channel)


def _observe(histogram: Histogram, value: float, count: int) -> None:
    # Histogram.observe, written here, ``count`` times at once: it runs for every burst.
    histogram.counts[bisect_left(histogram.bounds, value)] += count
    histogram.sum += value * count
