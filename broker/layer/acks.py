"""What a loop client owes the daemon for pushed messages, and group fan-outs kept.

Messages the daemon took from storage count against their channel until this client
acknowledges them, per channel, as ``receive`` takes them (``owe``). A group fan-out
(``Push.fanout_capacity``) was never stored: the client applies each member's capacity
to its own buffer as the fan-out arrives (``keep_fanout``), where those messages wait,
and tells the daemon in aggregate how many it kept and how many it dropped as full, so
the daemon's counts of accepted and dropped messages add up.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from protocol import MAX_ACK_PAIRS, Ack, Push, encode_frame

__all__ = ["FANOUT_REPORT_S", "Acks", "Buffer", "wake_one"]

#: How late the counts of fan-outs kept and dropped may reach the daemon when nothing
#: else is written: they only feed its metrics (nothing waits for them, unlike the
#: acknowledgements that free a channel's capacity), so a frame per PUSH would cost the
#: daemon a wake-up per connection and group_send for nothing.
FANOUT_REPORT_S = 0.5

#: A channel's buffered messages: (deadline, payload, held: acknowledged per channel).
Buffer = deque[tuple[float, bytes, bool]]


def wake_one(
    waiters: deque[asyncio.Future[None]] | None, skip: asyncio.Future[None] | None = None
) -> None:
    """Wake the first receiver waiting in ``waiters`` (not ``skip``), if any."""
    for waiter in waiters or ():
        if waiter is not skip and not waiter.done():
            waiter.set_result(None)
            return


class Acks:
    """Acknowledgements owed: per channel, and fan-outs kept and dropped."""

    __slots__ = ("_report", "counts", "fanout_dropped", "fanout_kept")

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.fanout_kept = self.fanout_dropped = 0
        self._report: asyncio.TimerHandle | None = None

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
        waiters: dict[str, deque[asyncio.Future[None]]],
        now: float,
    ) -> None:
        """Buffer a fan-out for each listed channel with room under its capacity, as the
        daemon would have stored it (expired messages take no room), and wake a receiver
        of it; drop it for the others. One entry, shared: it is the same message."""
        capacity = frame.fanout_capacity
        entry = (now + frame.ttl_ms / 1000, frame.payload, False)
        kept = 0
        for channel in frame.channels:
            buffer = buffers.get(channel)
            if buffer is None:
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
        pairs = tuple(self.counts.items())
        frames = [
            encode_frame(Ack(pairs[start : start + MAX_ACK_PAIRS]))
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
