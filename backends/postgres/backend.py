"""PostgreSQL storage on asyncpg: queues and groups shared by every daemon on one database.

Theory of operation. Each operation is one round trip on a pooled connection
(``postgres_pool``): a prepared statement or a call of one of the functions that
``postgres_schema`` installs (capacity check, insert and notification in one
transaction). A send wakes this daemon's router at once, and ``pg_notify`` wakes the
others through their ``Listener``. Nothing is lost when a notification is: every
``recheck_interval`` seconds (and right after the listener reconnects) one query finds
the waiting channels of what this daemon watches and wakes them, so a missed
notification delays a message by at most that interval. ``FOR UPDATE SKIP LOCKED``
lets daemons take from one channel at once without ever handing out one message twice;
takes of one channel that queue up in this daemon go out as one, a channel that
workers pull busily has its next messages taken ahead of their pulls
(``postgres_takes``), and releases are written in the background, many per statement
(``postgres_batching``): round trips, and their system calls, are what a daemon
spends its time on.

A message for a channel whose owner is connected to this daemon, with nothing of that
channel waiting or held in the database, is not stored at all: the same round trip
that checks this hands it back for the daemon to push (``DirectPushes``), which saves
the insert, the notification and the take. A periodic sweep (``postgres_sweep``)
removes expired messages, lapsed memberships and idle channel rows in bounded
batches, one daemon at a time, and vacuums the queue tables. The URL and its options:
``postgres_url``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Sequence
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
from protocol import client_id_of, is_process_specific

from .batching import ReleaseWriter
from .listener import Listener
from .pool import Database
from .schema import (
    SCHEMA_VERSION,
    current_version,
    migrate,
    quote_ident,
    quote_literal,
)
from .statements import Statements
from .sweep import Sweeper
from .takes import Ahead, Takes
from .url import PostgresOptions
from .vacuum import Vacuum

__all__ = ["PostgresBackend", "PostgresOptions"]

log = logging.getLogger("channels_broker.backends.postgres")

#: Groups whose member list a daemon remembers (to send with one round trip).
MEMBER_CACHE_GROUPS = 10_000
#: Payloads up to this size taken recently are shared by identity (see ``_interned``):
#: a group send's payload is usually small, and hashing a large one costs more than
#: the frames it would save.
INTERN_MAX_BYTES = 64 * 1024
INTERN_ENTRIES = 1024
#: Messages taken ahead for busy workers go back after this long unwanted
#: (``postgres_takes``); other daemons' workers wait at most this for them.
TAKE_AHEAD_LINGER_S = 0.05


class PostgresBackend(Backend):
    """Channels and groups in PostgreSQL, shared by every daemon using the same schema."""

    is_shared = True

    def __init__(self, options: PostgresOptions) -> None:
        super().__init__()
        self.options = options
        self._sql = Statements(quote_ident(options.schema), quote_literal(options.schema))
        self._direct: DirectPushes | None = None
        self._own_pids: set[int] = set()
        self._db = Database(options, self._own_pids)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: Listener | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._recheck_now = asyncio.Event()
        self._watched: dict[tuple[str, str], int] = {}
        self._members: dict[tuple[str, str], tuple[str, ...]] = {}
        self._payloads: dict[bytes, bytes] = {}
        self._takes = Takes(
            self._take_now,
            self._give_back,
            lambda ns, channel: self._on_ready(ns, channel),  # installed later: look it up
            depth=options.prefetch,
            linger_s=TAKE_AHEAD_LINGER_S,
        )
        self._releases = ReleaseWriter(self._write_releases)
        self.vacuum = Vacuum(
            self._db.fetch, self._db.connect, options.schema, quote_ident(options.schema)
        )
        self._sweeper = Sweeper(self._db.fetchrow, self._sql.sweep, self._sql.stats, self.vacuum)

    def set_direct_pushes(self, pushes: DirectPushes) -> None:
        """``AcceptsDirectPushes``: the daemon's router, which pushes to its own clients."""
        self._direct = pushes

    @classmethod
    def from_url(cls, url: str) -> Self:
        """Build from a ``postgresql://`` URL (its options: ``postgres_url``)."""
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
        self._recheck_now = asyncio.Event()
        try:
            await self._db.open()
            await self._prepare_schema()
            self._listener = Listener(
                self._db.connect,
                self.options.schema,
                self._wake_if_watched,
                self._recheck_now.set,
                self._own_pids,
            )
            await self._db.guard(self._listener.start())
        except BaseException:
            await self.close()
            raise
        self._tasks = [
            loop.create_task(self._recheck_forever()),
            loop.create_task(self._sweeper.run_forever()),
        ]

    async def close(self) -> None:
        """Write pending releases, stop the jobs and the listener, close the pool. Idempotent."""
        with contextlib.suppress(BackendError):
            await self._releases.close()
        await self._takes.close()
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
        """Take nothing more ahead, and put back what was (``postgres_takes``)."""
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
        pushes, capacities = self._direct, [self._less_ahead(ns, channel, capacity)]
        direct = [] if pushes is None else pushes.pushable(ns, [channel], capacities, expiry_s)
        capacity = capacities[0]
        if capacity < 1:
            return False
        with self._given_back_on_error(ns, direct):
            await self._releases.written(ns, [channel])
            outcome = await self._send(ns, channel, payload, capacity, expiry_s, bool(direct))
        if pushes is not None and direct:
            if outcome != _SENT_DIRECT:
                pushes.unreserve(ns, direct)
            elif not pushes.push_now(ns, direct, payload, _ttl_ms(expiry_s)):
                return True
            else:  # its owner left meanwhile (and its count with it): store it
                outcome = await self._send(ns, channel, payload, capacity, expiry_s, False)
        if outcome == _STORED:
            self._on_ready(ns, channel)
        return outcome != _REFUSED

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
        await self._releases.written(ns, [c for c, _ in items])
        channels = [channel for channel, _ in items]
        args = (
            ns,
            channels,
            [_client_of(channel) for channel in channels],
            [payload for _, payload in items],
            [self._room(ns, channel, capacity_of(channel)) for channel in channels],
            float(expiry_s),
        )
        refused: list[int] = await self._db.fetchval(self._sql.send_many, *args)
        refused_set = set(refused)
        for index, channel in enumerate(channels):
            if index not in refused_set:
                self._on_ready(ns, channel)  # one per message: each may serve a pull
        return list(refused)

    async def take(self, ns: str, channel: str, limit: int, *, hold: bool) -> list[Taken]:
        """Remove up to ``limit`` unexpired messages from the head, oldest first.

        Takes of one channel that come while one is under way go out together.
        """
        if limit < 1:
            return []
        return await self._takes.take(ns, channel, limit, hold)

    async def take_many(
        self, ns: str, channels: Sequence[str], limit: int, *, hold: bool
    ) -> dict[str, list[Taken]]:
        """``take`` from several channels in one call (all reached, or an error)."""
        if len(channels) < 2:
            return await super().take_many(ns, channels, limit, hold=hold)
        sql, names = self._sql.take_many, list(channels)
        rows = await self._db.fetch(sql, ns, names, limit, hold)
        taken: dict[str, list[Taken]] = {channel: [] for channel in channels}
        for channel, payload, ttl_s in rows:
            taken[channel].append(Taken(self._interned(payload), max(0.0, ttl_s)))
        return taken

    async def release(self, ns: str, channel: str, count: int) -> None:
        """Uncount ``count`` held messages (never below zero), in the background.

        This daemon's next send to the channel waits until it is written.
        """
        if count > 0:
            self._releases.add(ns, channel, count)

    async def channels_with_messages(self, ns: str, client_id: str) -> list[str]:
        """The client's channels holding unexpired messages (from an index on the client)."""
        sql = self._sql.channels_with_messages
        rows = await self._db.fetch(sql, ns, client_id)
        return [row[0] for row in rows]

    # -- groups --------------------------------------------------------------

    async def group_add(self, ns: str, group: str, channel: str, *, group_expiry_s: float) -> None:
        """Add or renew a membership; it lapses ``group_expiry_s`` seconds from now."""
        args = (ns, group, channel, _client_of(channel), float(group_expiry_s))
        await self._db.execute(self._sql.group_add, *args)

    async def group_discard(self, ns: str, group: str, channel: str) -> None:
        """Remove a membership; a no-op for a non-member."""
        await self._db.execute(self._sql.group_discard, ns, group, channel)

    async def group_send(
        self, ns: str, group: str, payload: bytes, *, capacity_of: CapacityOf, expiry_s: float
    ) -> GroupSendResult:
        """Send to every live member with room, in one call while the members are known.

        The capacities come from the sender's policy, so they are passed in for the
        members this daemon last saw; members it did not know of get a second call.
        Members the daemon can push to are left to it if nothing of theirs waits or is
        held here (``direct``, see ``DirectPushes``): no row is written for them.
        """
        await self._releases.written(ns)
        key = (ns, group)
        known = self._members.get(key, ())
        delivered, skipped, unknown, stale, direct = await self._group_send(
            ns, group, payload, expiry_s, known, capacity_of
        )
        members = [] if stale else list(known)
        if unknown:
            with self._given_back_on_error(ns, direct):
                more = await self._group_send(ns, group, payload, expiry_s, unknown, capacity_of)
            delivered += more[0]
            skipped += more[1]
            direct += more[4]
            members += unknown
        self._remember_members(key, members)
        for channel in delivered:
            self._on_ready(ns, channel)
        return GroupSendResult(delivered=delivered, skipped=skipped, direct=direct)

    async def flush(self, ns: str) -> None:
        """Drop the namespace's messages, channel counters and memberships."""
        # Before: nothing taken ahead may be served or put back after the flush; after:
        # nor what rounds that were under way meanwhile took.
        self._takes.forget(ns)
        await self._takes.settled()
        await self._db.execute(self._sql.flush, ns)
        self._takes.forget(ns)
        self._members.clear()

    # -- wake-ups ------------------------------------------------------------

    def watch(self, ns: str, key: str) -> None:
        """Wake the router for notifications about this channel or client id."""
        self._watched[(ns, key)] = self._watched.get((ns, key), 0) + 1

    def unwatch(self, ns: str, key: str) -> None:
        """Undo one ``watch``."""
        count = self._watched.get((ns, key), 0)
        if count <= 1:
            self._watched.pop((ns, key), None)
        else:
            self._watched[(ns, key)] = count - 1

    async def top_channels(self, limit: int) -> list[tuple[str, str, int]] | None:
        """The channels with the most waiting messages (expired ones not yet removed too)."""
        rows = await self._db.fetch(self._sql.top_channels, limit)
        return [(row[0], row[1], row[2]) for row in rows]

    def stats(self) -> BackendStats:
        """The sweeper's last reading; ``expired_total`` counts this daemon's sweeps."""
        return replace(self._sweeper.stats, expired_total=self._sweeper.expired_total)

    # -- internals -----------------------------------------------------------

    async def _prepare_schema(self) -> None:
        if self.options.migrate:
            before, after = await self._db.run(self._migrate_with)
            if before != after:
                log.info(
                    "migrated schema %s from version %d to %d", self.options.schema, before, after
                )
            return
        version = await self._db.run(lambda conn: current_version(conn, self.options.schema))
        if version != SCHEMA_VERSION:
            raise BackendError(
                f"schema {self.options.schema} is at version {version}, this daemon needs "
                f"{SCHEMA_VERSION}: run 'channels-broker migrate' first, "
                "or start without --no-migrate"
            )

    async def _migrate_with(self, conn: Any) -> tuple[int, int]:
        try:
            return await migrate(conn, self.options.schema, unlogged=self.options.unlogged)
        except ValueError as exc:
            raise BackendError(str(exc)) from exc

    async def _group_send(
        self,
        ns: str,
        group: str,
        payload: bytes,
        expiry_s: float,
        channels: Sequence[str],
        capacity_of: CapacityOf,
    ) -> tuple[list[str], int, list[str], bool, list[str]]:
        """One call of ``group_send_direct``: (delivered, skipped, unknown, stale, direct)."""
        capacities = [capacity_of(c) for c in channels]
        if self._takes.has_lines:  # a normal channel among the members may be pulled
            capacities = [
                self._less_ahead(ns, c, n) for c, n in zip(channels, capacities, strict=True)
            ]
        pushes = self._direct
        direct = [] if pushes is None else pushes.pushable(ns, channels, capacities, expiry_s)
        chosen = set(direct)
        pairs = list(zip(channels, capacities, strict=True))
        stored = [pair for pair in pairs if pair[0] not in chosen]
        stored_direct = [pair for pair in pairs if pair[0] in chosen] if chosen else []
        args = (
            ns,
            group,
            payload,
            float(expiry_s),
            " ".join(c for c, _ in stored),
            " ".join(str(n) for _, n in stored),
            " ".join(c for c, _ in stored_direct),
            " ".join(str(n) for _, n in stored_direct),
            " ".join({client_id_of(c) for c in direct}),
        )
        with self._given_back_on_error(ns, direct):
            row = await self._db.fetchrow(self._sql.group_send, *args)
        confirmed: list[str] = row[4].split()
        if pushes is not None and len(confirmed) < len(direct):
            kept = set(confirmed)
            pushes.unreserve(ns, [channel for channel in direct if channel not in kept])
        return row[0], row[1], row[2], row[3], confirmed

    @contextlib.contextmanager
    def _given_back_on_error(self, ns: str, direct: list[str]) -> Iterator[None]:
        """Give back the direct-push reservations of ``direct`` if the body fails (or is
        cancelled): nobody will push those messages now."""
        try:
            yield
        except BaseException:
            if direct and self._direct is not None:
                self._direct.unreserve(ns, direct)
            raise

    def _room(self, ns: str, channel: str, capacity: int) -> int:
        """``capacity`` less what of ``channel`` waits outside the database: what was
        taken ahead, or pushed directly and not acknowledged."""
        pushes = self._direct
        if "!" in channel and pushes is not None:
            return capacity - pushes.held_direct(ns, channel)
        return self._less_ahead(ns, channel, capacity)

    def _less_ahead(self, ns: str, channel: str, capacity: int) -> int:
        """``capacity`` less what this daemon took ahead of a normal channel (a
        process-specific one's direct pushes are ``pushable``'s to count)."""
        if "!" in channel:
            return capacity
        return capacity - self._takes.waiting_ahead(ns, channel)

    async def _send(
        self, ns: str, channel: str, payload: bytes, capacity: int, expiry_s: float, direct: bool
    ) -> int:
        args = (ns, channel, _client_of(channel), payload, capacity, float(expiry_s), direct)
        outcome: int = await self._db.fetchval(self._sql.send, *args)
        return outcome

    async def _take_now(self, ns: str, channel: str, limit: int, hold: bool) -> list[Ahead]:
        rows = await self._db.fetch(self._sql.take, ns, channel, limit, hold)
        if rows and rows[0][3]:
            # More wait: wake the next puller too. One notification (or re-check) may
            # stand for many messages, and each wake-up serves one pull.
            self._on_ready(ns, channel)
        now = asyncio.get_running_loop().time()
        return [Ahead(row[0], self._interned(row[1]), now + max(0.0, row[2])) for row in rows]

    async def _give_back(self, ns: str, channel: str, items: list[Ahead]) -> None:
        now = asyncio.get_running_loop().time()
        args = (
            ns,
            channel,
            [item.id for item in items],
            [item.payload for item in items],
            [item.deadline - now for item in items],
        )
        await self._db.execute(self._sql.give_back, *args)

    async def _write_releases(self, releases: list[tuple[str, str, int]]) -> None:
        args = ([r[0] for r in releases], [r[1] for r in releases], [r[2] for r in releases])
        await self._db.execute(self._sql.release_many, *args)

    def _interned(self, payload: bytes) -> bytes:
        """One object for equal payloads: members of one connection then share a PUSH.

        A group send's copies come back from each member's take as separate objects;
        the connection merges deliveries by payload identity, as with ``memory://``.
        """
        if len(payload) > INTERN_MAX_BYTES:
            return payload
        same = self._payloads.get(payload)
        if same is not None:
            return same
        if len(self._payloads) >= INTERN_ENTRIES:
            self._payloads.clear()
        self._payloads[payload] = payload
        return payload

    def _remember_members(self, key: tuple[str, str], members: list[str]) -> None:
        if len(self._members) >= MEMBER_CACHE_GROUPS:
            self._members.clear()
        self._members[key] = tuple(dict.fromkeys(members))

    def _wake_if_watched(self, ns: str, channel: str) -> None:
        key = client_id_of(channel) if is_process_specific(channel) else channel
        if (ns, key) in self._watched:
            self._on_ready(ns, channel)

    async def _recheck_forever(self) -> None:
        """Every ``recheck_s`` (or when the listener is back): wake what has messages."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.options.recheck_s):
                    await self._recheck_now.wait()
            self._recheck_now.clear()
            if self._listener is not None:
                await self._listener.ping(self.options.timeout_s)
            try:
                await self._recheck()
            except BackendError as exc:
                log.debug("re-check failed: %s", exc)

    async def _recheck(self) -> None:
        if not self._watched:
            return
        spaces = [ns for ns, _ in self._watched]
        keys = [key for _, key in self._watched]
        rows = await self._db.fetch(self._sql.recheck, spaces, keys)
        for ns, channel in rows:
            self._wake_if_watched(ns, channel)


#: What ``send_direct`` answers.
_REFUSED, _STORED, _SENT_DIRECT = 0, 1, 2


def _ttl_ms(expiry_s: float) -> int:
    return int(expiry_s * 1000)


def _client_of(channel: str) -> str | None:
    return client_id_of(channel) if is_process_specific(channel) else None
