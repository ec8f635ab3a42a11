"""Fewer round trips for the PostgreSQL backend: releases and acknowledgements,
written in batches.

A daemon spends its time on system calls, and a round trip to PostgreSQL costs two, so
releases (a client acknowledging pushed messages) are written in the background, all
those made meanwhile in one statement. Senders ask ``written`` first, so a release is
never pending when this daemon checks that channel's capacity. Acknowledgements (a
leased message that the consumer's layer acknowledged, or that the daemon handed out
to a layer that does not acknowledge, is deleted) are written in the background too,
a moment later (``AckWriter``). (Takes are batched by ``take_ahead``, sends by
``group_commit``.)
"""

from __future__ import annotations

import asyncio
import logging
import math
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
#: of messages, which the receiving layer drops by their message ids). A consumer's
#: acknowledgements wait as long, to go many to a statement: the lease runs seconds.
ACK_DELAY_S = 0.02
#: Seconds between tries of acknowledgements PostgreSQL did not take (it was away).
ACK_RETRY_S = 0.2


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
    """Deletes leased messages that were handed out (or that their consumer
    acknowledged: ``LeasesToConsumers``) in the background, each ``delay_s`` after
    (``ACK_DELAY_S``), those due together in one statement, one statement at a time.
    A statement that fails is tried again every ``ACK_RETRY_S`` for ``retry_for_s``
    (the lease): deleting twice is harmless, and a lease left to lapse is a redelivery,
    perhaps to another process."""

    def __init__(self, write: WriteAcks, retry_for_s: float, delay_s: float = ACK_DELAY_S) -> None:
        self._write = write
        self._retry_for_s = retry_for_s
        self._delay_s = delay_s
        #: (loop time due, loop time past which it is not tried again, ack), in the
        #: order they came.
        self._pending: list[tuple[float, float, Ack]] = []
        self._timer: asyncio.TimerHandle | None = None
        #: Loop time ``_timer`` fires at.
        self._timer_at = math.inf
        self._task: asyncio.Task[None] | None = None
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None

    def exclusive(self) -> asyncio.Lock:
        """Held while a statement of this writer runs: a renewal of the same rows takes
        it too. Both lock rows ``FOR UPDATE SKIP LOCKED``, so an acknowledgement that
        met a renewal under way would skip its row and leave it leased, renewed."""
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    def add(self, ns: str, channel: str, ended: Iterable[tuple[int, int]]) -> None:
        """``ended``: (id, lease) of each message of ``channel`` just handed out, or
        acknowledged by its consumer."""
        due = asyncio.get_running_loop().time() + self._delay_s
        until = due + self._retry_for_s
        self._pending.extend((due, until, (ns, channel, id_, lease)) for id_, lease in ended)
        self._wake_at(due)

    async def close(self) -> None:
        """Write every pending acknowledgement now (best effort, once): the daemon is
        stopping, after its connections, and what it handed out has left."""
        if self._task is not None and not self._task.done():
            await asyncio.shield(self._task)
        self._cancel_timer()
        if self._pending:
            pending, self._pending = self._pending, []
            try:
                async with self.exclusive():
                    await self._write(_acks(pending))
            except BackendError as exc:
                log.warning("could not delete %d messages handed out: %s", len(pending), exc)

    def _wake_at(self, due: float) -> None:
        """Have ``_write_due`` run at ``due`` (or sooner); a write under way re-arms
        this when it ends, so writes never overlap."""
        if self._task is not None and not self._task.done():
            return
        if self._timer is not None and self._timer_at <= due:
            return
        self._cancel_timer()
        self._timer_at = due
        self._timer = asyncio.get_running_loop().call_at(due, self._start)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = math.inf

    def _start(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        self._task = asyncio.get_running_loop().create_task(self._write_due())

    async def _write_due(self) -> None:
        loop = asyncio.get_running_loop()
        # A timer may fire a hair early: what is due within a millisecond goes too.
        due_by = loop.time() + 0.001
        batch = [item for item in self._pending if item[0] <= due_by]
        if batch:
            self._pending = [item for item in self._pending if item[0] > due_by]
            try:
                async with self.exclusive():
                    await self._write(_acks(batch))
            except BackendError as exc:
                self._retry(batch, exc)
        self._task = None
        if self._pending:
            self._wake_at(min(item[0] for item in self._pending))

    def _retry(self, batch: list[tuple[float, float, Ack]], exc: BackendError) -> None:
        now = asyncio.get_running_loop().time()
        again = [(now + ACK_RETRY_S, until, ack) for _, until, ack in batch if until > now]
        self._pending += again
        log.warning(
            "could not delete %d messages handed out (%d tried again; the others come "
            "again once their leases lapse): %s",
            len(batch),
            len(again),
            exc,
        )


def _acks(items: list[tuple[float, float, Ack]]) -> list[Ack]:
    return [ack for _, _, ack in items]
