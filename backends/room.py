"""Send room: an optional capability of a backend (memory and Redis have it).

A daemon whose backend ``ReservesRoom`` grants senders room on a channel ahead of time
(send windows, docs/flow.md): room is reserved in storage atomically with a store, and
counted against the channel's capacity as held messages are, until a later message is
stored into it (``send_reserved``) or it is released. Storage that cannot (PostgreSQL,
Redis Cluster) makes the daemon turn windows off.

``holder`` names the connection that holds room (the client id, a space, then a number
unique on its daemon): shared storage counts room per holder, so that a client sending
again through another daemon what its dead daemon had not stored can spend the room
reserved for it there, instead of being refused for a channel full of its own room.

Shared storage (``dedupes_sends``) also keeps what each client's numbered sends came to,
written in the same atomic step as the message: a client that reconnects to another
daemon and sends again what it has no answer for is deduped there too. The record says
exactly which of the client's latest ``SEQ_SPAN`` seqs were stored, not just the
highest: a seq whose store failed (storage away) is recorded nowhere, and a later seq
of the client may be stored before it is sent again, which must then store it. A daemon over
storage that does not keeps that record itself (``broker.daemon.windows.Seqs``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from protocol import MAX_UNSETTLED_SENDS

__all__ = ["ALREADY_STORED", "SEQ_SPAN", "RecordsSeqs", "ReservesRoom", "room_to_grant"]

#: What ``send_reserving`` answers for a numbered send storage had stored before.
ALREADY_STORED = -1
#: How many of a client's latest seqs shared storage records one by one (a bit each:
#: stored or not). A client sends again only its unsettled sends, at most
#: ``MAX_UNSETTLED_SENDS`` behind its latest; twice that leaves a margin. A seq further
#: back than this behind the highest recorded is taken for stored (never stored twice).
SEQ_SPAN = 2 * MAX_UNSETTLED_SENDS


def room_to_grant(window: int, free: int) -> int:
    """Room to reserve when ``free`` messages still fit the channel after a store: half
    of it, up to ``window``. Half leaves the other half to other senders, and the last
    slot always costs a round trip, so that ``ChannelFull`` stays exact for one sender."""
    return max(0, min(window, free // 2))


@runtime_checkable
class ReservesRoom(Protocol):
    """A backend that can reserve send room on a channel, and store into it."""

    #: True: storage keeps the record of numbered sends (``client``, ``seq``) and stores
    #: each at most once; False: the arguments are ignored, the daemon dedupes.
    dedupes_sends: bool

    def can_reserve_room(self) -> bool:
        """Whether room can be reserved now (not, for example, on Redis Cluster)."""

    async def send_reserving(
        self,
        ns: str,
        channel: str,
        payload: bytes,
        *,
        capacity: int,
        expiry_s: float,
        window: int,
        client: str = "",
        seq: int = 0,
        holder: str = "",
    ) -> int | None:
        """``Backend.send``, and if stored, reserve ``room_to_grant(window, free)`` on the
        channel in the same atomic step, ``free`` being what still fits once the message
        is in (waiting, held and reserved ones all count). Return the room reserved,
        None when the channel was full (nothing stored, nothing reserved), or
        ``ALREADY_STORED`` for a ``seq`` of ``client`` stored before (``dedupes_sends``)."""

    async def send_reserved(
        self,
        ns: str,
        items: Sequence[tuple[str, bytes]],
        *,
        expiry_s: float,
        client: str = "",
        seqs: Sequence[int] = (),
        holder: str = "",
    ) -> None:
        """Store each message into one unit of room reserved on its channel before, in
        order, with no capacity check (the room was counted when it was reserved). With
        ``dedupes_sends``, ``seqs`` numbers the items: one stored before spends its
        unit and is not stored again."""

    async def reserve_room(
        self, ns: str, channel: str, *, capacity: int, window: int, size: int, holder: str = ""
    ) -> int:
        """Reserve ``room_to_grant(window, free)`` on the channel, storing nothing (a
        sender that spent its room and keeps sending), for messages of about ``size``
        bytes (what a backend bounded in memory checks); return it."""

    async def release_room(self, ns: str, channel: str, count: int, *, holder: str = "") -> None:
        """Stop counting ``count`` units of room reserved on ``channel`` (never below 0)."""


@runtime_checkable
class RecordsSeqs(Protocol):
    """Shared storage that keeps each client's record of numbered sends (the one
    ``ReservesRoom.dedupes_sends`` writes with the messages) for numbered GROUP_SENDs
    too, so that a client that sends one again through another daemon is answered there
    without a second delivery. A group send is not one atomic storage step (a big group
    goes in slices, members may be pushed to directly), so its seq is looked up before
    and recorded after: a daemon killed in between leaves it unrecorded, and the resend
    delivers it again, which the receiving layers drop by its message id."""

    async def seq_was_stored(self, ns: str, client: str, seq: int) -> bool:
        """True if ``client``'s ``seq`` was recorded as stored (delivered) before."""

    async def record_seq(
        self, ns: str, client: str, seqs: Sequence[int], *, stored: bool, keep_s: float
    ) -> None:
        """Record each of ``seqs``' outcome in ``client``'s record (kept ``keep_s`` past
        it): the record says which seqs were stored, so each is written, not the last."""
