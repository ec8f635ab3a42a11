"""Group sends of the PostgreSQL backend: slice after slice of members, each one call of
``group_send_slice``, and direct pushes to those this daemon can reach.

Theory of operation. One statement for a whole group held every member's channel row
(and, at its commit, PostgreSQL's notification queue, which every sending transaction
needs) for as long as it ran: at 100,000 members, seconds, during which every send to a
member, and every notifying commit, waited. So a group is sent to in slices of
members, in the database's name order, each one statement of a few milliseconds
(``SLICE_TARGET_S``: slices grow or shrink to take that long, ``SliceSize``) in a
transaction of its own. The database picks each slice (the live
members after the last of the slice before), so each member gets the message at most
once whatever joins or leaves meanwhile: one that joins behind the slice under way gets
it, one that joins before it does not, as if it had joined just after the send. A
sender's group sends go out one after the other (its connection awaits each), so a
member gets them in order. A slice that fails ends the group send with its error; the
members of the slices before it have the message.

The capacities come from the sender's policy, which only the daemon knows, so they are
passed in for the members this daemon last saw (a cache of member lists, each in the
database's order, so that the members passed for a slice are the ones it holds,
first read in pages that lock nothing: ``_discover``); members that joined since cost
a second call for their slice, once. Members the
daemon can push to are left to it if nothing of theirs waits or is held in the
database (``direct``, see ``DirectPushes``): the slice writes them leased to this
daemon (one row of ``pushes`` for them all: ``pushed``), not to wait, so that the
pushes outlive a killed daemon.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple

from backends import CapacityOf, GroupSendResult
from protocol import client_id_of

from .batching import ReleaseWriter
from .pool import Database
from .room import Room
from .sends import Stored
from .statements import Statements

__all__ = ["FIRST_SLICE_MEMBERS", "GroupSends", "SliceSize"]

#: How long a slice's statement should take (from the client, commit included): short
#: enough that no other client waits long for a member's row or the notification
#: queue, long enough that a slice's round trip and commit are a small part of it.
SLICE_TARGET_S = 0.005
#: Members in the first slice a daemon sends (a group this small is one statement),
#: and the bounds within which slices then grow or shrink toward ``SLICE_TARGET_S``.
FIRST_SLICE_MEMBERS = 250
MIN_SLICE_MEMBERS = 100
MAX_SLICE_MEMBERS = 2000
#: Members read per statement when a daemon learns a group's members (reads lock
#: nothing: only the statement's own length matters).
DISCOVERY_PAGE = 2000
#: Groups whose member list a daemon remembers (to send with one round trip a slice).
MEMBER_CACHE_GROUPS = 10_000
#: The second call for a slice's unknown members is bounded by the slice's last
#: member instead (or is the group's end, which held fewer than a slice a moment ago).
_NO_LIMIT = 2**31 - 1


class _Slice(NamedTuple):
    """What one call of ``group_send_slice`` answers."""

    delivered: list[str]
    skipped: int
    #: Live members of the slice the call was given no capacity for: not sent to.
    unknown: list[str]
    #: Members left for this daemon to push to (their reservations confirmed).
    direct: list[str]
    #: How many of the members passed in the slice holds.
    known: int
    #: The slice's last member, where the next begins; None: the group ends here.
    last: str | None
    #: The slice's members in order, where they differ from those passed in.
    members: str | None
    #: The lease of each of ``direct``, in order (``pushed``).
    leases: list[str]


class _Window(NamedTuple):
    """Which members a call is for: after ``after``, up to ``upto``, at most ``limit``."""

    after: str
    upto: str | None
    limit: int


class SliceSize:
    """How many members the next slice holds: adapted after each slice so that a slice's
    statement takes about ``target_s`` (None: always ``members``)."""

    def __init__(
        self, members: int = FIRST_SLICE_MEMBERS, target_s: float | None = SLICE_TARGET_S
    ) -> None:
        self.members = members
        self.target_s = target_s

    def took(self, elapsed_s: float, stored: int) -> None:
        """A slice of ``members`` took ``elapsed_s`` and stored ``stored`` messages: size
        the next one, by at most a factor of two a step (one slow statement, a pause of
        the machine, is no trend). A slice that stored nothing (its members were pushed
        to directly, or full) locked no row: the next may be twice as large."""
        if self.target_s is None:
            return
        if not stored:
            elapsed_s = 0.0
        wanted = self.members * self.target_s / max(elapsed_s, 1e-4)
        wanted = min(max(wanted, self.members / 2), self.members * 2)
        self.members = int(min(max(wanted, MIN_SLICE_MEMBERS), MAX_SLICE_MEMBERS))


class _Walk:
    """Where a group send is in the member list this daemon last saw (in the database's
    order), and the list as the slices found it (remembered for the next send)."""

    def __init__(self, cached: tuple[str, ...]) -> None:
        self.cached = cached
        self.position = 0
        self.found: list[str] = []
        self._index: dict[str, int] | None = None

    def chunk(self, size: int) -> tuple[str, ...]:
        """The ``size`` members that the next slice should hold, as last seen."""
        return self.cached[self.position : self.position + size]

    def advance(self, chunk: tuple[str, ...], known: int, members: str | None) -> None:
        """Past a slice: it held the first ``known`` of ``chunk`` and no other member,
        or else ``members`` (then pick up after the last of them seen before)."""
        if members is None:
            self.found += chunk[:known]
            self.position += known
            return
        held = members.split()
        self.found += held
        if self._index is None:
            self._index = {name: n for n, name in enumerate(self.cached)}
        seen = [self._index[name] for name in held if name in self._index]
        if seen:
            self.position = max(self.position, max(seen) + 1)


class GroupSends:
    """``group_send``, with the member lists it last saw."""

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
        self._members: dict[tuple[str, str], tuple[str, ...]] = {}
        self.slice_size = SliceSize()

    async def send(
        self, ns: str, group: str, payload: bytes, capacity_of: CapacityOf, expiry_s: float
    ) -> GroupSendResult:
        """Send to every live member with room, slice after slice."""
        await self._releases.written(ns)
        key = (ns, group)
        cached = self._members.get(key)
        walk = _Walk(await self._discover(ns, group) if cached is None else cached)
        delivered: list[str] = []
        direct: list[str] = []
        leases: list[str] = []
        skipped = 0
        after = ""
        while True:
            chunk = walk.chunk(self.slice_size.members)
            part = await self._slice(ns, group, payload, expiry_s, capacity_of, after, chunk)
            delivered += part.delivered
            direct += part.direct
            leases += part.leases
            skipped += part.skipped
            walk.advance(chunk, part.known, part.members)
            if part.last is None:
                break
            after = part.last
        self._remember(key, walk.found)
        return GroupSendResult(
            delivered=delivered, skipped=skipped, direct=direct, direct_leases=leases
        )

    def forget_members(self) -> None:
        """Forget every member list (a flush emptied some groups)."""
        self._members.clear()

    async def _discover(self, ns: str, group: str) -> tuple[str, ...]:
        """A group's live members, in the database's order, read in pages: statements
        that lock nothing, so they may be longer than a slice."""
        found: list[str] = []
        while True:
            after = found[-1] if found else ""
            rows = await self._db.fetch(self._sql.members, ns, group, after, DISCOVERY_PAGE)
            found += [row[0] for row in rows]
            if len(rows) < DISCOVERY_PAGE:
                return tuple(found)

    async def _slice(
        self,
        ns: str,
        group: str,
        payload: bytes,
        expiry_s: float,
        capacity_of: CapacityOf,
        after: str,
        chunk: Sequence[str],
    ) -> _Slice:
        """One slice: one call for the members passed in, a second for those the first
        found unknown (within the first's bounds); wakes (and notifies) the members stored for."""
        first = _Window(after, None, self.slice_size.members)
        started = time.perf_counter()
        part = await self._call(ns, group, payload, expiry_s, capacity_of, chunk, first)
        longest_s = time.perf_counter() - started
        if part.unknown:
            rest = _Window(after, part.last, _NO_LIMIT)
            started = time.perf_counter()
            more = await self._call(ns, group, payload, expiry_s, capacity_of, part.unknown, rest)
            longest_s = max(longest_s, time.perf_counter() - started)
            part = part._replace(
                delivered=part.delivered + more.delivered,
                skipped=part.skipped + more.skipped,
                direct=part.direct + more.direct,
                leases=part.leases + more.leases,
            )
        self.slice_size.took(longest_s, len(part.delivered))
        if part.delivered:
            self._stored(ns, part.delivered)
        return part

    async def _call(
        self,
        ns: str,
        group: str,
        payload: bytes,
        expiry_s: float,
        capacity_of: CapacityOf,
        channels: Sequence[str],
        window: _Window,
    ) -> _Slice:
        """One call of ``group_send_slice`` for ``window``, naming ``channels``."""
        capacities = await capacity_of.all_of(channels)
        capacities = self._room.less_ahead_all(ns, channels, capacities)
        pushes = self._room.pushes
        direct = [] if pushes is None else pushes.pushable(ns, channels, capacities, expiry_s)
        args = (ns, group, payload, float(expiry_s), *window)
        leases = self._room.leases
        lease = leases.new_lease()
        with self._room.given_back_on_error(ns, direct):
            row = await self._db.fetchrow(
                self._sql.group_send,
                *args,
                *_arguments(channels, capacities, direct),
                lease,
                leases.lease_s,
            )
        confirmed: list[str] = row[3].split()
        if pushes is not None and len(confirmed) < len(direct):
            kept = set(confirmed)
            pushes.unreserve(ns, [channel for channel in direct if channel not in kept])
        pushed = [leases.pushed(ns, lease, len(confirmed))] * len(confirmed)
        return _Slice(row[0], row[1], row[2], confirmed, row[4], row[5], row[6], pushed)

    def _remember(self, key: tuple[str, str], members: list[str]) -> None:
        if len(self._members) >= MEMBER_CACHE_GROUPS:
            self._members.clear()
        self._members[key] = tuple(members)


def _arguments(
    channels: Sequence[str], capacities: list[int], direct: list[str]
) -> tuple[str, str, str, str, str]:
    """``group_send_slice``'s lists: the members to store and those to push to, each
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
