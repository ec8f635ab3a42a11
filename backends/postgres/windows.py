"""Send windows on PostgreSQL (``backends.ReservesRoom``): room reserved in the database,
and each client's numbered sends stored at most once, whichever daemon it reaches.

Theory of operation (docs/flow.md, docs/postgres.md; the functions are in schema.sql).
Room is counted per connection (``rooms``: its holder and this daemon's ``origin``) and
as held (``takes.held``), so every capacity check of every daemon counts it, and it
lapses like a held count: ``room_lapse`` after it was last reserved (or with the newest
held message), should its daemon die. Until then, a numbered request of the same client
spends a unit of it (``spend_left``): the client sending again what its dead daemon had
not stored, into the room reserved for it, so it is not refused for a channel full of
its own room. A request of a windowed
client is one ``send_reserving`` call: the client's seq record (``senders``), the
checked store and the room it gets, in one transaction. A run of windowed SENDs is one
``send_reserved`` call, whatever their channels: one statement and one commit for the
burst, answered with one CONFIRM once committed. Both write the seq record in the same
transaction, so a client that reconnects to another daemon and sends again what it has
no answer for is answered there without a second store. The record says which of the
client's latest ``SEQ_SPAN`` seqs were stored (``senders.kept``, a bit each): one whose
transaction failed was recorded nowhere, and a later one may be stored before it is
sent again.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from backends import ALREADY_STORED, SEQ_SPAN, Taken
from protocol import ttl_ms

from .batching import ReleaseWriter
from .group_commit import client_of
from .pool import Database
from .room import Room
from .sends import Stored

__all__ = ["FORGET_SENDERS", "PostgresRoom"]

_SEND_RESERVING = "SELECT {s}.send_reserving($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
_SEND_RESERVED = "SELECT {s}.send_reserved($1, $2, $3, $4, $5, $6, $7, $8, $9)"
_RESERVE_ROOM = "SELECT {s}.reserve_room($1, $2, $3, $4, $5, $6, $7)"
_RELEASE_ROOM = "SELECT {s}.release_room($1, $2, $3, $4)"
_SEND_RESERVED_DIRECT = (
    "SELECT {s}.send_reserved_direct($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
)
#: A client's record (made if missing), and a seq's outcome written into it.
_SEQ_STORED = "SELECT {s}.seq_stored(r.highest, r.kept, $3, $4) FROM {s}.sender_seqs($1, $2, $5) r"
_RECORD_SEQ = (
    "SELECT {s}.stored_into($1, $2, u.seq, $4, $5, $6)"
    " FROM {s}.sender_seqs($1, $2, $5) r, unnest($3::bigint[]) AS u(seq)"
)
#: Records of numbered sends past their expiry (what their clients stored has expired),
#: and room that lapsed, uncounted (``lapse_rooms``): room a release missed (storage
#: failed under it, or its daemon died) comes back even where newer room keeps the
#: channel's held count from lapsing.
FORGET_SENDERS = (
    "WITH r AS (DELETE FROM {s}.senders WHERE expires_at < now()) SELECT {s}.lapse_rooms()"
)

#: What ``send_reserving`` answers besides the room reserved.
_STORED_BEFORE, _FULL = -1, -2
#: What ``send_reserved_direct`` answers per message (2: stored before).
_STORED, _PUSHED = 1, 3
#: The capacity a windowed send's direct push is checked against: none (its room was
#: counted when it was reserved).
_UNCHECKED = 2**31


class PostgresRoom:
    """Room and numbered sends of one PostgreSQL backend."""

    def __init__(
        self,
        db: Database,
        schema: str,
        releases: ReleaseWriter,
        room: Room,
        stored: Stored,
        *,
        lapse_s: float,
    ) -> None:
        self._db = db
        templates = (
            _SEND_RESERVING,
            _SEND_RESERVED,
            _RESERVE_ROOM,
            _RELEASE_ROOM,
            _SEQ_STORED,
            _RECORD_SEQ,
            _SEND_RESERVED_DIRECT,
        )
        self._sql = [sql.format(s=schema) for sql in templates]
        self._origin = secrets.token_hex(4)  # holders of several daemons never collide
        self._releases = releases
        self._room = room
        self._stored = stored
        self._lapse_s = float(lapse_s)

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
        """Store unless full, with room reserved, unless ``seq`` was stored before."""
        capacity = self._room.of(ns, channel, capacity)
        await self._releases.written(ns, [channel])
        args = (ns, channel, client_of(channel), payload, capacity, float(expiry_s), window)
        more = (self._lapse_s, client, seq, SEQ_SPAN, self._field(holder))
        outcome: int = await self._db.fetchval(self._sql[0], *args, *more)
        if outcome == _STORED_BEFORE:
            return ALREADY_STORED
        if outcome == _FULL:
            return None
        self._stored(ns, [channel])
        return outcome

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
        """Store each into a unit of its channel's room, in order, in one statement; or,
        for channels whose owner the daemon can push to and that hold nothing in the
        database beyond send room, write it leased to ``pushes`` and push it (*Direct
        pushes* in docs/postgres.md: no notification, no take, no row per member)."""
        channels = [channel for channel, _ in items]
        clients = [client_of(channel) for channel in channels]
        payloads = [payload for _, payload in items]
        numbers = list(seqs) or [0] * len(items)
        args = (ns, channels, clients, payloads, float(expiry_s), client, numbers)
        more = (self._field(holder), SEQ_SPAN)
        leases = self._direct_leases(ns, channels, expiry_s)
        if not leases:
            outcomes: list[int] = await self._db.fetchval(self._sql[1], *args, *more)
        else:
            direct = [channel for channel, lease in zip(channels, leases, strict=True) if lease]
            with self._room.given_back_on_error(ns, direct):
                lease_s = self._room.leases.lease_s
                outcomes = await self._db.fetchval(self._sql[6], *args, *more, leases, lease_s)
            await self._push(ns, items, outcomes, leases, expiry_s)
        # One wake-up per message: each may serve a pull.
        self._stored(ns, [c for c, done in zip(channels, outcomes, strict=True) if done == _STORED])

    def _direct_leases(self, ns: str, channels: Sequence[str], expiry_s: float) -> list[int]:
        """A new lease of ours for each message the daemon can push itself (its room
        turned into a direct push reserved: ``DirectPushes.pushable``), else 0; empty
        if none."""
        pushes = self._room.pushes
        if pushes is None or not any("!" in channel for channel in channels):
            return []
        new_lease, leases = self._room.leases.new_lease, []
        for channel in channels:
            pushable = pushes.pushable(ns, [channel], [_UNCHECKED], expiry_s)
            leases.append(new_lease() if pushable else 0)
        return leases if any(leases) else []

    async def _push(
        self,
        ns: str,
        items: Sequence[tuple[str, bytes]],
        outcomes: Sequence[int],
        leases: Sequence[int],
        expiry_s: float,
    ) -> None:
        """Push what ``send_reserved_direct`` wrote to ``pushes``, in order, once the
        push takes of their channels under way have returned; give back what was
        reserved and stored instead. A channel whose owner left meanwhile has
        its messages given back to wait for its next connection, in order."""
        pushes, pushed = self._room.pushes, self._room.leases
        assert pushes is not None
        # What a push take under way took comes first: the statement saw it taken.
        direct = {c for (c, _), done in zip(items, outcomes, strict=True) if done == _PUSHED}
        for channel in direct:
            await pushed.after_takes(ns, channel)
        ttl, missed, unreserve = ttl_ms(expiry_s), dict[str, list[Taken]](), []
        for (channel, payload), outcome, lease in zip(items, outcomes, leases, strict=True):
            if not lease:
                continue
            if outcome != _PUSHED:
                unreserve.append(channel)
                continue
            name = pushed.pushed(ns, lease, 1)
            if channel in missed or pushes.push_now(ns, [channel], payload, ttl, [name]):
                missed.setdefault(channel, []).append(Taken(payload, float(expiry_s), name))
        if unreserve:
            pushes.unreserve(ns, unreserve)
        for channel, taken in missed.items():
            if await pushed.put_back(ns, channel, taken):
                self._stored(ns, [channel])

    async def reserve_room(
        self, ns: str, channel: str, *, capacity: int, window: int, size: int, holder: str = ""
    ) -> int:
        """Reserve room, storing nothing (``size`` unused: the database is on disk)."""
        capacity = self._room.of(ns, channel, capacity)
        await self._releases.written(ns, [channel])
        args = (ns, channel, client_of(channel), capacity, window, self._lapse_s)
        room: int = await self._db.fetchval(self._sql[2], *args, self._field(holder))
        return room

    async def release_room(self, ns: str, channel: str, count: int, *, holder: str = "") -> None:
        if count > 0:
            await self._db.execute(self._sql[3], ns, channel, self._field(holder), count)

    async def seq_was_stored(self, ns: str, client: str, seq: int) -> bool:
        """``backends.RecordsSeqs``: a numbered GROUP_SEND stored before?"""
        stored: bool = await self._db.fetchval(self._sql[4], ns, client, seq, SEQ_SPAN, 60.0)
        return stored

    async def record_seq(
        self, ns: str, client: str, seqs: Sequence[int], *, stored: bool, keep_s: float
    ) -> None:
        """``backends.RecordsSeqs``: a numbered GROUP_SEND's outcome, in the record."""
        args = (ns, client, list(seqs), stored, float(keep_s), SEQ_SPAN)
        await self._db.execute(self._sql[5], *args)

    def _field(self, holder: str) -> str:
        """A connection's name in ``rooms``: its holder, and this daemon's name."""
        return f"{holder} {self._origin}"
