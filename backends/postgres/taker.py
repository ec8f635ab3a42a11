"""The statements behind the PostgreSQL backend's takes, acknowledgements and releases.

``Takes`` (batching, taking ahead, leases), ``AckWriter`` and ``ReleaseWriter`` decide
when to take, acknowledge and release; this runs their statements, and ``take_many``
(several channels at once). Payloads taken recently come back as one object per value
(``interned``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Sequence
from typing import Any

from backends import Taken, WakeupCallback

from .batching import Ack, AckWriter
from .consumer_leases import ConsumerLeases, parse_consumer_lease
from .pool import Database
from .statements import Statements
from .take_ahead import Ahead, is_leased

__all__ = ["Taker"]

log = logging.getLogger("channels_broker.backends.postgres")

#: Payloads up to this size taken recently are shared by identity (see ``interned``):
#: a group send's payload is usually small, and hashing a large one costs more than
#: the frames it would save.
INTERN_MAX_BYTES = 64 * 1024
INTERN_ENTRIES = 1024


class Taker:
    """Takes messages from the database (leased, or deleted), acknowledges those handed
    out, puts back what was taken ahead, releases."""

    def __init__(
        self, db: Database, sql: Statements, wake: WakeupCallback, *, lease_s: float
    ) -> None:
        self._db = db
        self._sql = sql
        self._wake = wake
        self._lease_s = lease_s
        self._payloads: dict[bytes, bytes] = {}
        #: Messages this daemon took again after their lease lapsed (``lease``).
        self.given_back_total = 0
        self.acks = AckWriter(self.write_acks, retry_for_s=lease_s)
        #: Consumers' leases delivered and not yet acknowledged: renewed meanwhile.
        self.held = ConsumerLeases(db, sql, lease_s, self.acks)

    async def take_now(self, ns: str, channel: str, limit: int, hold: bool) -> list[Ahead]:
        """``Takes``' one statement for a channel: up to ``limit`` messages, oldest first,
        leased to this daemon if the channel's are (``is_leased``), else deleted."""
        if not is_leased(channel, hold):
            rows = await self._db.fetch(self._sql.take, ns, channel, limit, hold)
            return self._taken(ns, channel, rows, 0, math.inf)
        # A token per take: a lease that lapsed and was taken again (perhaps by this
        # daemon) is never acknowledged or put back under the old one.
        lease = secrets.randbits(63) or 1
        started = asyncio.get_running_loop().time()
        rows = await self._db.fetch(self._sql.lease, ns, channel, limit, lease, self._lease_s)
        # Taken again after its lease lapsed: its consumer (or daemon) never ended it.
        self.given_back_total += sum(1 for row in rows if row[4])
        # The lease began after ``started`` in the database: half of it from then on
        # is surely within it, and the other half is left for the acknowledgement.
        return self._taken(ns, channel, rows, lease, started + self._lease_s / 2)

    def _taken(
        self, ns: str, channel: str, rows: list[Any], lease: int, hand_out_by: float
    ) -> list[Ahead]:
        if rows and rows[0][3]:
            # More wait: wake the next puller too. One notification (or re-check) may
            # stand for many messages, and each wake-up serves one pull.
            self._wake(ns, channel)
        now = asyncio.get_running_loop().time()
        return [
            Ahead(row[0], self.interned(row[1]), now + max(0.0, row[2]), lease, hand_out_by)
            for row in rows
        ]

    def acknowledge(self, ns: str, channel: str, handed: list[Ahead]) -> None:
        """Leased messages of ``channel`` were handed out: delete them (in the background)."""
        self.acks.add(ns, channel, ((item.id, item.lease) for item in handed))

    def consumed(self, ns: str, channel: str, leases: Sequence[str]) -> None:
        """A consumer received the messages of these leases (``consumer_lease``):
        delete them, with the other acknowledgements due, and renew them no more. A
        lease not of that form is ignored; one of a message gone or taken again matches
        nothing in ``ack``."""
        self.held.release(ns, channel, leases)
        acked = [parsed for lease in leases if (parsed := parse_consumer_lease(lease))]
        if len(acked) < len(leases):
            log.debug("ignored %d malformed leases of %s", len(leases) - len(acked), channel)
        if acked:
            self.acks.add(ns, channel, acked)

    async def close(self) -> None:
        """Stop renewing consumers' leases; write the acknowledgements due (best effort)."""
        await self.held.close()
        await self.acks.close()

    async def write_acks(self, acks: list[Ack]) -> None:
        """``AckWriter``'s one statement: (namespace, channel, id, lease) each."""
        columns = ([a[0] for a in acks], [a[1] for a in acks], [a[2] for a in acks])
        await self._db.execute(self._sql.ack, *columns, [a[3] for a in acks])

    async def take_many(
        self, ns: str, channels: Sequence[str], limit: int, hold: bool
    ) -> dict[str, list[Taken]]:
        """Up to ``limit`` messages of each channel, in one statement."""
        rows = await self._db.fetch(self._sql.take_many, ns, list(channels), limit, hold)
        taken: dict[str, list[Taken]] = {channel: [] for channel in channels}
        now = time.monotonic()
        for channel, payload, ttl_s in rows:
            ttl_s = max(0.0, ttl_s)
            taken[channel].append(Taken(self.interned(payload), ttl_s, "", now + ttl_s))
        return taken

    async def take_pushed(
        self, ns: str, channels: Sequence[str], limit: int, lease: int
    ) -> dict[str, list[Taken]]:
        """Up to ``limit`` messages of each channel for a push, leased to this daemon's
        ``lease`` until acknowledged (``pushed``), counted as held; one statement."""
        args = (ns, list(channels), limit, lease, self._lease_s)
        rows = await self._db.fetch(self._sql.push_take, *args)
        taken: dict[str, list[Taken]] = {channel: [] for channel in channels}
        now = time.monotonic()
        for channel, id_, payload, ttl_s in rows:
            ttl_s = max(0.0, ttl_s)
            item = Taken(self.interned(payload), ttl_s, f"{id_}.{lease}", now + ttl_s)
            taken[channel].append(item)
        return taken

    async def give_back(self, ns: str, channel: str, items: list[Ahead]) -> None:
        """End the leases of messages taken ahead: they wait in their places again."""
        ids, leases = [item.id for item in items], [item.lease for item in items]
        await self._db.execute(self._sql.unlease, ns, channel, ids, leases)

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
