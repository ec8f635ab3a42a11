"""Direct pushes: the daemon's side of ``backends.DirectPushes``, for a backend that
accepts them (PostgreSQL).

Storing a message only to take it back out at once costs two round trips to storage per
recipient. So a send or group send may leave out of storage the channels whose owner is
connected to this daemon and push to them itself; each push counts in the owner's
``Held`` until acknowledged (or lapsed), and storage lowers every capacity it checks by
that count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from backends import Backend, Taken

from .session import Session

__all__ = ["DirectPusher", "Owner", "give_back_unpushed"]


class DirectCounts(Protocol):
    """What an owner's ``Held`` offers here."""

    def direct_of(self, channel: str) -> int: ...

    def reserve_direct(self, channel: str, expiry_s: float) -> None: ...

    def unreserve_direct(self, channel: str, count: int = 1) -> None: ...


class Owner(Protocol):
    """A connection that owns process-specific channels."""

    @property
    def held(self) -> DirectCounts: ...

    def can_push(self, channel: str) -> bool: ...

    def push_now(
        self, channels: list[str], payload: bytes, ttl_ms: int, leases: Sequence[str] = ()
    ) -> bool: ...


class DirectPusher:
    """``DirectPushes`` over the owners of one daemon's router."""

    def __init__(self, owner_of: Callable[[str, str], Owner | None]) -> None:
        self._owner_of = owner_of

    def held_direct(self, ns: str, channel: str) -> int:
        owner = self._owner_of(ns, channel)
        return 0 if owner is None else owner.held.direct_of(channel)

    def pushable(
        self, ns: str, channels: Sequence[str], capacities: list[int], expiry_s: float
    ) -> list[str]:
        """Members a send may hand the message to directly, one message reserved for
        each; capacities lowered by what is reserved already."""
        found: list[str] = []
        for index, channel in enumerate(channels):
            if "!" not in channel:
                continue
            owner = self._owner_of(ns, channel)
            if owner is None:
                continue
            room = capacities[index] - owner.held.direct_of(channel)
            capacities[index] = room
            if room > 0 and owner.can_push(channel):
                owner.held.reserve_direct(channel, expiry_s)
                found.append(channel)
        return found

    def unreserve(self, ns: str, channels: Sequence[str]) -> None:
        for channel in channels:
            owner = self._owner_of(ns, channel)
            if owner is not None:
                owner.held.unreserve_direct(channel)

    def push_now(
        self,
        ns: str,
        channels: Sequence[str],
        payload: bytes,
        ttl_ms: int,
        leases: Sequence[str] = (),
    ) -> list[str]:
        """Push ``payload`` to each channel's owner now; return the channels not reached
        (their owner left since ``pushable`` named them). ``leases``: storage's lease on
        each channel's message, if any (kept with it until acknowledged)."""
        by_owner: dict[Owner, tuple[list[str], list[str]]] = {}
        missed: list[str] = []
        for index, channel in enumerate(channels):
            owner = self._owner_of(ns, channel)
            if owner is None:
                missed.append(channel)
                continue
            owned, owned_leases = by_owner.setdefault(owner, ([], []))
            owned.append(channel)
            if leases:
                owned_leases.append(leases[index])
        for owner, (owned, owned_leases) in by_owner.items():
            if not owner.push_now(owned, payload, ttl_ms, owned_leases):
                missed += owned
        return missed


async def give_back_unpushed(
    backend: Backend,
    session: Session,
    channels: Sequence[str],
    leases: Sequence[str],
    missed: Sequence[str],
    payload: bytes,
) -> int:
    """Direct pushes of ``channels`` that storage keeps leased (``leases``, in order),
    ``missed`` by their owner, who left before the push: their leases end, and they
    wait in their places for the owner's next connection. None was full: 0."""
    lease_of = dict(zip(channels, leases, strict=True))
    for channel in missed:
        item = Taken(payload, session.expiry_s, lease_of[channel], 0.0)
        await backend.give_back(session.ns, channel, [item], 0)
    return 0
