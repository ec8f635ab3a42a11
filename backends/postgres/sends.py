"""Sends of the PostgreSQL backend: one message, or several in one call.

A message for a process-specific channel whose owner is connected to this daemon,
with nothing of that channel waiting or held in the database, is not stored at all:
the round trip that checks this (``send_direct``) hands it back for the daemon to
push (``DirectPushes``), which saves the insert, the notification and the take.
"""

from __future__ import annotations

from collections.abc import Sequence

from backends import CapacityOf, WakeupCallback
from protocol import client_id_of, is_process_specific, ttl_ms

from .batching import ReleaseWriter
from .pool import Database
from .room import Room
from .statements import Statements

__all__ = ["Sends", "client_of"]

#: What ``send_direct`` answers.
_REFUSED, _STORED, _SENT_DIRECT = 0, 1, 2


class Sends:
    """``send`` and ``send_many``, each a statement (two if a direct push misses)."""

    def __init__(
        self,
        db: Database,
        sql: Statements,
        releases: ReleaseWriter,
        room: Room,
        wake: WakeupCallback,
    ) -> None:
        self._db = db
        self._sql = sql
        self._releases = releases
        self._room = room
        self._wake = wake

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
            outcome = await self._send(ns, channel, payload, capacity, expiry_s, bool(direct))
        if pushes is not None and direct:
            if outcome != _SENT_DIRECT:
                pushes.unreserve(ns, direct)
            elif not pushes.push_now(ns, direct, payload, ttl_ms(expiry_s)):
                return True
            else:  # its owner left meanwhile (and its count with it): store it
                outcome = await self._send(ns, channel, payload, capacity, expiry_s, False)
        if outcome == _STORED:
            self._wake(ns, channel)
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
        args = (
            ns,
            channels,
            [client_of(channel) for channel in channels],
            [payload for _, payload in items],
            [self._room.of(ns, c, n) for c, n in zip(channels, capacities, strict=True)],
            float(expiry_s),
        )
        refused: list[int] = await self._db.fetchval(self._sql.send_many, *args)
        refused_set = set(refused)
        for index, channel in enumerate(channels):
            if index not in refused_set:
                self._wake(ns, channel)  # one per message: each may serve a pull
        return list(refused)

    async def _send(
        self, ns: str, channel: str, payload: bytes, capacity: int, expiry_s: float, direct: bool
    ) -> int:
        args = (ns, channel, client_of(channel), payload, capacity, float(expiry_s), direct)
        outcome: int = await self._db.fetchval(self._sql.send, *args)
        return outcome


def client_of(channel: str) -> str | None:
    """The client id of a process-specific channel (stored to find its channels), else None."""
    return client_id_of(channel) if is_process_specific(channel) else None
