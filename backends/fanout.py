"""Group fan-out at the edge: an optional capability (the memory backend has it).

A group send to members whose owner is connected to this daemon need not store a
copy per member only to take each back out at once: the backend hands the daemon,
per owning client, the list of that client's members (kept ready, made again only
when the membership changes) and the daemon writes one PUSH to the owner's
connection carrying the payload once. The owner's layer enforces each member's
capacity in its own buffers, where those messages wait, and acknowledges what it kept
and dropped in aggregate. Members whose owner is away, or whose owner's connection
cannot take it in order right now, are stored as any message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

__all__ = ["EdgeOwner", "EdgeOwners", "FansOutAtTheEdge"]


class EdgeOwner(Protocol):
    """A connection of the daemon that owns a client id, as fan-outs see it."""

    def can_fan_out(self, frame_bytes: int) -> bool:
        """True if it takes fan-outs, nothing of its channels waits to be pushed before
        one (so their order holds), and a PUSH of about ``frame_bytes`` fits its bounds."""

    def fan_out(self, channels: bytes, payload: bytes, ttl_ms: int, capacity: int) -> None:
        """Push ``payload`` for each channel of ``channels`` (a list encoded by
        ``protocol.encode_channels``), each under ``capacity``; only after
        ``can_fan_out`` said yes, in the same step."""


#: The connections here by (namespace, client id) they own: the daemon's router's own
#: table, read as it is (a group send looks up each owning client once).
EdgeOwners = Mapping[tuple[str, str], EdgeOwner]


@runtime_checkable
class FansOutAtTheEdge(Protocol):
    """A backend that can hand the daemon a group's members per owner (see the module)."""

    def set_edge_owners(self, owners: EdgeOwners) -> None:
        """Say which owners the caller can fan out to itself; see ``EdgeOwner``."""
