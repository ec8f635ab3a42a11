"""The statements behind the PostgreSQL backend's takes and releases.

``Takes`` (batching, taking ahead) and ``ReleaseWriter`` decide when to take and
release; this runs their statements, and ``take_many`` (several channels at once).
Payloads taken recently come back as one object per value (``interned``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from backends import Taken, WakeupCallback

from .pool import Database
from .statements import Statements
from .take_ahead import Ahead

__all__ = ["Taker"]

#: Payloads up to this size taken recently are shared by identity (see ``interned``):
#: a group send's payload is usually small, and hashing a large one costs more than
#: the frames it would save.
INTERN_MAX_BYTES = 64 * 1024
INTERN_ENTRIES = 1024


class Taker:
    """Takes messages out of the database, puts back what was taken ahead, releases."""

    def __init__(self, db: Database, sql: Statements, wake: WakeupCallback) -> None:
        self._db = db
        self._sql = sql
        self._wake = wake
        self._payloads: dict[bytes, bytes] = {}

    async def take_now(self, ns: str, channel: str, limit: int, hold: bool) -> list[Ahead]:
        """``Takes``' one statement for a channel: up to ``limit`` messages, oldest first."""
        rows = await self._db.fetch(self._sql.take, ns, channel, limit, hold)
        if rows and rows[0][3]:
            # More wait: wake the next puller too. One notification (or re-check) may
            # stand for many messages, and each wake-up serves one pull.
            self._wake(ns, channel)
        now = asyncio.get_running_loop().time()
        return [Ahead(row[0], self.interned(row[1]), now + max(0.0, row[2])) for row in rows]

    async def take_many(
        self, ns: str, channels: Sequence[str], limit: int, hold: bool
    ) -> dict[str, list[Taken]]:
        """Up to ``limit`` messages of each channel, in one statement."""
        rows = await self._db.fetch(self._sql.take_many, ns, list(channels), limit, hold)
        taken: dict[str, list[Taken]] = {channel: [] for channel in channels}
        for channel, payload, ttl_s in rows:
            taken[channel].append(Taken(self.interned(payload), max(0.0, ttl_s)))
        return taken

    async def give_back(self, ns: str, channel: str, items: list[Ahead]) -> None:
        """Put messages taken ahead back under their ids, with what is left of their lives."""
        now = asyncio.get_running_loop().time()
        args = (
            ns,
            channel,
            [item.id for item in items],
            [item.payload for item in items],
            [item.deadline - now for item in items],
        )
        await self._db.execute(self._sql.give_back, *args)

    async def write_releases(self, releases: list[tuple[str, str, int]]) -> None:
        """``ReleaseWriter``'s one statement: (namespace, channel, count) each."""
        args = ([r[0] for r in releases], [r[1] for r in releases], [r[2] for r in releases])
        await self._db.execute(self._sql.release_many, *args)

    def interned(self, payload: bytes) -> bytes:
        """One object for equal payloads: members of one connection then share a PUSH.

        A group send's copies come back from each member's take as separate objects;
        the connection merges deliveries by payload identity, as with ``memory://``.
        """
        if len(payload) > INTERN_MAX_BYTES:
            return payload
        same = self._payloads.get(payload)
        if same is not None:
            return same
        if len(self._payloads) >= INTERN_ENTRIES:
            self._payloads.clear()
        self._payloads[payload] = payload
        return payload
