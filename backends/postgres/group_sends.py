"""Group sends of the PostgreSQL backend: one call of ``group_send_direct`` while the
members are known, and direct pushes to those this daemon can reach.

The capacities come from the sender's policy, so they are passed in for the members
this daemon last saw (a cache of member lists); members it did not know of get a
second call. Members the daemon can push to are left to it if nothing of theirs
waits or is held in the database (``direct``, see ``DirectPushes``): no row is
written for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from backends import CapacityOf, GroupSendResult, WakeupCallback
from protocol import client_id_of

from .batching import ReleaseWriter
from .pool import Database
from .room import Room
from .statements import Statements

__all__ = ["GroupSends"]

#: Groups whose member list a daemon remembers (to send with one round trip).
MEMBER_CACHE_GROUPS = 10_000


class _Outcome(NamedTuple):
    """What one call of ``group_send_direct`` answers."""

    delivered: list[str]
    skipped: int
    #: Live members the call was given no capacity for: not sent to.
    unknown: list[str]
    #: Some of the members passed in are members no longer.
    stale: bool
    #: Members left for this daemon to push to (their reservations confirmed).
    direct: list[str]


class GroupSends:
    """``group_send``, with the member lists it last saw."""

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
        self._members: dict[tuple[str, str], tuple[str, ...]] = {}

    async def send(
        self, ns: str, group: str, payload: bytes, capacity_of: CapacityOf, expiry_s: float
    ) -> GroupSendResult:
        """Send to every live member with room, in one call while the members are known."""
        await self._releases.written(ns)
        key = (ns, group)
        known = self._members.get(key, ())
        first = await self._call(ns, group, payload, expiry_s, known, capacity_of)
        delivered, skipped, direct = first.delivered, first.skipped, first.direct
        members = [] if first.stale else list(known)
        if first.unknown:
            with self._room.given_back_on_error(ns, direct):
                more = await self._call(ns, group, payload, expiry_s, first.unknown, capacity_of)
            delivered += more.delivered
            skipped += more.skipped
            direct += more.direct
            members += first.unknown
        self._remember(key, members)
        for channel in delivered:
            self._wake(ns, channel)
        return GroupSendResult(delivered=delivered, skipped=skipped, direct=direct)

    def forget_members(self) -> None:
        """Forget every member list (a flush emptied some groups)."""
        self._members.clear()

    async def _call(
        self,
        ns: str,
        group: str,
        payload: bytes,
        expiry_s: float,
        channels: Sequence[str],
        capacity_of: CapacityOf,
    ) -> _Outcome:
        """One call of ``group_send_direct`` for ``channels``, the members it knows."""
        capacities = await capacity_of.all_of(channels)
        capacities = self._room.less_ahead_all(ns, channels, capacities)
        pushes = self._room.pushes
        direct = [] if pushes is None else pushes.pushable(ns, channels, capacities, expiry_s)
        args = _arguments(channels, capacities, direct)
        with self._room.given_back_on_error(ns, direct):
            row = await self._db.fetchrow(
                self._sql.group_send, ns, group, payload, float(expiry_s), *args
            )
        confirmed: list[str] = row[4].split()
        if pushes is not None and len(confirmed) < len(direct):
            kept = set(confirmed)
            pushes.unreserve(ns, [channel for channel in direct if channel not in kept])
        return _Outcome(row[0], row[1], row[2], row[3], confirmed)

    def _remember(self, key: tuple[str, str], members: list[str]) -> None:
        if len(self._members) >= MEMBER_CACHE_GROUPS:
            self._members.clear()
        self._members[key] = tuple(dict.fromkeys(members))


def _arguments(
    channels: Sequence[str], capacities: list[int], direct: list[str]
) -> tuple[str, str, str, str, str]:
    """``group_send_direct``'s lists: the members to store and those to push to, each
    with their capacities, and the clients pushed to. Each list is one space-separated
    text (names never hold spaces): cheaper to build and read than arrays."""
    chosen = set(direct)
    pairs = list(zip(channels, capacities, strict=True))
    stored = [pair for pair in pairs if pair[0] not in chosen]
    stored_direct = [pair for pair in pairs if pair[0] in chosen] if chosen else []
    return (
        " ".join(c for c, _ in stored),
        " ".join(str(n) for _, n in stored),
        " ".join(c for c, _ in stored_direct),
        " ".join(str(n) for _, n in stored_direct),
        " ".join({client_id_of(c) for c in direct}),
    )
