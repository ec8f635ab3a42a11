"""Fewer round trips for the PostgreSQL backend: releases and acknowledgements,
written in batches.

A daemon spends its time on system calls, and a round trip to PostgreSQL costs two, so
releases (a client acknowledging pushed messages) are written in the background, all
those made meanwhile in one statement. Senders ask ``written`` first, so a release is
never pending when this daemon checks that channel's capacity. Acknowledgements (a
leased message handed out to a worker is deleted) are written in the background too,
a moment after the handing out (``AckWriter``). (Takes are batched by ``take_ahead``,
sends by ``group_commit``.)
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence

from backends import BackendError

__all__ = ["ACK_DELAY_S", "AckWriter", "ReleaseWriter"]

log = logging.getLogger("channels_broker.backends.postgres")

#: Writes releases: (namespace, channel, count), sorted by namespace and channel.
WriteReleases = Callable[[list[tuple[str, str, int]]], Awaitable[None]]
#: A leased message handed out: (namespace, channel, id, lease).
Ack = tuple[str, str, int, int]
#: Deletes leased messages that were handed out.
WriteAcks = Callable[[list[Ack]], Awaitable[None]]

#: A message handed out is deleted no sooner than this after: the daemon writes what a
#: pass over a connection handed out at the end of that pass, and a pass that waits
#: for the database (another pull's take) may take a few milliseconds. Deleted before
#: its DELIVER has left, a message would be lost to a kill in between; deleted later,
#: it is delivered again if the daemon is killed meanwhile (at most this long's worth
#: of messages, which the receiving layer drops by their message ids).
ACK_DELAY_S = 0.02


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


class AckWriter:
    """Deletes leased messages that were handed out, in the background: each no sooner
    than ``delay_s`` after it was (``ACK_DELAY_S``), those due together in one statement."""

    def __init__(self, write: WriteAcks, delay_s: float = ACK_DELAY_S) -> None:
        self._write = write
        self._delay_s = delay_s
        #: (loop time handed out, ack), oldest first.
        self._pending: deque[tuple[float, Ack]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    def add(self, ns: str, channel: str, handed: Iterable[tuple[int, int]]) -> None:
        """``handed``: (id, lease) of each message of ``channel`` just handed out."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._pending.extend((now, (ns, channel, id_, lease)) for id_, lease in handed)
        if self._timer is None and (self._task is None or self._task.done()):
            self._timer = loop.call_later(self._delay_s, self._start)

    async def close(self) -> None:
        """Write every pending acknowledgement now (best effort): the daemon is stopping,
        after its connections, and what it handed out has left."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None and not self._task.done():
            await asyncio.shield(self._task)
        if self._pending:
            await self._write_batch([ack for _, ack in self._pending])
            self._pending.clear()

    def _start(self) -> None:
        self._timer = None
        self._task = asyncio.get_running_loop().create_task(self._write_due())

    async def _write_due(self) -> None:
        loop = asyncio.get_running_loop()
        # A timer may fire a hair early: what is due within a millisecond goes too.
        due_by = loop.time() - self._delay_s + 0.001
        batch: list[Ack] = []
        while self._pending and self._pending[0][0] <= due_by:
            batch.append(self._pending.popleft()[1])
        if batch:
            await self._write_batch(batch)
        if self._pending:
            wait_s = self._pending[0][0] + self._delay_s - loop.time()
            self._timer = loop.call_later(max(0.0, wait_s), self._start)

    async def _write_batch(self, batch: list[Ack]) -> None:
        try:
            await self._write(batch)
        except BackendError as exc:
            log.warning(
                "could not delete %d messages handed out (they come again once their "
                "leases lapse): %s",
                len(batch),
                exc,
            )
