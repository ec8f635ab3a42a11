"""Leases on what this daemon pushes to its clients' own channels (schema version 8).

Theory of operation. A message pushed to a client outlives its daemon until the
client's layer acknowledges it, so that a daemon killed outright (SIGKILL, the OOM
killer) with pushes in its buffers loses none: its leases lapse, and the client's next
connection (to any daemon) is pushed those messages again, its layer dropping a copy
of one it handed to ``receive`` already (``HandedIds``).

Every lease of this daemon lies in its own range: a random base with its low 32 bits
0, new at each start. A message taken from the table for a push (``push_take``) stays
there, leased under the base itself, its id naming it (``<id>.<base>`` in
``Taken.lease``). A direct push (``DirectPushes``), never stored to wait, is written in
the round trip that decides on it as one ``pushes`` row per send or group send slice,
the payload once for all its members, under a lease of the range chosen before the
call (``0.<lease>``: the daemon knows it without a row id). The daemon renews its
range's leases every third of the lease while it holds pushes (one statement), ends
them in the background as ACKs come, many per statement (``AckWriter``: a taken
message is deleted at its ACK, a ``pushes`` row once every member has acknowledged
it), and gives back what a closing connection did not acknowledge. Each tick it also
turns the ``pushes`` rows of dead daemons (lapsed) into waiting messages, one per
member (``expand_pushes``): a member that had acknowledged one gets it again, and its
layer drops it by its message id.

Each take for a push leases under a value of its own (``new_lease``). One whose answer
never came (the statement timed out, its connection broke: a storage restart or
stall) may have committed: its messages stay leased, and renewed with our range while
we hold pushes of their channel, and newer ones were pushed before them. So its lease
is kept, and the channel's next take first puts back what it leased, in its places
(``take``, ``unlease_lost``): a take that never ran leased nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Iterator, Sequence
from typing import Any

from backends import Taken
from backends.renewer import Renewer
from protocol import client_id_of, is_process_specific

from .batching import Ack, AckWriter
from .pool import Database
from .statements import Statements
from .taker import Taker

__all__ = ["PushedLeases", "parse_push_lease"]

log = logging.getLogger("channels_broker.backends.postgres")

#: A daemon's leases: base + 0 .. base + LEASE_RANGE - 1.
LEASE_RANGE = 2**32
#: Lapsed ``pushes`` rows one statement turns into waiting messages at most.
EXPAND_MOST = 1000

#: Lost takes' leases kept per channel at most (``lost``).
LOST_MOST = 64

#: (namespace, channel)
ChannelKey = tuple[str, str]


class PushedLeases:
    """The leases of this daemon's pushes: their values, renewal, ends and give-backs."""

    def __init__(self, db: Database, sql: Statements, lease_s: float) -> None:
        self._db = db
        self._sql = sql
        self.lease_s = lease_s
        #: This daemon's range, new at each start: a killed daemon's leases are not ours.
        self.base = (secrets.randbits(31) or 1) * LEASE_RANGE
        self._last = 0
        #: Messages taken for pushes and held leased, by channel (renewed while above 0).
        self._live: dict[ChannelKey, int] = {}
        #: Direct pushes: a ``pushes`` row's lease as its members' ``Taken.lease``
        #: (``0.<lease>``) -> [members not done, namespace, lease].
        self._rows: dict[str, list[Any]] = {}
        self.acks = AckWriter(self._write_acks, retry_for_s=lease_s)
        self._ends = AckWriter(self._write_ends, retry_for_s=lease_s)
        self._renewer = Renewer("the leases of pushed messages", lease_s, self._tick, log)
        #: Leases of takes whose answer was lost, by channel (``lost``).
        self._lost: dict[ChannelKey, list[int]] = {}
        #: Push takes under way, by channel, each a future done when it returned.
        self._taking: dict[ChannelKey, list[asyncio.Future[None]]] = {}

    async def take(
        self, taker: Taker, ns: str, channels: Sequence[str], limit: int
    ) -> tuple[dict[str, list[Taken]], dict[str, int]]:
        """A take for a push, under a lease of its own, after putting back what our
        takes of ``channels`` whose answer was lost leased: (what it took, how many
        of those put back each channel had counted as held, to release). Direct pushes
        of windowed sends to ``channels`` wait for it (``taking``, ``PostgresRoom``)."""
        with self.taking(ns, channels):
            held = await self._unlease_lost(ns, channels)
            lease = self.new_lease()
            try:
                taken = await taker.take_pushed(ns, channels, limit, lease)
            except BaseException:
                for channel in channels:  # it may have run
                    kept = self._lost.setdefault((ns, channel), [])
                    kept.append(lease)
                    del kept[:-LOST_MOST]  # bounded: a failing channel is taken again soon
                raise
            for channel, items in taken.items():
                if items:
                    self.held(ns, channel, len(items))
        return taken, held

    async def _unlease_lost(self, ns: str, channels: Sequence[str]) -> dict[str, int]:
        """Put back in their places what our lost takes of ``channels`` leased; return
        how many each had counted as held."""
        held: dict[str, int] = {}
        for channel in channels:
            leases = self._lost.get((ns, channel))
            if leases:
                rows = await self._db.fetch(self._sql.unlease_lost, ns, channel, leases)
                held[channel] = int(rows[0][1])
                del self._lost[(ns, channel)]
        return held

    @contextlib.contextmanager
    def taking(self, ns: str, channels: Sequence[str]) -> Iterator[None]:
        """A push take of ``channels`` is under way (``after_takes`` waits for it)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        keys = [(ns, channel) for channel in channels]
        for key in keys:
            self._taking.setdefault(key, []).append(done)
        try:
            yield
        finally:
            for key in keys:
                under_way = self._taking[key]
                under_way.remove(done)
                if not under_way:
                    del self._taking[key]
            done.set_result(None)

    async def after_takes(self, ns: str, channel: str) -> None:
        """Wait until the push takes of ``channel`` under way now have returned: their
        messages are then written to the owner's connection (in the same step as the
        take returns), and a direct push written after them keeps its place."""
        under_way = self._taking.get((ns, channel))
        if under_way:
            await asyncio.wait(list(under_way))

    def new_lease(self) -> int:
        """A lease of our range for one ``pushes`` row."""
        self._last = self._last % (LEASE_RANGE - 1) + 1
        return self.base + self._last

    def held(self, ns: str, channel: str, count: int) -> None:
        """``count`` more messages of ``channel`` were taken for pushes, leased to us."""
        key = (ns, channel)
        self._live[key] = self._live.get(key, 0) + count

    def pushed(self, ns: str, lease: int, members: int) -> str:
        """A ``pushes`` row of ours went to ``members`` directly: return its members'
        ``Taken.lease`` (one string for all)."""
        name = f"0.{lease}"
        if members:
            self._rows[name] = [members, ns, lease]
        return name

    def end(self, ns: str, channel: str, leases: Sequence[str]) -> None:
        """The client acknowledged the pushes of these leases: their messages go (in
        the background, with the other ends due)."""
        rows, taken = self._rows, []
        for lease in leases:
            row = rows.get(lease)
            if row is not None:  # a direct push (most of them, in a big group)
                row[0] -= 1
                if row[0] <= 0:
                    del rows[lease]
                    self._ends.add(row[1], "", [(0, row[2])])
            elif parsed := parse_push_lease(lease):
                taken.append(parsed)
        if taken:
            self.acks.add(ns, channel, taken)
            self._unhold(ns, channel, len(taken))

    def member_done(self, lease: str) -> None:
        """A member of a direct push (``0.<lease>``) is done with it (its owner left)."""
        self.end("", "", [lease])

    async def put_back(self, ns: str, channel: str, items: Sequence[Taken]) -> bool:
        """Pushes not acknowledged (``Backend.give_back``) back before what waits, in
        order: taken ones unleased in their places if all were taken from the table,
        else every one written again at the head of its channel (unless expired; the
        taken ones' rows deleted first). True if any went back."""
        parsed = [parse_push_lease(item.lease) for item in items]
        taken = [pair for pair in parsed if pair is not None and pair[0]]
        if taken:
            self._unhold(ns, channel, len(taken))
        if taken and len(taken) == len(items):
            ids, leases = [id_ for id_, _ in taken], [lease for _, lease in taken]
            await self._db.execute(self._sql.unlease_pushed, ns, channel, ids, leases)
            return True
        self.end(ns, channel, [item.lease for item in items if item.lease in self._rows])
        if taken:
            await self._write_acks([(ns, channel, id_, lease) for id_, lease in taken])
        now = time.monotonic()
        live = [
            (item.payload, left)
            for item in items
            if (left := (item.deadline or now + item.ttl_s) - now) > 0
        ]
        if live:
            payloads, ttls = [payload for payload, _ in live], [ttl for _, ttl in live]
            client = client_id_of(channel) if is_process_specific(channel) else None
            await self._db.execute(self._sql.give_back, ns, channel, client, payloads, ttls)
        return bool(live)

    def forget(self, ns: str) -> None:
        """The namespace was flushed: nothing of it to renew or end."""
        for key in [key for key in self._live if key[0] == ns]:
            del self._live[key]
        for lease in [lease for lease, row in self._rows.items() if row[1] == ns]:
            del self._rows[lease]
        for key in [key for key in self._lost if key[0] == ns]:
            del self._lost[key]

    def _unhold(self, ns: str, channel: str, count: int) -> None:
        key = (ns, channel)
        left = self._live.get(key, 0) - count
        if left > 0:
            self._live[key] = left
        else:
            self._live.pop(key, None)

    async def _write_acks(self, acks: list[Ack]) -> None:
        """``AckWriter``'s one statement: (namespace, channel, id, lease) each."""
        columns = ([a[0] for a in acks], [a[1] for a in acks], [a[2] for a in acks])
        await self._db.execute(self._sql.ack_pushed, *columns, [a[3] for a in acks])

    async def _write_ends(self, ends: list[Ack]) -> None:
        """The ``pushes`` rows every member is done with: one statement."""
        await self._db.execute(self._sql.end_pushes, [end[3] for end in ends])

    # -- renewal ---------------------------------------------------------------

    def start(self) -> None:
        self._renewer.start()

    async def close(self) -> None:
        """Stop renewing; write the ends still due (best effort)."""
        await self._renewer.close()
        await self.acks.close()
        await self._ends.close()

    async def _tick(self) -> None:
        """Every third of the lease: renew ours, expand dead daemons' ``pushes`` rows."""
        async with self.acks.exclusive():  # an ``ack_pushed`` beside it would skip rows
            await self.renew_once()
        await self._db.execute(self._sql.expand_pushes, EXPAND_MOST)

    async def renew_once(self) -> None:
        """Every lease of our range runs a whole lease from now: one statement."""
        if not self._live and not self._rows:
            return
        keys = list(self._live)
        spaces, channels = [key[0] for key in keys], [key[1] for key in keys]
        high = self.base + LEASE_RANGE - 1
        await self._db.execute(
            self._sql.renew_pushed, spaces, channels, self.base, high, self.lease_s
        )


def parse_push_lease(lease: str) -> tuple[int, int] | None:
    """(id or 0, lease) of a push's ``Taken.lease``; None if it is not of that form."""
    id_, dot, value = lease.partition(".")
    if not dot or not id_.isdigit() or not value.isdigit():
        return None
    return int(id_), int(value)
