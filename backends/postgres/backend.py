"""PostgreSQL storage on asyncpg: queues and groups shared by every daemon on one database.

Theory of operation. Each operation is one round trip on a pooled connection (``pool``):
a prepared statement (``statements``) or a call of one of the functions that ``schema``
installs (capacity check, insert and notification in one transaction; the live SQL reads
in ``schema.sql``). Sends are answered once committed (to disk, unless the URL says
``synchronous_commit=off``), and the sends that come while one commits share the next
commit (``group_commit``). A send wakes this daemon's router at once, and ``pg_notify``
wakes the others through their ``Listener``; a periodic re-check makes up for a lost
notification (``wakeups``). ``FOR UPDATE SKIP LOCKED`` lets daemons take from one
channel at once without ever handing out one message twice; a worker's message is
leased, not deleted, until handed out or its consumer's ACK (renewed until then:
``consumer_leases``), and a message pushed to a client's own channel until the client
acknowledges it (``pushed``), so a daemon killed outright loses none; takes of one
channel that queue up in this daemon go out as one, a channel that workers pull busily
has its next messages taken ahead of their pulls (``take_ahead``, ``taker``), and
releases and acknowledgements are written in the background, many per statement
(``batching``): round trips, and their system calls, are what a daemon spends its time
on. A group is sent to in slices of members (``group_sends``), so that no statement
grows with it.

A message for a channel whose owner is connected to this daemon, with nothing of that
channel waiting or held in the database, is not stored to wait: the same round trip that
checks this writes it leased to this daemon and hands it back for the daemon to push
(``DirectPushes``; ``sends``, ``group_sends``), which saves the notification and the
take. What this daemon took ahead or pushed directly counts against capacities
(``room``). A periodic sweep (``sweep``) removes expired messages, lapsed memberships
and idle channel rows in bounded batches, one daemon at a time, and vacuums the queue
tables (``vacuum``). The URL and its options: ``url``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Self

from backends import (
    Backend,
    BackendError,
    BackendStats,
    CapacityOf,
    DirectPushes,
    GroupSendResult,
    Taken,
)

from .batching import ReleaseWriter
from .group_commit import client_of
from .group_sends import GroupSends
from .listener import Listener
from .notifier import Notifier
from .pool import Database
from .pushed import PushedLeases
from .room import Room
from .schema import migrate_with, prepare_schema, quote_ident
from .sends import Sends
from .statements import Statements
from .sweep import Sweeper
from .take_ahead import Takes
from .taker import Taker
from .url import PostgresOptions
from .vacuum import Vacuum
from .wakeups import Wakeups
from .windows import FORGET_SENDERS, PostgresRoom

__all__ = ["PostgresBackend", "PostgresOptions"]

log = logging.getLogger("channels_broker.backends.postgres")

#: Messages taken ahead for busy workers go back after this long unwanted
#: (``take_ahead``); other daemons' workers wait at most this for them.
TAKE_AHEAD_LINGER_S = 0.05


class PostgresBackend(Backend):
    """Channels and groups in PostgreSQL, shared by every daemon using the same schema."""

    is_shared = True
    #: Numbered sends are recorded in the database with the message (``windows``).
    dedupes_sends = True

    def __init__(self, options: PostgresOptions) -> None:
        super().__init__()
        self.options = options
        schema = quote_ident(options.schema)
        self._sql = Statements.for_schema(schema)
        self._own_pids: set[int] = set()
        self._db = Database(options, self._own_pids)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: Listener | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._taker = Taker(self._db, self._sql, self._ready, lease_s=options.lease_s)
        self._takes = Takes(
            self._taker.take_now,
            self._taker.give_back,
            self._ready,
            self._taker.acknowledge,
            depth=options.prefetch,
            linger_s=TAKE_AHEAD_LINGER_S,
        )
        self._releases = ReleaseWriter(self._taker.write_releases)
        self._pushed = PushedLeases(self._db, self._sql, options.lease_s)
        self._room = Room(self._takes, self._pushed)
        self._notifier = Notifier(self._db, self._sql.notify)
        parts = (self._db, self._sql, self._releases, self._room, self._stored)
        self._sends = Sends(*parts)
        self._group_sends = GroupSends(*parts)
        self._wakeups = Wakeups(self._db, self._sql.recheck, self._ready)
        self.vacuum = Vacuum(self._db.fetch, self._db.connect, options.schema, schema)
        self._sweeper = Sweeper(
            self._db.fetchrow,
            self._sql.sweep,
            self._sql.stats,
            self.vacuum,
            forget_sql=FORGET_SENDERS.format(s=schema),
        )
        self._offer_windows(schema)

    def _offer_windows(self, schema: str) -> None:
        """Send windows (``backends.ReservesRoom``): room and seq records in the database."""
        parts = (self._db, schema, self._releases, self._room, self._stored)
        windows = PostgresRoom(*parts, lapse_s=self.options.room_lapse_s)
        self.send_reserving = windows.send_reserving
        self.send_reserved = windows.send_reserved
        self.reserve_room = windows.reserve_room
        self.release_room = windows.release_room
        # Numbered group sends (``backends.RecordsSeqs``): in the same record.
        self.seq_was_stored = windows.seq_was_stored
        self.record_seq = windows.record_seq

    def can_reserve_room(self) -> bool:
        return True

    def set_direct_pushes(self, pushes: DirectPushes) -> None:
        """``AcceptsDirectPushes``: the daemon's router, which pushes to its own clients."""
        self._room.pushes = pushes

    @classmethod
    def from_url(cls, url: str) -> Self:
        """Build from a ``postgresql://`` URL (its options: ``url``)."""
        return cls(PostgresOptions.from_url(url))

    # -- lifecycle -----------------------------------------------------------

    async def connect(self) -> None:
        """Open the pool, migrate (unless told not to), listen, start the periodic jobs.

        Raises ``BackendUnavailable`` if the database cannot be reached, ``BackendError``
        if the schema is missing or of another version and ``migrate`` is off.
        """
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._db.is_open:
            return
        await self.close()
        self._loop = loop
        self._wakeups.reset()
        try:
            await self._db.open()
            await self._prepare_schema()
            await self._db.warm(self._warm_up_calls())
            listener = self._listener = self._new_listener()
            await self._db.guard(listener.start())
        except BaseException:
            await self.close()
            raise
        recheck = self._wakeups.recheck_forever(
            listener, self.options.recheck_s, self.options.timeout_s
        )
        self._tasks = [loop.create_task(recheck), loop.create_task(self._sweeper.run_forever())]
        self._pushed.start()

    async def close(self) -> None:
        """Write pending releases, stop the jobs and the listener, close the pool. Idempotent."""
        with contextlib.suppress(BackendError):
            await self._releases.close()
        await self._takes.close()
        await self._taker.close()
        await self._pushed.close()
        await self._notifier.close()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.stop()
        await self._db.close()
        self._loop = None

    async def prepare_to_stop(self) -> None:
        """Take nothing more ahead, and put back what was (``take_ahead``)."""
        await self._takes.stop_taking_ahead()

    async def is_ready(self) -> bool:
        """True when a pooled connection answers and the listener is connected."""
        if not self._db.is_open or self._listener is None or not self._listener.is_listening:
            return False
        try:
            await self._db.fetchval("SELECT 1")
        except BackendError:
            return False
        return True

    async def migrate(self) -> tuple[int, int]:
        """Create or upgrade the schema; return (version before, version after)."""
        await self._db.open()
        return await self._db.run(self._migrate_with)

    # -- channels ------------------------------------------------------------

    async def send(
        self, ns: str, channel: str, payload: bytes, *, capacity: int, expiry_s: float
    ) -> bool:
        """Append unless full (capacity check and insert are one transaction), or push
        it at once if the daemon can and nothing of the channel waits (``DirectPushes``).
        """
        return await self._sends.send(ns, channel, payload, capacity, expiry_s)

    async def send_many(
        self,
        ns: str,
        items: Sequence[tuple[str, bytes]],
        *,
        capacity_of: CapacityOf,
        expiry_s: float,
    ) -> list[int]:
        """Send several messages in order in one call; return the indexes refused as full."""
        if not items:
            return []
        return await self._sends.send_many(ns, items, capacity_of, expiry_s)

    async def take(self, ns: str, channel: str, limit: int, *, hold: bool) -> list[Taken]:
        """Remove up to ``limit`` unexpired messages from the head, oldest first; takes
        of one channel that come while one is under way go out together."""
        if limit < 1:
            return []
        if hold:  # a push: leased until acknowledged (``pushed``)
            return (await self.take_many(ns, [channel], limit, hold=True))[channel]
        return await self._takes.take(ns, channel, limit, hold)

    async def take_leased(self, ns: str, channel: str, limit: int) -> list[Taken]:
        """``LeasesToConsumers``: up to ``limit`` messages of a normal channel, each
        leased (``Taken.lease``) until ``acknowledge`` or its lease lapses."""
        if limit < 1:
            return []
        taken = await self._takes.take(ns, channel, limit, False, by_consumer=True)
        self._taker.held.hold(ns, channel, taken)  # renewed until acknowledged
        return taken

    async def acknowledge(self, ns: str, channel: str, leases: Sequence[str]) -> None:
        """End leases of messages a consumer received: they are deleted in the
        background, with the other acknowledgements due, many per statement."""
        self._taker.consumed(ns, channel, leases)

    def abandon(self, ns: str, channel: str, leases: Sequence[str]) -> None:
        """``RenewsLeases``: their DELIVERs' connection closed unacknowledged."""
        self._taker.held.release(ns, channel, leases)

    async def take_many(
        self, ns: str, channels: Sequence[str], limit: int, *, hold: bool
    ) -> dict[str, list[Taken]]:
        """``take`` from several channels in one call (all reached, or an error); for
        pushes (``hold``), each message leased to this daemon until acknowledged."""
        if hold:
            taken, lost_held = await self._pushed.take(self._taker, ns, channels, limit)
            for channel, held in lost_held.items():  # given back first, and uncounted
                await self.release(ns, channel, held)
            return taken
        if len(channels) < 2:
            return await super().take_many(ns, channels, limit, hold=hold)
        return await self._taker.take_many(ns, channels, limit, hold)

    async def release(self, ns: str, channel: str, count: int) -> None:
        """Uncount ``count`` held messages (never below zero), in the background.

        This daemon's next send to the channel waits until it is written.
        """
        if count > 0:
            self._releases.add(ns, channel, count)

    async def release_taken(self, ns: str, channel: str, count: int, leases: Sequence[str]) -> None:
        """The client acknowledged pushes: their held count released, and the messages
        of their leases deleted (both in the background, many per statement)."""
        if count > 0:  # as ``release``, without a coroutine: this runs for every ACK
            self._releases.add(ns, channel, count)
        self._pushed.end(ns, channel, leases)

    async def give_back(self, ns: str, channel: str, items: Sequence[Taken], held: int) -> None:
        """Pushed messages not acknowledged, back in their places (``pushed``), then
        their held count released and the channel's daemons woken."""
        put_back = await self._pushed.put_back(ns, channel, items)
        await self.release(ns, channel, held)
        if put_back:
            self._stored(ns, [channel])

    async def channels_with_messages(self, ns: str, client_id: str) -> list[str]:
        """The client's channels holding unexpired messages (from an index on the client)."""
        rows = await self._db.fetch(self._sql.channels_with_messages, ns, client_id)
        return [row[0] for row in rows]

    # -- groups --------------------------------------------------------------

    async def group_add(self, ns: str, group: str, channel: str, *, group_expiry_s: float) -> None:
        """Add or renew a membership; it lapses ``group_expiry_s`` seconds from now."""
        args = (ns, group, channel, client_of(channel), float(group_expiry_s))
        await self._db.execute(self._sql.group_add, *args)

    async def group_discard(self, ns: str, group: str, channel: str) -> None:
        """Remove a membership; a no-op for a non-member."""
        await self._db.execute(self._sql.group_discard, ns, group, channel)

    async def group_send(
        self, ns: str, group: str, payload: bytes, *, capacity_of: CapacityOf, expiry_s: float
    ) -> GroupSendResult:
        """Send to every live member with room, in one call while the members are known
        (``group_sends``); members the daemon can push to may be left to it (``direct``).
        """
        return await self._group_sends.send(ns, group, payload, capacity_of, expiry_s)

    async def flush(self, ns: str) -> None:
        """Drop the namespace's messages, channel counters and memberships."""
        # Before: nothing taken ahead may be served or put back after the flush; after:
        # nor what rounds that were under way meanwhile took.
        self._takes.forget(ns)
        await self._takes.settled()
        await self._db.execute(self._sql.flush, ns)
        self._takes.forget(ns)
        self._pushed.forget(ns)
        self._group_sends.forget_members()

    # -- wake-ups and gauges -------------------------------------------------

    def watch(self, ns: str, key: str) -> None:
        """Wake the router for notifications about this channel or client id."""
        self._wakeups.watch(ns, key)

    def unwatch(self, ns: str, key: str) -> None:
        """Undo one ``watch``."""
        self._wakeups.unwatch(ns, key)

    async def top_channels(self, limit: int) -> list[tuple[str, str, int]] | None:
        """The channels with the most waiting messages (expired ones not yet removed too)."""
        rows = await self._db.fetch(self._sql.top_channels, limit)
        return [(row[0], row[1], row[2]) for row in rows]

    def stats(self) -> BackendStats:
        """The sweeper's last reading; ``expired_total`` counts this daemon's sweeps,
        ``given_back_total`` the messages it took again after their lease lapsed."""
        return replace(
            self._sweeper.stats,
            expired_total=self._sweeper.expired_total,
            given_back_total=self._taker.given_back_total,
        )

    # -- internals -----------------------------------------------------------

    def _ready(self, ns: str, channel: str) -> None:
        """Wake the router: through ``_on_ready`` as it is now (the router installs it
        after the parts that call this were made)."""
        self._on_ready(ns, channel)

    def _stored(self, ns: str, channels: Sequence[str]) -> None:
        """Messages of ``channels`` were committed: wake the router for each (a pull
        per message), and have the other daemons told (``notifier``)."""
        for channel in channels:
            self._on_ready(ns, channel)
        self._notifier.add(ns, channels)

    def _warm_up_calls(self) -> list[tuple[str, tuple[Any, ...]]]:
        """Calls of the hot functions that change nothing (no names, no messages)."""
        sql = self._sql
        return [
            (sql.send_batch, ([], [], [], [], [], [])),
            (sql.notify, ([],)),
            (sql.lease, ("", "", 0, 1, 1.0)),
            (sql.ack, ([], [], [], [])),
            (sql.take, ("", "", 0, False)),
        ]

    def _new_listener(self) -> Listener:
        return Listener(
            self._db.connect,
            self.options.schema,
            self._wakeups.wake_if_watched,
            self._wakeups.recheck_soon,
            self._own_pids,
        )

    async def _prepare_schema(self) -> None:
        await prepare_schema(self._db, self.options)

    async def _migrate_with(self, conn: Any) -> tuple[int, int]:
        return await migrate_with(conn, self.options)
