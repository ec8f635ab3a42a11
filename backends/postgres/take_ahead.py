"""Takes for the PostgreSQL backend: batched per channel, and a few taken ahead.

A pull of a normal channel (a worker's ``receive``) must take its message in the
database before it is handed out, or two daemons could hand out the same one. That
round trip sits between every message and the next ``receive`` of a worker, so a few
workers could not pull faster than a few thousand messages a second, whatever the
database's throughput. Two things take it off that path:

* Batching. Takes of one channel go out as one statement per round: those that come
  while one round is under way wait for the next; each gets its share, in order.
* Taking ahead. While a normal channel is pulled busily (at least ``BUSY_PULLS`` pulls
  in the last ``linger`` seconds), a round also takes the channel's next messages,
  as many as were pulled in the last one or two ``linger`` periods and at most
  ``depth``, and keeps them here: the next pulls are served from them at once, and a
  background round tops them up when half are gone. They count against the channel's
  capacity for this daemon's senders (``waiting_ahead``). What no pull wanted for
  ``linger`` seconds, and all of it when the daemon stops (``stop_taking_ahead``,
  before its clients go), is put back, so other daemons' workers get it. ``depth=0``
  turns taking ahead off.

Leases. A normal channel's messages (taken without hold) are not deleted when taken:
they are leased to this daemon (``Ahead.lease``), deleted once handed out (``ack``,
written in the background) and put back by ending their lease, in their places. A
daemon killed outright loses none of them: their leases lapse and any daemon takes
them again, oldest first. One handed out just before the kill may come again (the
acknowledgement of a handed-out message is written a moment later), never lost; the
receiving layer drops it by its message id. A take for a consumer that acknowledges
deliveries (``by_consumer``) leaves the deletion to that consumer: the message stays
leased until its ACK names it (``consumer_lease``), so one lost on its way (a
connection cut, a daemon killed) comes again once the lease lapses. A message is
handed out only within the first half of its lease (``Ahead.hand_out_by``): the rest
leaves time for its acknowledgement.

Statements run in tasks of their own, so a caller that gives up (is cancelled) while
its round is under way loses nothing: its share stays here for the next take. On a
channel that is not leased (a process-specific one, or takes with ``hold``) such a
share is dropped if no take wants it within ``linger`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from backends import BackendError, BackendUnavailable, Taken

__all__ = ["Ahead", "Takes", "consumer_lease", "is_leased"]

log = logging.getLogger("channels_broker.backends.postgres")

#: Pulls within ``linger`` seconds that make a channel busy enough to take ahead.
BUSY_PULLS = 2


@dataclass(slots=True)
class Ahead:
    """A message taken from the database: its id (its place in the queue), its expiry,
    and its lease (0: not leased, deleted when taken)."""

    id: int
    payload: bytes
    #: Event loop time at which it expires.
    deadline: float
    #: The lease it is held under (the take's token); 0 if it was deleted instead.
    lease: int = 0
    #: Event loop time after which it is no longer handed out (half its lease).
    hand_out_by: float = math.inf


#: Takes up to ``limit`` messages of (ns, channel), with or without ``hold``, oldest first.
TakeNow = Callable[[str, str, int, bool], Awaitable[list[Ahead]]]
#: Puts messages taken ahead back into (ns, channel) under their ids.
GiveBack = Callable[[str, str, list[Ahead]], Awaitable[None]]
#: Wakes one more pull of (ns, channel).
Wake = Callable[[str, str], None]
#: Has leased messages of (ns, channel) that were handed out deleted (``AckWriter``).
Ack = Callable[[str, str, list[Ahead]], None]
_Key = tuple[str, str, bool]
#: A take waiting for a round: its limit, whether its consumer acknowledges (``take``),
#: and its answer.
_Waiter = tuple[int, bool, "asyncio.Future[list[Taken]]"]


@dataclass(slots=True)
class _Line:
    """One channel's takes: those waiting, the round under way, what was taken ahead."""

    waiters: list[_Waiter] = field(default_factory=list)
    #: A statement (a round, or putting messages back) is under way for this channel.
    busy: bool = False
    ahead: deque[Ahead] = field(default_factory=deque)
    #: Pulls served in the current and the previous ``linger`` window.
    pulls: int = 0
    pulls_before: int = 0
    window_start: float = 0.0
    #: When a pull was last served, or messages last arrived: idleness counts from there.
    last_used: float = 0.0
    timer: asyncio.TimerHandle | None = None
    #: Its namespace's flush count when the round under way began (a flush since
    #: voids what the round brings beyond its callers' shares).
    generation: int = 0


