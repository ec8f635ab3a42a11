"""Sends of the PostgreSQL backend: one message, or several in one call.

A message for a process-specific channel whose owner is connected to this daemon,
with nothing of that channel waiting or held in the database, is not stored to wait:
the round trip that checks this (``push_direct``) writes it leased to this daemon
(``pushed``: it outlives a killed daemon) and hands it back for the daemon to push
(``DirectPushes``), which saves the notification and the take.
Every other send is stored with those of other clients that come meanwhile, in one
transaction (``group_commit``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from backends import CapacityOf
from protocol import ttl_ms

from .batching import ReleaseWriter
from .group_commit import SendBatches, client_of
from .pool import Database
from .room import Room
from .statements import Statements

__all__ = ["Sends", "Stored"]

#: Messages of (namespace, channels) were committed: wake this daemon's pulls and
#: pushes for them (one wake-up per name given), and notify the other daemons.
Stored = Callable[[str, Sequence[str]], None]

#: What ``send_direct`` answers.
_REFUSED, _STORED, _SENT_DIRECT = 0, 1, 2


class Sends:
    """``send`` and ``send_many``: a direct push's check, or a share of a group commit."""

    def __init__(
        self,
        db: Database,
        sql: Statements,
        releases: ReleaseWriter,
        room: Room,
        stored: Stored,
    ) -> None:
        self._db = db
        self._sql = sql
        self._releases = releases
        self._room = room
        self._stored = stored
        self.batches = SendBatches(db, sql.send_batch, sql.send)

    async def send(
        self, ns: str, channel: str, payload: bytes, capacity: int, expiry_s: float
    ) -> bool:
        """Append unless full, or push it at once if the daemon can and nothing of
        the channel waits; False when full."""
        pushes, capacities = self._room.pushes, [self._room.less_ahead(ns, channel, capacity)]
        direct = [] if pushes is None else pushes.pushable(ns, [channel], capacities, expiry_s)
        capacity = capacities[0]
        if capacity < 1:
            return False
        with self._room.given_back_on_error(ns, direct):
            await self._releases.written(ns, [channel])
            if not direct:
                return await self._store(ns, channel, payload, capacity, expiry_s)
            lease = self._room.leases.new_lease()
            outcome = await self._send_direct(ns, channel, payload, capacity, expiry_s, lease)
        if pushes is not None:
            if outcome != _SENT_DIRECT:
                pushes.unreserve(ns, direct)
            elif self._pushed(ns, channel, payload, ttl_ms(expiry_s), lease):
                return True
            else:  # its owner left meanwhile (and its count with it): store it
                return await self._store(ns, channel, payload, capacity, expiry_s)
        if outcome == _STORED:
            self._stored(ns, [channel])
        return outcome != _REFUSED

    async def send_many(
        self,
        ns: str,
        items: Sequence[tuple[str, bytes]],
        capacity_of: CapacityOf,
        expiry_s: float,
    ) -> list[int]:
        """Send several messages in order in one call; return the indexes refused as full."""
        channels = [channel for channel, _ in items]
        capacities = await capacity_of.all_of(channels)
        await self._releases.written(ns, channels)
        room = self._room
        sends = [
            (c, payload, room.of(ns, c, n))
            for (c, payload), n in zip(items, capacities, strict=True)
        ]
        refused = await self.batches.send(ns, sends, expiry_s)
        refused_set = set(refused)
        # One wake-up per message: each may serve a pull.
        self._stored(ns, [c for n, (c, _) in enumerate(items) if n not in refused_set])
        return refused

    async def _store(
        self, ns: str, channel: str, payload: bytes, capacity: int, expiry_s: float
    ) -> bool:
        """Store one message with the sends that come meanwhile; False when full."""
        if await self.batches.send(ns, [(channel, payload, capacity)], expiry_s):
            return False
        self._stored(ns, [channel])
        return True

    async def _send_direct(
        self, ns: str, channel: str, payload: bytes, capacity: int, expiry_s: float, lease: int
    ) -> int:
        args = (ns, channel, client_of(channel), payload, capacity, float(expiry_s), True)
        lease_s = self._room.leases.lease_s
        outcome: int = await self._db.fetchval(self._sql.push_direct, *args, lease, lease_s)
        return outcome

    def _pushed(self, ns: str, channel: str, payload: bytes, ttl: int, lease: int) -> bool:
        """Push a message written under ``lease`` (``_send_direct``); False if its owner
        left meanwhile (that row is done with: the caller stores the message)."""
        leases, pushes = self._room.leases, self._room.pushes
        name = leases.pushed(ns, lease, 1)
        if pushes is not None and not pushes.push_now(ns, [channel], payload, ttl, [name]):
            return True
        leases.member_done(name)
        return False
