"""Takes for the PostgreSQL backend: batched per channel, and a few taken ahead.

A pull of a normal channel (a worker's ``receive``) needs its message deleted in the
database before it is handed out, or two daemons could hand out the same one. That
round trip sits between every message and the next ``receive`` of a worker, so a few
workers could not pull faster than a few thousand messages a second, whatever the
database's throughput. Two things take it off that path:

* Batching. Takes of one channel that come while one is under way wait for it, then
  go out together in one statement; each caller gets its share, in the order they came.
* Taking ahead. While a channel is being pulled busily (at least ``BUSY_PULLS`` pulls
  in the last ``linger`` seconds), a take also removes up to ``depth`` more messages,
  the channel's next ones, and keeps them here; the next pulls are served from them
  at once, and a background take tops them up when half are gone. They count against
  the channel's capacity for this daemon's senders (``waiting_ahead``). Messages taken
  ahead that no pull wanted for ``linger`` seconds, and all of them when the daemon
  stops, are put back under their old ids, so they keep their place in the queue and
  other daemons' workers get them. What a daemon killed outright had taken ahead (at
  most ``depth`` per busy channel) is lost, as a message on its way to a worker is:
  delivery is at most once. ``depth=0`` turns taking ahead off.

Messages are taken ahead only for normal channels and takes without ``hold``; a
caller that gives up (is cancelled) while its take is under way loses its share, as
it would lose the messages of a take of its own that committed before it gave up.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .base import BackendError, BackendUnavailable, Taken

__all__ = ["Ahead", "Takes"]

log = logging.getLogger("channels_broker.backends.postgres")

#: Pulls within ``linger`` seconds that make a channel busy enough to take ahead.
BUSY_PULLS = 2


@dataclass(slots=True)
class Ahead:
    """A message taken out of the database: its id (its place in the queue) and expiry."""

    id: int
    payload: bytes
    #: Event loop time at which it expires.
    deadline: float


#: Takes up to ``limit`` messages of (ns, channel), with or without ``hold``, oldest first.
TakeNow = Callable[[str, str, int, bool], Awaitable[list[Ahead]]]
#: Puts messages taken ahead back into (ns, channel) under their ids.
GiveBack = Callable[[str, str, list[Ahead]], Awaitable[None]]
#: Wakes one more pull of (ns, channel).
Wake = Callable[[str, str], None]
_Key = tuple[str, str, bool]
#: A take waiting for the one under way on its channel: its limit and its answer.
_Waiter = tuple[int, "asyncio.Future[list[Taken]]"]


@dataclass(slots=True)
class _Line:
    """One channel's takes: those waiting, the one under way, what was taken ahead."""

    may_take_ahead: bool
    waiters: list[_Waiter] = field(default_factory=list)
    #: A statement (a take, or putting messages back) is under way for this channel.
    busy: bool = False
    ahead: deque[Ahead] = field(default_factory=deque)
    #: Pulls served in the current and the previous ``linger`` window.
    pulls: int = 0
    pulls_before: int = 0
    window_start: float = 0.0
    last_pull: float = 0.0
    timer: asyncio.TimerHandle | None = None