class Takes:
    """Every take of one backend goes through here (see the module docstring)."""

    def __init__(
        self,
        take_now: TakeNow,
        give_back: GiveBack,
        wake: Wake,
        ack: Ack,
        *,
        depth: int,
        linger_s: float,
    ) -> None:
        self._take_now = take_now
        self._give_back = give_back
        self._wake = wake
        self._ack = ack
        self.depth = self._configured_depth = depth
        self.linger_s = linger_s
        self._lines: dict[_Key, _Line] = {}
        #: Flushes by namespace (``forget``): rounds begun before one keep nothing ahead.
        self._flushes: dict[str, int] = {}
        #: Statements under way: rounds and putting back.
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def has_lines(self) -> bool:
        """Whether any channel is being taken from at all (else nothing waits ahead)."""
        return bool(self._lines)

    def waiting_ahead(self, ns: str, channel: str) -> int:
        """How many of the channel's messages this daemon has taken ahead."""
        line = self._lines.get((ns, channel, False))
        return 0 if line is None else len(line.ahead)

    async def take(
        self, ns: str, channel: str, limit: int, hold: bool, by_consumer: bool = False
    ) -> list[Taken]:
        """Up to ``limit`` messages, oldest first. Leased ones are deleted a moment after
        (``ack``) or, ``by_consumer``, stay leased until the consumer acknowledges them:
        each ``Taken`` then carries its lease (``consumer_lease``)."""
        key = (ns, channel, hold)
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = _Line()
        if not line.waiters:
            served = self._serve_from_ahead(key, line, limit, by_consumer)
            if served:
                return served
        future: asyncio.Future[list[Taken]] = asyncio.get_running_loop().create_future()
        line.waiters.append((limit, by_consumer, future))
        if not line.busy:
            self._start_round(key, line)
        return await future

    def forget(self, ns: str) -> None:
        """Drop what was taken ahead in ``ns`` (it is being flushed), and void rounds
        under way: what they bring beyond their callers' shares is dropped too."""
        self._flushes[ns] = self._flushes.get(ns, 0) + 1
        for (line_ns, _, _), line in self._lines.items():
            if line_ns == ns:
                line.ahead.clear()

    async def settled(self) -> None:
        """Wait for the statements under way now (rounds, putting back); not for those
        that start meanwhile, which traffic could keep starting for ever."""
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def stop_taking_ahead(self) -> None:
        """Take nothing more ahead; put back what was (the daemon is stopping)."""
        self.depth = 0
        await self.settled()
        returns = []
        for key, line in self._lines.items():
            if line.ahead and not line.busy and _is_leased_line(key):
                items = list(line.ahead)
                line.ahead.clear()
                line.busy = True  # takes wait until they are back: order holds
                returns.append(self._linger_back(key, line, items))
        await asyncio.gather(*returns)

    async def close(self) -> None:
        """Put back what was taken ahead; takes still waiting fail. Ready to be used
        again (as configured) once the backend reconnects."""
        await self.stop_taking_ahead()
        lines, self._lines = self._lines, {}
        for line in lines.values():
            _fail(line.waiters, BackendUnavailable("closing"))
            if line.timer is not None:
                line.timer.cancel()
        self.depth = self._configured_depth

    # -- internals -----------------------------------------------------------

    def _serve_from_ahead(
        self, key: _Key, line: _Line, limit: int, by_consumer: bool = False
    ) -> list[Taken]:
        ahead = line.ahead
        if not ahead:
            return []
        now = asyncio.get_running_loop().time()
        handed: list[Ahead] = []
        while ahead and len(handed) < limit:
            item = ahead.popleft()
            if item.hand_out_by <= now:
                _too_late(key, item)
            elif item.deadline > now:
                handed.append(item)
        mono = time.monotonic()  # Taken's clock (``Ahead``'s is the loop's)
        if by_consumer and handed and handed[0].lease:
            leases = [consumer_lease(item) for item in handed]
        else:
            if handed and handed[0].lease:
                self._ack(key[0], key[1], handed)
            leases = [""] * len(handed)
        served = [
            Taken(item.payload, item.deadline - now, lease, mono + item.deadline - now)
            for item, lease in zip(handed, leases, strict=True)
        ]
        self._count_pulls(line, now, len(served))
        if ahead:
            self._wake(key[0], key[1])  # one wake-up serves one pull
        if not line.busy and len(ahead) <= self.depth // 2 and self._top_up(key, line) > 0:
            self._start_round(key, line)  # before the next pulls come
        return served

    def _count_pulls(self, line: _Line, now: float, count: int) -> None:
        if now - line.window_start > self.linger_s:
            recent = now - line.window_start < 2 * self.linger_s
            line.pulls_before = line.pulls if recent else 0
            line.pulls, line.window_start = 0, now
        line.pulls += count
        line.last_used = now

    def _takes_ahead(self, key: _Key) -> bool:
        """Whether this line's channel is one to take ahead of (while it is busy)."""
        return self.depth > 0 and _is_leased_line(key)

    def _top_up(self, key: _Key, line: _Line) -> int:
        """How many more to take than asked for: none unless the channel is busy."""
        if not self._takes_ahead(key):
            return 0
        now = asyncio.get_running_loop().time()
        recent = line.pulls + line.pulls_before if now - line.window_start <= self.linger_s else 0
        if recent < BUSY_PULLS:
            return 0
        return max(0, min(self.depth, recent) - len(line.ahead))

    def _start_round(self, key: _Key, line: _Line) -> None:
        line.busy = True  # at once: a take coming before the task runs joins it
        line.generation = self._flushes.get(key[0], 0)
        self._start(self._round(key, line))

    async def _round(self, key: _Key, line: _Line) -> None:
        """One statement for the queued takes (and a top-up); theirs, in order.

        A task of its own: a caller cancelled meanwhile leaves its share in ``ahead``.
        """
        ns, channel, hold = key
        queued, line.waiters = line.waiters, []
        try:
            want = sum(waiter[0] for waiter in queued) + self._top_up(key, line)
            if want > 0:
                taken = await self._take_now(ns, channel, want, hold)
                line.ahead.extend(taken)
                if taken:
                    line.last_used = asyncio.get_running_loop().time()
            for limit, by_consumer, future in queued:
                if not future.done():
                    future.set_result(self._serve_from_ahead(key, line, limit, by_consumer))
            if line.generation != self._flushes.get(ns, 0):
                line.ahead.clear()  # taken before a flush of this daemon's
            if line.ahead:
                self._wake(ns, channel)  # a pull that found nothing may wait in the router
        except asyncio.CancelledError:
            _fail(queued, BackendUnavailable("closing"))
            raise
        except Exception as exc:  # the callers hear of it; none may wait forever
            _fail(queued, exc if isinstance(exc, BackendError) else BackendError(str(exc)))
        finally:
            line.busy = False
            self._after_round(key, line)

    def _after_round(self, key: _Key, line: _Line) -> None:
        """Serve the takes that queued up meanwhile, or give them a round; keep the
        line while it may hold or take messages ahead."""
        while line.waiters and line.ahead:
            limit, by_consumer, future = line.waiters.pop(0)
            if not future.done():
                future.set_result(self._serve_from_ahead(key, line, limit, by_consumer))
        if line.busy:
            return
        if line.waiters:
            self._start_round(key, line)
        elif line.ahead or self._takes_ahead(key):
            if line.timer is None:
                loop = asyncio.get_running_loop()
                line.timer = loop.call_later(self.linger_s, self._tick, key)
        elif self._lines.get(key) is line:
            del self._lines[key]

    def _tick(self, key: _Key) -> None:
        """Every ``linger`` seconds while a line is kept: put back (or, on a line that is
        not taken ahead, drop) what no take wanted for that long; forget an idle line."""
        line = self._lines.get(key)
        if line is None:
            return
        line.timer = None
        idle_s = asyncio.get_running_loop().time() - line.last_used
        if line.busy or line.waiters:
            return  # the round re-arms the timer when it ends
        if idle_s < self.linger_s:
            pass
        elif line.ahead and _is_leased_line(key):
            items = list(line.ahead)
            line.ahead.clear()
            line.busy = True  # takes wait until they are back: order holds
            self._start(self._linger_back(key, line, items))
            return
        elif line.ahead:
            log.info("dropped %d messages of %s a cancelled take left", len(line.ahead), key[1])
            line.ahead.clear()
        elif idle_s >= 2 * self.linger_s:
            del self._lines[key]
            return
        line.timer = asyncio.get_running_loop().call_later(self.linger_s, self._tick, key)

    async def _linger_back(self, key: _Key, line: _Line, items: list[Ahead]) -> None:
        """Put back ``items``, taken out of the line, which is busy until they are."""
        try:
            await self._put_back(key[0], key[1], items)
        finally:
            line.busy = False
            self._after_round(key, line)

    async def _put_back(self, ns: str, channel: str, items: list[Ahead]) -> None:
        # Not retried, not kept: a statement that failed may have committed, and
        # serving its messages here as well would deliver them twice. Nothing is lost:
        # their leases lapse, and then any daemon takes them again.
        try:
            await self._give_back(ns, channel, items)
        except BackendError as exc:
            log.warning(
                "could not put back %d messages of %s taken ahead (they are taken again "
                "once their leases lapse): %s",
                len(items),
                channel,
                exc,
            )

    def _start(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def is_leased(channel: str, hold: bool) -> bool:
    """Whether takes of ``channel`` lease its messages (and leftovers go back to the
    database): a normal channel's, taken without ``hold`` (even once taking ahead is
    turned off). Process-specific channels are pushed, under their own counting."""
    return "!" not in channel and not hold


def consumer_lease(item: Ahead) -> str:
    """The lease a consumer acknowledges ``item`` by: ``<id>.<lease>``, both of which
    ``ack`` needs (a lease token names a take, not a message)."""
    return f"{item.id}.{item.lease}"


def _is_leased_line(key: _Key) -> bool:
    return is_leased(key[1], key[2])


def _too_late(key: _Key, item: Ahead) -> None:
    """A leased message kept past half its lease (the event loop was stalled): not
    handed out, since its lease might lapse before it is acknowledged. It is taken
    again (by any daemon) once the lease has lapsed."""
    log.warning("left message %d of %s to its lease: kept too long to hand out", item.id, key[1])


def _fail(waiters: list[_Waiter], exc: BackendError) -> None:
    for _, _, future in waiters:
        if not future.done():
            future.set_exception(exc)
