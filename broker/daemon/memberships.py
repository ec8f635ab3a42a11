"""The group memberships one connection made, for ``--max-memberships``.

"One client", for ``--max-memberships``, is one connection: it counts
the memberships its own GROUP_ADDs made (renewing one it holds is not a new one), and
gives one back on its GROUP_DISCARD, when it lapses (the session's group expiry), and
when its namespace is flushed. A membership outlives the connection that made it
(until its group expiry), and a reconnected client counts from zero: so the bound on
memberships alive at once is ``--max-memberships`` times the connections made within
one group expiry, which ``--max-connections`` bounds in turn.
"""

from __future__ import annotations

import time

from backends.deadlines import SharedDeadlines

__all__ = ["Memberships"]


class Memberships:
    """The memberships one connection made and holds: group -> channel -> deadline.

    By group, so that a membership costs a dict entry and its deadline (about 50 bytes)
    rather than a (group, channel) tuple in an ordered dict besides (about 170): a site's
    consumers hold millions. Each group's members are in deadline order (a renewal moves
    to the end; one session has one group expiry), so lapsed ones are at the heads; they
    are looked for only at the limit, and only once the soonest deadline has passed.
    """

    __slots__ = ("_count", "_deadlines", "_groups", "_next_lapse", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._groups: dict[str, dict[str, float]] = {}
        self._count = 0
        #: No membership lapses before this (a lower bound: a discard may raise it).
        self._next_lapse = float("inf")
        self._deadlines = SharedDeadlines()

    def __len__(self) -> int:
        return self._count

    def has_room(self, group: str, channel: str) -> bool:
        """True if a GROUP_ADD of this membership keeps the count within ``limit``."""
        if self._count < self.limit or channel in self._groups.get(group, ()):
            return True
        now = time.monotonic()
        if now >= self._next_lapse:
            self._drop_lapsed(now)
        return self._count < self.limit

    def _drop_lapsed(self, now: float) -> None:
        soonest = float("inf")
        for group, members in list(self._groups.items()):
            lapsed: list[str] = []
            for channel, deadline in members.items():
                if deadline > now:
                    soonest = min(soonest, deadline)
                    break
                lapsed.append(channel)
            for channel in lapsed:
                del members[channel]
            self._count -= len(lapsed)
            if not members:
                del self._groups[group]
        self._next_lapse = soonest

    def added(self, group: str, channel: str, group_expiry_s: float) -> None:
        members = self._groups.get(group)
        if members is None:
            members = self._groups[group] = {}
        if members.pop(channel, None) is None:
            self._count += 1
        deadline = members[channel] = self._deadlines.after(time.monotonic(), group_expiry_s)
        self._next_lapse = min(self._next_lapse, deadline)

    def discarded(self, group: str, channel: str) -> None:
        members = self._groups.get(group)
        if members is not None and members.pop(channel, None) is not None:
            self._count -= 1
            if not members:
                del self._groups[group]

    def clear(self) -> None:
        self._groups.clear()
        self._count = 0
        self._next_lapse = float("inf")
