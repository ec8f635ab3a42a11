"""Group fan-out at the edge: an optional capability (the memory and Redis backends have it).

A group send to members whose owner is connected to this daemon need not store a
copy per member only to take each back out at once: the backend hands the daemon,
per owning client, the list of that client's members (kept ready, made again only
when the membership changes) and the daemon writes one PUSH to the owner's
connection carrying the payload once. The owner's layer enforces each member's
capacity in its own buffers, where those messages wait, and acknowledges what it kept
and dropped in aggregate. Members whose owner is away, or whose owner's connection
cannot take it in order right now, are stored as any message.

Shared storage (Redis) keeps each fan-out under a lease until the layer's ACK covers it
(``LeasesFanOuts``): one record per (group send, owning client), carrying the payload
once and the member list, so a daemon killed with fan-outs in flight loses none (once
the lease lapses, storage stores the message for each member, as for an owner away).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple, Protocol, runtime_checkable

__all__ = ["EdgeOwner", "EdgeOwners", "FanOutLease", "FansOutAtTheEdge", "LeasesFanOuts"]


class FanOutLease(NamedTuple):
    """A fan-out kept in storage until the layer acknowledges its ``members`` deliveries
    (``Ack.fanout_kept`` + ``fanout_dropped``, which count whole PUSHes in order)."""

    members: int
    #: Opaque to the daemon: the backend's name of the record (``LeasesFanOuts``).
    lease: str


class EdgeOwner(Protocol):
    """A connection of the daemon that owns a client id, as fan-outs see it."""

    @property
    def takes_fanouts(self) -> bool:
        """True if its layer takes fan-out PUSHes (protocol version 2 or later)."""

    def can_fan_out(self, frame_bytes: int) -> bool:
        """True if it takes fan-outs, nothing of its channels waits to be pushed before
        one (so their order holds), and a PUSH of about ``frame_bytes`` fits its bounds."""

    def fan_out(
        self,
        channels: bytes,
        payload: bytes,
        ttl_ms: int,
        capacity: int,
        lease: FanOutLease | None = None,
    ) -> None:
        """Push ``payload`` for each channel of ``channels`` (a list encoded by
        ``protocol.encode_channels``), each under ``capacity``; only after
        ``can_fan_out`` said yes, in the same step. With a ``lease``, keep it until the
        layer's ACK covers it, and hand it back to storage if the connection closes first."""


#: The connections here by (namespace, client id) they own: the daemon's router's own
#: table, read as it is (a group send looks up each owning client once).
EdgeOwners = Mapping[tuple[str, str], EdgeOwner]


@runtime_checkable
class FansOutAtTheEdge(Protocol):
    """A backend that can hand the daemon a group's members per owner (see the module)."""

    def set_edge_owners(self, owners: EdgeOwners) -> None:
        """Say which owners the caller can fan out to itself; see ``EdgeOwner``."""


@runtime_checkable
class LeasesFanOuts(Protocol):
    """A backend whose fan-outs stay in storage until acknowledged (see the module)."""

    async def end_fanouts(self, ns: str, leases: Sequence[str]) -> None:
        """The layer acknowledged these fan-outs: forget them."""

    async def give_back_fanouts(self, ns: str, leases: Sequence[str]) -> None:
        """Their connection closed unacknowledged: store each for its members, under
        capacity and expiry, for the owner's next connection."""
