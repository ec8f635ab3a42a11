"""Fewer round trips for the PostgreSQL backend: releases, written in batches.

A daemon spends its time on system calls, and a round trip to PostgreSQL costs two, so
releases (a client acknowledging pushed messages) are written in the background, all
those made meanwhile in one statement. Senders ask ``written`` first, so a release is
never pending when this daemon checks that channel's capacity. (Takes are batched by
``take_ahead``.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from backends import BackendError

__all__ = ["ReleaseWriter"]

log = logging.getLogger("channels_broker.backends.postgres")

#: Writes releases: (namespace, channel, count), sorted by namespace and channel.
WriteReleases = Callable[[list[tuple[str, str, int]]], Awaitable[None]]


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