class Takes:
    """Every take of one backend goes through here (see the module docstring)."""

    def __init__(
        self, take_now: TakeNow, give_back: GiveBack, wake: Wake, *, depth: int, linger_s: float
    ) -> None:
        self._take_now = take_now
        self._give_back = give_back
        self._wake = wake
        self.depth = depth
        self.linger_s = linger_s
        self._lines: dict[_Key, _Line] = {}
        #: Takes in the background (cancelled on close) and puts back (awaited).
        self._rounds: set[asyncio.Task[None]] = set()
        self._returns: set[asyncio.Task[None]] = set()

    def waiting_ahead(self, ns: str, channel: str) -> int:
        """How many of the channel's messages this daemon has taken ahead."""
        line = self._lines.get((ns, channel, False))
        return 0 if line is None else len(line.ahead)

    async def take(self, ns: str, channel: str, limit: int, hold: bool) -> list[Taken]:
        key = (ns, channel, hold)
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = _Line(self.depth > 0 and not hold and "!" not in channel)
        if line.timer is None:
            line.timer = asyncio.get_running_loop().call_later(self.linger_s, self._tick, key)
        if not line.waiters:
            served = self._serve_from_ahead(key, line, limit)
            if served:
                return served
        if line.busy or line.waiters:
            future: asyncio.Future[list[Taken]] = asyncio.get_running_loop().create_future()
            line.waiters.append((limit, future))
            return await future
        line.busy = True
        try:
            line.ahead.extend(await self._take_now(ns, channel, limit + self._top_up(line), hold))
            return self._serve_from_ahead(key, line, limit)
        finally:
            line.busy = False
            self._after_round(key, line)

    def forget(self, ns: str) -> None:
        """Drop what was taken ahead in ``ns`` (it was flushed)."""
        for (line_ns, _, _), line in self._lines.items():
            if line_ns == ns:
                line.ahead.clear()

    async def close(self) -> None:
        """Stop; put back what was taken ahead; takes still waiting fail."""
        rounds, self._rounds = list(self._rounds), set()
        for task in rounds:
            task.cancel()
        await asyncio.gather(*rounds, return_exceptions=True)
        lines, self._lines = self._lines, {}
        for (ns, channel, _), line in lines.items():
            _fail(line.waiters, BackendUnavailable("closing"))
            if line.timer is not None:
                line.timer.cancel()
            if line.ahead:
                await self._put_back(ns, channel, list(line.ahead))
        returns, self._returns = list(self._returns), set()
        await asyncio.gather(*returns, return_exceptions=True)

    # -- internals -----------------------------------------------------------

    def _serve_from_ahead(self, key: _Key, line: _Line, limit: int) -> list[Taken]:
        ahead = line.ahead
        if not ahead:
            return []
        now = asyncio.get_running_loop().time()
        served: list[Taken] = []
        while ahead and len(served) < limit:
            item = ahead.popleft()
            if item.deadline > now:
                served.append(Taken(item.payload, item.deadline - now))
        self._count_pulls(line, now, len(served))
        if ahead:
            self._wake(key[0], key[1])  # one wake-up serves one pull
        if not line.busy and len(ahead) <= self.depth // 2 and self._top_up(line) > 0:
            self._start(self._round(key, line), self._rounds)  # before the next pulls come
        return served

    def _count_pulls(self, line: _Line, now: float, count: int) -> None:
        if now - line.window_start > self.linger_s:
            recent = now - line.window_start < 2 * self.linger_s
            line.pulls_before = line.pulls if recent else 0
            line.pulls, line.window_start = 0, now
        line.pulls += count
        line.last_pull = now

    def _top_up(self, line: _Line) -> int:
        """How many more to take than asked for: none unless the channel is busy."""
        if not line.may_take_ahead:
            return 0
        now = asyncio.get_running_loop().time()
        recent = line.pulls + line.pulls_before if now - line.window_start <= self.linger_s else 0
        if recent < BUSY_PULLS:
            return 0
        return max(0, min(self.depth, recent) - len(line.ahead))

    def _after_round(self, key: _Key, line: _Line) -> None:
        """Serve the takes that queued up meanwhile from what came, or give them a round."""
        while line.waiters and line.ahead:
            limit, future = line.waiters.pop(0)
            if not future.done():
                future.set_result(self._serve_from_ahead(key, line, limit))
        if line.waiters and not line.busy:
            self._start(self._round(key, line), self._rounds)

    async def _round(self, key: _Key, line: _Line) -> None:
        """One statement for the queued takes (and a top-up); theirs, in order."""
        if line.busy or self._lines.get(key) is not line:
            return  # whoever is busy serves the queued takes when done
        ns, channel, hold = key
        line.busy = True
        queued, line.waiters = line.waiters, []
        try:
            want = sum(limit for limit, _ in queued) + self._top_up(line)
            if want > 0:
                line.ahead.extend(await self._take_now(ns, channel, want, hold))
            for limit, future in queued:
                if not future.done():
                    future.set_result(self._serve_from_ahead(key, line, limit))
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

    def _tick(self, key: _Key) -> None:
        """Every ``linger`` seconds while a channel is in use: put back what no pull
        wanted for that long; forget the channel once it is idle."""
        line = self._lines.get(key)
        if line is None:
            return
        line.timer = None
        loop = asyncio.get_running_loop()
        idle_s = loop.time() - line.last_pull
        if line.busy or line.waiters or idle_s < self.linger_s:
            pass
        elif line.ahead:
            items = list(line.ahead)
            line.ahead.clear()
            line.busy = True  # takes wait until they are back: order holds
            self._start(self._linger_back(key, line, items), self._returns)
        elif idle_s >= 2 * self.linger_s:
            del self._lines[key]
            return
        line.timer = loop.call_later(self.linger_s, self._tick, key)

    async def _linger_back(self, key: _Key, line: _Line, items: list[Ahead]) -> None:
        try:
            await self._give_back(key[0], key[1], items)
        except BackendError as exc:
            # Nothing came meanwhile (takes wait while busy): they are still the oldest.
            line.ahead.extendleft(reversed(items))
            log.warning(
                "could not put back %d messages of %s (will retry): %s", len(items), key[1], exc
            )
        finally:
            line.busy = False
        self._after_round(key, line)

    async def _put_back(self, ns: str, channel: str, items: list[Ahead]) -> None:
        try:
            await self._give_back(ns, channel, items)
        except BackendError as exc:
            log.warning(
                "lost %d messages of %s taken ahead: could not put them back: %s",
                len(items),
                channel,
                exc,
            )

    def _start(self, work: Awaitable[None], tasks: set[asyncio.Task[None]]) -> None:
        task = asyncio.ensure_future(work)
        tasks.add(task)
        task.add_done_callback(tasks.discard)


def _fail(waiters: list[_Waiter], exc: BackendError) -> None:
    for _, future in waiters:
        if not future.done():
            future.set_exception(exc)
