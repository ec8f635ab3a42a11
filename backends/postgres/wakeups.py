"""Wake-ups of the PostgreSQL backend: what this daemon watches, and the re-check.

A send wakes this daemon's router at once, and ``pg_notify`` wakes the others through
their ``Listener``. Nothing is lost when a notification is: every ``recheck_interval``
seconds (and right after the listener reconnects) one query finds the waiting
channels of what this daemon watches and wakes them, so a missed notification delays
a message by at most that interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from backends import BackendError, WakeupCallback
from protocol import client_id_of, is_process_specific

from .listener import Listener
from .pool import Database

__all__ = ["Wakeups"]

log = logging.getLogger("channels_broker.backends.postgres")


class Wakeups:
    """The watched channels and client ids, woken by notification or by re-check."""

    def __init__(self, db: Database, recheck_sql: str, wake: WakeupCallback) -> None:
        self._db = db
        self._recheck_sql = recheck_sql
        self._wake = wake
        self._watched: dict[tuple[str, str], int] = {}
        self._recheck_now = asyncio.Event()

    def watch(self, ns: str, key: str) -> None:
        """Wake the router for notifications about this channel or client id."""
        self._watched[(ns, key)] = self._watched.get((ns, key), 0) + 1

    def unwatch(self, ns: str, key: str) -> None:
        """Undo one ``watch``."""
        count = self._watched.get((ns, key), 0)
        if count <= 1:
            self._watched.pop((ns, key), None)
        else:
            self._watched[(ns, key)] = count - 1

    def wake_if_watched(self, ns: str, channel: str) -> None:
        """A notification's channel: wake it if it, or its client, is watched."""
        key = client_id_of(channel) if is_process_specific(channel) else channel
        if (ns, key) in self._watched:
            self._wake(ns, channel)

    def reset(self) -> None:
        """Forget a pending re-check request: the backend (re)connects, maybe in
        another event loop, which an ``asyncio.Event`` once waited on is bound to."""
        self._recheck_now = asyncio.Event()

    def recheck_soon(self) -> None:
        """Re-check now rather than at the next interval (the listener is back)."""
        self._recheck_now.set()

    async def recheck_forever(
        self, listener: Listener, interval_s: float, timeout_s: float
    ) -> None:
        """Every ``interval_s`` (or when the listener is back): wake what has messages."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval_s):
                    await self._recheck_now.wait()
            self._recheck_now.clear()
            await listener.ping(timeout_s)
            try:
                await self._recheck()
            except BackendError as exc:
                log.debug("re-check failed: %s", exc)

    async def _recheck(self) -> None:
        if not self._watched:
            return
        spaces = [ns for ns, _ in self._watched]
        keys = [key for _, key in self._watched]
        rows = await self._db.fetch(self._recheck_sql, spaces, keys)
        for ns, channel in rows:
            self.wake_if_watched(ns, channel)
