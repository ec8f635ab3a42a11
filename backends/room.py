"""Send room: an optional capability of a backend (the memory backend has it).

A daemon whose backend ``ReservesRoom`` grants senders room on a channel ahead of time
(send windows, docs/flow.md): room is reserved in storage atomically with a store, and
counted against the channel's capacity as held messages are, until a later message is
stored into it (``send_reserved``) or it is released. Storage that cannot (Redis and
PostgreSQL, until their sends carry ids) makes the daemon turn windows off.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

__all__ = ["ReservesRoom", "room_to_grant"]


def room_to_grant(window: int, free: int) -> int:
    """Room to reserve when ``free`` messages still fit the channel after a store: half
    of it, up to ``window``. Half leaves the other half to other senders, and the last
    slot always costs a round trip, so that ``ChannelFull`` stays exact for one sender."""
    return max(0, min(window, free // 2))


@runtime_checkable
class ReservesRoom(Protocol):
    """A backend that can reserve send room on a channel, and store into it."""

    async def send_reserving(
        self, ns: str, channel: str, payload: bytes, *, capacity: int, expiry_s: float, window: int
    ) -> int | None:
        """``Backend.send``, and if stored, reserve ``room_to_grant(window, free)`` on the
        channel in the same atomic step, ``free`` being what still fits once the message
        is in (waiting, held and reserved ones all count). Return the room reserved, or
        None when the channel was full (nothing stored, nothing reserved)."""

    async def send_reserved(
        self, ns: str, items: Sequence[tuple[str, bytes]], *, expiry_s: float
    ) -> None:
        """Store each message into one unit of room reserved on its channel before, in
        order, with no capacity check (the room was counted when it was reserved)."""

    async def reserve_room(
        self, ns: str, channel: str, *, capacity: int, window: int, size: int
    ) -> int:
        """Reserve ``room_to_grant(window, free)`` on the channel, storing nothing (a
        sender that spent its room and keeps sending), for messages of about ``size``
        bytes (what a backend bounded in memory checks); return it."""

    async def release_room(self, ns: str, channel: str, count: int) -> None:
        """Stop counting ``count`` units of room reserved on ``channel`` (never below 0)."""
