"""Leases to consumers: an optional capability of a backend (Redis has it).

A backend that ``LeasesToConsumers`` can take a normal channel's messages for a pull
under a lease that the *consumer* ends: ``take_leased`` returns each message with its
lease token (``Taken.lease``), the daemon hands the token to the client in the
DELIVER, and the client's ACK names it back (``acknowledge``). Until then the message
stays in storage; a lease that lapses (the DELIVER was lost with a connection or a
daemon, or the take's answer never came) puts it back in its place in the queue. A
client that does not acknowledge deliveries (HELLO) gets plain ``take``: the backend
ends the lease itself once the message was handed out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from .records import Taken

__all__ = ["LeasesToConsumers", "RenewsLeases"]


@runtime_checkable
class LeasesToConsumers(Protocol):
    """A backend whose takes for workers stay leased until the consumer acknowledges."""

    async def take_leased(self, ns: str, channel: str, limit: int) -> list[Taken]:
        """Up to ``limit`` messages of a normal channel, oldest first, each with the
        lease (``Taken.lease``) it is held under until ``acknowledge``."""

    async def acknowledge(self, ns: str, channel: str, leases: Sequence[str]) -> None:
        """End these leases of ``channel``'s messages: they were received. A lease
        unknown or lapsed is ignored (a lapsed one's message was given back)."""


@runtime_checkable
class RenewsLeases(Protocol):
    """Storage that renews a consumer's lease while the daemon that delivered it lives
    and its connection lasts (Redis): a busy consumer's late ACK still ends it."""

    def abandon(self, ns: str, channel: str, leases: Sequence[str]) -> None:
        """Renew these no more: the connection their DELIVERs went on closed without
        acknowledging them, so they lapse (a new connection may still acknowledge them)."""
