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
from collections import OrderedDict

__all__ = ["Memberships"]


class Memberships:
    """The memberships one connection made and holds: (group, channel) -> deadline.

    Kept in deadline order (a renewal moves to the end; one session has one group
    expiry), so that lapsed ones are found at the head, one step each.
    """

    __slots__ = ("_deadlines", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._deadlines: OrderedDict[tuple[str, str], float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._deadlines)

    def has_room(self, group: str, channel: str) -> bool:
        """True if a GROUP_ADD of this membership keeps the count within ``limit``."""
        deadlines = self._deadlines
        if len(deadlines) < self.limit or (group, channel) in deadlines:
            return True
        now = time.monotonic()
        while deadlines and next(iter(deadlines.values())) <= now:
            deadlines.popitem(last=False)
        return len(deadlines) < self.limit

    def added(self, group: str, channel: str, group_expiry_s: float) -> None:
        key = (group, channel)
        self._deadlines[key] = time.monotonic() + group_expiry_s
        self._deadlines.move_to_end(key)

    def discarded(self, group: str, channel: str) -> None:
        self._deadlines.pop((group, channel), None)

    def clear(self) -> None:
        self._deadlines.clear()
