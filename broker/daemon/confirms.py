"""A CONFIRM held back: the daemon's side of settling windowed SENDs without a frame each.

A burst of windowed SENDs used to end with its own CONFIRM: one more frame, one more
system call for the daemon and a wake-up for the client, per burst, which for a client
that sends one message at a time (a consumer answering each event) is per message. The
client does not need it soon: it keeps each numbered send until confirmed, and it holds
room to go on sending. So the CONFIRM of a burst is held and merged with the next
ones' (the highest seq, the room granted summed), and written when the client would
miss it:

- at once when ``CONFIRM_EVERY_SEQS`` windowed SENDs are held (the client keeps at
  most ``MAX_UNSETTLED_SENDS`` unsettled), or when the client's room on a channel the
  burst spent on is no more than what is held back for it (it would soon have to ask:
  room is refilled once half the window is spent, ``Sends._refill``);
- with any write to the client once it has waited half the delay (a consumer that
  answers each event gets the PUSH of the answer to its send, and the CONFIRM rides
  in that write, not in one of its own);
- before a PONG, which promises every answer and CONFIRM of the frames before its PING;
- otherwise ``--confirm-delay`` (2 ms) after the first held burst.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from protocol import MAX_UNSETTLED_SENDS, Confirm

from .windows import Room

__all__ = ["CONFIRM_EVERY_SEQS", "HeldConfirm"]
#: Windowed SENDs held unconfirmed at most (a sixteenth of what a client may keep).
CONFIRM_EVERY_SEQS = MAX_UNSETTLED_SENDS // 16


class HeldConfirm:
    """What the CONFIRM not yet written says, and the timer that writes it."""

    __slots__ = ("ripe_at", "room", "seqs", "through_seq", "timer")

    def __init__(self) -> None:
        self.through_seq = 0
        self.room: dict[str, int] = {}  # granted, and not yet told
        self.seqs = 0  # windowed SENDs it covers
        self.timer: asyncio.TimerHandle | None = None
        #: When it may go with any write to the client: half the delay on, by
        #: ``time.monotonic()`` (uvloop's ``loop.time()`` moves in whole milliseconds).
        self.ripe_at = 0.0

    def add(self, through_seq: int, granted: Iterable[tuple[str, int]], seqs: int) -> None:
        """Merge a burst's CONFIRM into the held one."""
        self.through_seq = through_seq
        room = self.room
        for channel, count in granted:
            room[channel] = room.get(channel, 0) + count
        self.seqs += seqs

    def is_urgent(self, held: Room, spent: Iterable[str]) -> bool:
        """True if the client would soon miss it (the module says when)."""
        if self.seqs >= CONFIRM_EVERY_SEQS:
            return True
        room = self.room
        for channel in spent:
            owed = room.get(channel, 0)
            if owed and held.by_channel.get(channel, 0) - owed <= owed:
                return True
        return False

    def take(self) -> Confirm | None:
        """The CONFIRM to write now (None if nothing is held); stops the timer."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.seqs and not self.room:
            return None
        frame = Confirm(self.through_seq, tuple(self.room.items()))
        self.room, self.seqs = {}, 0
        return frame
