"""What of a channel's capacity this daemon spends outside the database.

Two kinds of message count against a channel's capacity with no row in the database:
those this daemon took ahead of its workers' pulls (``take_ahead``), and those it pushed
directly to a client and that are not yet acknowledged (``DirectPushes``). Every
capacity a statement checks is first lowered by them, here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from backends import DirectPushes

from .pushed import PushedLeases
from .take_ahead import Takes

__all__ = ["Room"]


class Room:
    """A channel's capacity less what waits outside the database; direct-push
    reservations given back when the statement they were made for fails."""

    def __init__(self, takes: Takes, leases: PushedLeases) -> None:
        self._takes = takes
        #: This daemon's leases on what it pushes (direct pushes are written leased).
        self.leases = leases
        #: The daemon's router, once it offers itself (``set_direct_pushes``).
        self.pushes: DirectPushes | None = None

    def of(self, ns: str, channel: str, capacity: int) -> int:
        """``capacity`` less what of ``channel`` waits outside the database: what was
        taken ahead, or pushed directly and not acknowledged."""
        pushes = self.pushes
        if "!" in channel and pushes is not None:
            return capacity - pushes.held_direct(ns, channel)
        return self.less_ahead(ns, channel, capacity)

    def less_ahead(self, ns: str, channel: str, capacity: int) -> int:
        """``capacity`` less what this daemon took ahead of a normal channel (a
        process-specific one's direct pushes are ``pushable``'s to count)."""
        if "!" in channel:
            return capacity
        return capacity - self._takes.waiting_ahead(ns, channel)

    def less_ahead_all(self, ns: str, channels: Sequence[str], capacities: list[int]) -> list[int]:
        """``less_ahead`` of each channel; ``capacities`` itself while nothing is
        taken ahead of any channel."""
        if not self._takes.has_lines:
            return capacities
        pairs = zip(channels, capacities, strict=True)
        return [self.less_ahead(ns, channel, capacity) for channel, capacity in pairs]

    @contextlib.contextmanager
    def given_back_on_error(self, ns: str, direct: list[str]) -> Iterator[None]:
        """Give back the direct-push reservations of ``direct`` if the body fails (or is
        cancelled): nobody will push those messages now."""
        try:
            yield
        except BaseException:
            if direct and self.pushes is not None:
                self.pushes.unreserve(ns, direct)
            raise
