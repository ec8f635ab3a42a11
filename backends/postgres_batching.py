"""Fewer round trips for the PostgreSQL backend: takes of one channel and releases, batched.

A daemon spends its time on system calls, a round trip to PostgreSQL costs two, and the
database serializes the writers of one counter row anyway, so:

* ``TakeBatcher``: takes of one channel that come while one is under way (several
  workers of this daemon pulling one channel) wait for it, then go out together in one
  statement; each caller gets its share, in the order they came.
* ``ReleaseWriter``: releases (a client acknowledging pushed messages) are written in
  the background, all those made meanwhile in one statement. Senders ask ``written``
  first, so a release is never pending when this daemon checks that channel's capacity.

A caller that gives up (is cancelled) while its take is under way loses its share, as
it would lose the messages of a take of its own that committed before it gave up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from .base import BackendError, BackendUnavailable, Taken

__all__ = ["ReleaseWriter", "TakeBatcher"]

log = logging.getLogger("channels_broker.backends.postgres")

#: Takes up to ``limit`` messages of (ns, channel), with or without ``hold``.
TakeNow = Callable[[str, str, int, bool], Awaitable[list[Taken]]]
#: Writes releases: (namespace, channel, count), sorted by namespace and channel.
WriteReleases = Callable[[list[tuple[str, str, int]]], Awaitable[None]]
#: A take waiting for the one under way on its channel: its limit and its answer.
_Waiter = tuple[int, "asyncio.Future[list[Taken]]"]


class TakeBatcher:
    """Coalesces concurrent takes of one channel into one statement per round."""

    def __init__(self, take_now: TakeNow) -> None:
        self._take_now = take_now
        #: Channels with a take under way -> the takes waiting for the next round.
        self._queues: dict[tuple[str, str, bool], list[_Waiter]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def take(self, ns: str, channel: str, limit: int, hold: bool) -> list[Taken]:
        key = (ns, channel, hold)
        queue = self._queues.get(key)
        if queue is not None:
            future: asyncio.Future[list[Taken]] = asyncio.get_running_loop().create_future()
            queue.append((limit, future))
            return await future
        self._queues[key] = []
        try:
            return await self._take_now(ns, channel, limit, hold)
        finally:
            queued = self._queues.pop(key)
            if queued:
                self._queues[key] = []  # those coming now wait for the next round
                task = asyncio.get_running_loop().create_task(self._serve(key, queued))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop serving; takes still waiting fail with ``BackendUnavailable``."""
        tasks, self._tasks = list(self._tasks), set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, key: tuple[str, str, bool], queued: list[_Waiter]) -> None:
        """One round trip per round of queued takes; ``key`` stays queued until done."""
        ns, channel, hold = key
        try:
            while queued:
                try:
                    taken = await self._take_now(ns, channel, sum(n for n, _ in queued), hold)
                except BackendError as exc:
                    _fail(queued, exc)
                else:
                    for limit, future in queued:
                        share, taken = taken[:limit], taken[limit:]
                        if not future.done():
                            future.set_result(share)
                queued = self._queues[key]
                self._queues[key] = []
        finally:
            _fail([*queued, *self._queues.pop(key, [])], BackendUnavailable("closing"))


class ReleaseWriter:
    """Writes releases in the background, those made meanwhile together."""

    def __init__(self, write: WriteReleases) -> None:
        self._write = write
        self._pending: dict[tuple[str, str], int] = {}
        self._writing: dict[tuple[str, str], int] = {}
        self._task: asyncio.Task[None] | None = None

    def add(self, ns: str, channel: str, count: int) -> None:
        key = (ns, channel)
        self._pending[key] = self._pending.get(key, 0) + count
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._write_all())

    async def written(self, ns: str, channels: Sequence[str] | None = None) -> None:
        """Wait until the releases of ``channels`` (any of ``ns`` if None) are written."""
        task = self._task
        if task is None or task.done():
            return
        pending = self._pending.keys() | self._writing.keys()
        if channels is None:
            if not any(key[0] == ns for key in pending):
                return
        elif not any((ns, channel) in pending for channel in channels):
            return
        await asyncio.shield(task)

    async def close(self) -> None:
        """Write what is pending (best effort)."""
        task = self._task
        if task is not None and not task.done():
            await asyncio.shield(task)

    async def _write_all(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, {}
            self._writing = batch
            try:
                await self._write([(*key, batch[key]) for key in sorted(batch)])
            except BackendError as exc:
                log.warning(
                    "could not release %d held messages (they lapse with their expiry): %s",
                    sum(batch.values()),
                    exc,
                )
        self._writing = {}


def _fail(waiters: list[_Waiter], exc: BackendError) -> None:
    for _, future in waiters:
        if not future.done():
            future.set_exception(exc)
