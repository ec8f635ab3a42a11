"""The group memberships a layer made, and the store it made them in.

A daemon on memory:// keeps its store in its own process: one that restarts without
``--state-file`` starts empty, and its groups forget every membership. WELCOME names
the store (its *incarnation*; "" for a shared store, Redis or PostgreSQL, which
outlives its daemons). The layer remembers the incarnation its loops last saw and
every membership it added and did not discard, for ``group_expiry`` from its latest
``group_add`` (its own channels, and any other: a view that adds a worker's channel).
The first loop to see a new incarnation re-adds them all through its connection and
logs once that the store was lost; the other loops see the same incarnation, and do
nothing. Receives need no waking: a pull is asked again of the new daemon, and a
receive of a pushed channel waits for the new daemon's pushes.

Bounded: at most CONFIG's ``remembered_memberships`` per layer instance (by default
``MAX_REMEMBERED_MEMBERSHIPS``). Past it, expired
ones go first, then the oldest are forgotten (not re-added after a lost store),
counted in ``forgotten`` and logged once per layer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from protocol import GroupAdd

__all__ = ["MAX_REMEMBERED_MEMBERSHIPS", "Memberships"]

log = logging.getLogger("channels_broker.layer")

#: The daemon's --max-memberships default per connection: a Daphne process of 10,000
#: consumers in 10 groups. About 200 bytes each (a key of two str and a float).
MAX_REMEMBERED_MEMBERSHIPS = 100_000

_now = time.monotonic  # one clock for every loop of the layer


class Memberships:
    """One layer's memberships, (group, channel) -> when last added, oldest first; and
    the incarnation of the store its loops last connected to. Shared by its loops."""

    def __init__(self, group_expiry_s: float, limit: int = MAX_REMEMBERED_MEMBERSHIPS) -> None:
        self._group_expiry_s = group_expiry_s
        self._limit = limit
        # Ordered by a linked list, not dict order: removing at the head of a plain dict
        # leaves dead slots that every later look at the head walks again (at the bound
        # that made each group_add cost a walk of up to the whole dict).
        self._added: OrderedDict[tuple[str, str], float] = OrderedDict()
        #: The stores warned about: once each, even if the loops go back and forth
        #: between two daemons on memory:// (each has a store of its own).
        self._warned: deque[str] = deque(maxlen=16)
        # Loops run in threads of their own (async_to_sync), and so do sync calls.
        self._lock = threading.Lock()
        #: The store's name as WELCOME gave it; None until the first WELCOME.
        self.incarnation: str | None = None
        #: How many times a loop reconnected to a store that had lost what it held.
        self.stores_lost = 0
        #: Memberships forgotten at the bound (``remembered_memberships``).
        self.forgotten = 0

    def __len__(self) -> int:
        return len(self._added)

    def added(self, group: str, channel: str) -> None:
        """Remember (or renew) a membership, within the bound."""
        key = (group, channel)
        with self._lock:
            self._added[key] = _now()
            self._added.move_to_end(key)  # the dict stays oldest first
            if len(self._added) > self._limit:
                self._make_room()

    def discarded(self, group: str, channel: str) -> None:
        with self._lock:
            self._added.pop((group, channel), None)

    def clear(self) -> None:
        """The namespace was flushed: every group is empty."""
        with self._lock:
            self._added.clear()

    def welcomed(self, incarnation: str, next_id: Callable[[], int]) -> list[GroupAdd]:
        """A loop's WELCOME named the store: the GROUP_ADDs (request ids from
        ``next_id``) of the memberships to add again if it is not the store they were
        made in (the store lost them), else none."""
        with self._lock:
            previous = self.incarnation
            if not incarnation or incarnation == previous:
                return []
            self.incarnation = incarnation
            if previous is None:
                return []
            self._drop_expired()
            added = list(self._added)
            self.stores_lost += 1
            if incarnation in self._warned:
                return [GroupAdd(next_id(), group, channel) for group, channel in added]
            self._warned.append(incarnation)
        log.warning(
            "the broker's store was lost: the daemon started empty (store %s, was %s; or"
            " this process moved to another daemon on memory://, which has a store of its"
            " own), so the messages that waited in it are gone (a daemon stopped by SIGTERM"
            " logged how many) and %d group memberships of this process are added again."
            " Run the daemon with --state-file to keep its store across a restart"
            " (docs/operations.md).",
            incarnation,
            previous,
            len(added),
        )
        return [GroupAdd(next_id(), group, channel) for group, channel in added]

    def _drop_expired(self) -> None:
        """Drop the lapsed ones: at the head only, since the dict is oldest first."""
        oldest, added = _now() - self._group_expiry_s, self._added
        while added and next(iter(added.values())) < oldest:
            added.popitem(last=False)

    def _make_room(self) -> None:
        self._drop_expired()
        excess = len(self._added) - self._limit
        if excess <= 0:
            return
        for _ in range(excess):
            self._added.popitem(last=False)
        if not self.forgotten:
            log.warning(
                "this layer remembers at most %d group memberships: the oldest are"
                " forgotten, and not added again if the broker loses its store"
                " (CONFIG's remembered_memberships raises the bound)",
                self._limit,
            )
        self.forgotten += excess
