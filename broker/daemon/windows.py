"""Send windows, the daemon's side: the room a connection holds, and what a client's
numbered SENDs came to.

Theory of operation (docs/flow.md). An OK to a SEND may grant the connection room on
that channel, reserved in storage (``backends.ReservesRoom``); the connection's
``Room`` counts it per channel, within ``--send-window`` per channel and
``--max-send-room`` in all. A windowed SEND (no request id) spends a unit; RETURN_ROOM
gives units back; at close storage releases what is left.

A client numbers its SENDs (``seq``: 1, 2, 3...) and, after a reconnect, sends again
those it has no answer or CONFIRM for, in order, before anything new. ``Seqs`` says what
each number came to: every seq up to ``highest`` was handled, and those of the latest
``MAX_UNSETTLED_SENDS`` that were not stored are listed, so a retry of a stored one is
answered without storing it again, and a retry of one that was not is handled anew.
A client with an owned id (proven by its secret) keeps its ``Seqs`` across connections
(``Senders``), for its session's expiry after it leaves: past that, what it stored has
expired anyway. That is on ``memory://``: shared storage keeps the record itself, with
the messages (``ReservesRoom.dedupes_sends``), and a connection's ``Seqs`` only says
the highest seq to confirm.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from protocol import MAX_UNSETTLED_SENDS

__all__ = ["Room", "Senders", "Seqs"]


class Room:
    """The send room one connection holds, by channel."""

    __slots__ = ("by_channel", "limit", "total", "window")

    def __init__(self, window: int, limit: int) -> None:
        self.window = window
        self.limit = limit
        self.by_channel: dict[str, int] = {}
        self.total = 0

    def wanted(self, channel: str) -> int:
        """Room to ask storage for on ``channel``: the window less what is held there,
        within what the connection may still hold."""
        return max(0, min(self.window - self.by_channel.get(channel, 0), self.limit - self.total))

    def grant(self, channel: str, room: int) -> None:
        if room:
            self.by_channel[channel] = self.by_channel.get(channel, 0) + room
            self.total += room

    def spend(self, channel: str) -> bool:
        """Take a unit for a windowed SEND; False if the connection holds none there."""
        held = self.by_channel.get(channel, 0)
        if not held:
            return False
        if held > 1:
            self.by_channel[channel] = held - 1
        else:
            del self.by_channel[channel]
        self.total -= 1
        return True

    def give_back(self, channel: str, count: int) -> int:
        """Forget up to ``count`` units of ``channel``; return how many (never more than
        held: a client cannot free room it does not hold)."""
        held = self.by_channel.get(channel, 0)
        count = max(0, min(count, held))
        if count == held and held:
            del self.by_channel[channel]
        elif count:
            self.by_channel[channel] = held - count
        self.total -= count
        return count

    def take_all(self) -> dict[str, int]:
        """Forget all the room and return it, for storage to release (at close)."""
        held, self.by_channel, self.total = self.by_channel, {}, 0
        return held


class Seqs:
    """What one client's numbered SENDs came to."""

    __slots__ = ("highest", "unstored")

    def __init__(self) -> None:
        #: Every seq up to this one was handled (frames of a connection are handled in
        #: order, and a reconnected client sends its retries first, in order).
        self.highest = 0
        #: Seqs up to ``highest`` not stored (refused, or failed), the latest only.
        self.unstored: dict[int, None] = {}

    def was_stored(self, seq: int) -> bool:
        """True for a retry of a message already stored: answer it, store nothing."""
        return 0 < seq <= self.highest and seq not in self.unstored

    def handled(self, seq: int, stored: bool) -> None:
        """Record ``seq``'s outcome (0: not a numbered SEND, nothing to record)."""
        if not seq:
            return
        if seq > self.highest:
            self.highest = seq
        unstored = self.unstored
        if stored:
            unstored.pop(seq, None)
            return
        unstored[seq] = None
        # A client never retries a seq this far back: it has at most that many unsettled.
        oldest = self.highest - MAX_UNSETTLED_SENDS
        while unstored and next(iter(unstored)) <= oldest:
            del unstored[next(iter(unstored))]


class Senders:
    """The ``Seqs`` of the clients with an owned id: kept while one of their connections
    lives, and for ``keep_s`` after the last one closed, at most ``limit`` of those."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seqs: dict[tuple[str, str], Seqs] = {}
        self._connections: dict[tuple[str, str], int] = {}
        #: Clients with no connection: key -> when their Seqs go, oldest first.
        self._left: OrderedDict[tuple[str, str], float] = OrderedDict()

    def attach(self, ns: str, client_id: str) -> Seqs:
        """The ``Seqs`` of a client that (re)connected."""
        key = (ns, client_id)
        self._left.pop(key, None)
        self._connections[key] = self._connections.get(key, 0) + 1
        seqs = self._seqs.get(key)
        if seqs is None:
            seqs = self._seqs[key] = Seqs()
        return seqs

    def detach(self, ns: str, client_id: str, keep_s: float) -> None:
        """One connection of the client closed; keep its Seqs ``keep_s`` past the last."""
        key = (ns, client_id)
        if key not in self._seqs:
            return
        left = self._connections.get(key, 0) - 1
        if left > 0:
            self._connections[key] = left
            return
        self._connections.pop(key, None)
        now = time.monotonic()
        self._left[key] = now + keep_s
        self._left.move_to_end(key)
        while self._left:
            oldest, until = next(iter(self._left.items()))
            if until > now and len(self._left) <= self.limit:
                break
            del self._left[oldest]
            del self._seqs[oldest]

    def __len__(self) -> int:
        return len(self._seqs)
