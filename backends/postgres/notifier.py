"""The PostgreSQL backend's notifications to other daemons, sent after the commit.

PostgreSQL serializes the commits of all transactions that NOTIFY, across the server:
each holds a lock from its pre-commit until its commit is done, which with
``synchronous_commit=on`` includes the wait for the disk. Notifying inside the
transactions that store messages would make every send on the server wait for every
other's disk write in turn (and a group send's slices hold up everyone's sends). So
those transactions notify nobody: once one has committed, its channels go to the
``Notifier``, which sends the notifications in a transaction of their own that does
not wait for the disk (the ``notify`` function), those that come meanwhile together.
This daemon's own router is woken at once, without them; a notification lost to a
daemon killed before sending it is made up for by the other daemons' re-check
(``wakeups``), within ``recheck_interval``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from backends import BackendError
from protocol import client_id_of, is_process_specific

from .pool import Database

__all__ = ["NOTIFY_CHANNELS", "Notifier", "payloads"]

log = logging.getLogger("channels_broker.backends.postgres")

#: Channel names per notification: names are under 100 characters, so a notification
#: stays far below PostgreSQL's 8000-byte limit.
NOTIFY_CHANNELS = 60


class Notifier:
    """Sends notifications of stored messages in the background, many per statement."""

    def __init__(self, db: Database, notify_sql: str) -> None:
        self._db = db
        self._sql = notify_sql
        #: (namespace, channel) to notify of, in the order they came, once each.
        self._pending: dict[tuple[str, str], None] = {}
        self._task: asyncio.Task[None] | None = None

    def add(self, ns: str, channels: Iterable[str]) -> None:
        """Messages of ``channels`` were committed: tell the other daemons."""
        self._pending.update(((ns, channel), None) for channel in channels)
        if self._pending and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._send_all())

    async def close(self) -> None:
        """Send what is pending (best effort)."""
        task = self._task
        if task is not None and not task.done():
            await asyncio.shield(task)

    async def _send_all(self) -> None:
        while self._pending:
            batch, self._pending = list(self._pending), {}
            try:
                await self._db.execute(self._sql, payloads(batch))
            except BackendError as exc:  # the re-check finds those messages anyway
                log.debug("could not notify of %d channels: %s", len(batch), exc)


def payloads(channels: Iterable[tuple[str, str]]) -> list[str]:
    """Notification payloads, "<ns> <channel> [<channel>...]": one per normal channel,
    and per client one for its channels (``NOTIFY_CHANNELS`` at most each), as the
    listeners watch a normal channel or a client."""
    by_target: dict[tuple[str, str], list[str]] = {}
    for ns, channel in channels:
        target = client_id_of(channel) if is_process_specific(channel) else channel
        by_target.setdefault((ns, target), []).append(channel)
    found = []
    for (ns, _), names in by_target.items():
        for start in range(0, len(names), NOTIFY_CHANNELS):
            found.append(" ".join([ns, *names[start : start + NOTIFY_CHANNELS]]))
    return found
