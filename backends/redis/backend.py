"""Redis storage: durable queues and groups that several daemons share.

Theory of operation. Data lives in Redis under hash-tagged keys (``keys``) and
changes only through Lua scripts (``scripts``), one script call per operation,
so every capacity check is atomic with its insert and a send costs one round trip.
Commands of all connections of a daemon share one auto-pipelined Redis connection
per server (``pipe``; ``topology`` says which server holds a key), so concurrent
operations share writes and reads, and Redis runs them in the order they were
issued: that is why a release is only queued (``commands``).

``RedisBackend`` keeps the storage contract and hands each operation to the part
that knows it:

* ``sends``: send, send_many and group_send (PUSH and GROUP_SEND scripts);
* ``takes``: take, take_many and channels_with_messages (TAKE), serving first the
  stash of messages a send handed straight back, held, for an owner attached here
  (``stash``), which spares the take's round trip; a worker's message is taken under
  a lease (``leases``), so that a fault between the take and its pull loses none;
* ``wakeups``: watch and unwatch, and messages published by other daemons, which
  become ``on_ready(ns, channel)`` here, with the gaps a wake-up can fall into closed;
* ``commands``: the topology while connected, queued releases, background work;
* ``stats``: gauges and the longest queues, by SCAN.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import defaultdict
from collections.abc import Sequence
from typing import Self

from backends import (
    Backend,
    BackendError,
    BackendStats,
    CapacityOf,
    EdgeOwners,
    GroupSendResult,
    Taken,
)

from .commands import Commands
from .edge import EdgeFanOuts
from .edge_scripts import GROUP_DISCARD
from .keys import KEEP_MARGIN_MS, Keys
from .leases import Leases
from .pipe import Pipe
from .remote import RemoteFanOuts
from .room import RedisRoom
from .scripts import GROUP_ADD
from .sends import Sends
from .stats import read_stats, read_top_channels
from .takes import Takes
from .topology import Topology
from .url import RedisSettings
from .wakeups import Subscriptions, Wakeups

__all__ = ["RedisBackend"]

log = logging.getLogger("channels_broker.backends.redis")

#: Gauges are read from Redis this often (a SCAN of our keys; ``stats`` does no I/O).
STATS_INTERVAL_S = 15.0


class RedisBackend(Backend):
    """Channels and groups in Redis (standalone, Sentinel or Cluster), shared by daemons."""

    is_shared = True
    #: Numbered sends are recorded in Redis with the message (``room``).
    dedupes_sends = True

    def __init__(self, settings: RedisSettings) -> None:
        super().__init__()
        self.settings = settings
        self._keys = Keys(settings.prefix)
        origin = secrets.token_hex(4)  # names us in our wake-ups: we ignore our echo
        self._commands = Commands()
        subs = Subscriptions(self._keys)
        self._leases = Leases(self._keys, self._commands, settings.lease_s, subs.watched_channels)
        self._takes = Takes(self._keys, self._commands, self._notify, self._leases)
        self._edge = EdgeFanOuts(
            self._keys, self._commands, settings.lease_s, self._takes.wake, origin
        )
        self._sends = Sends(
            settings.prefix,
            self._keys,
            self._commands,
            self._takes,
            subs,
            self._edge,
            origin=origin,
        )
        self._wakeups = Wakeups(subs, self._commands, self._takes, origin=origin.encode())
        self._remote = RemoteFanOuts(self._keys, self._commands, self._edge, self._wakeups)
        self._room = RedisRoom(
            self._keys, self._commands, self._takes, origin=origin, lapse_s=settings.room_lapse_s
        )
        # Send windows (``backends.ReservesRoom``): the room and seq record live in Redis.
        self.can_reserve_room = self._room.can_reserve_room
        self.send_reserving = self._room.send_reserving
        self.send_reserved = self._room.send_reserved
        self.reserve_room = self._room.reserve_room
        self.release_room = self._room.release_room
        # Numbered group sends (``backends.RecordsSeqs``): in the same record.
        self.seq_was_stored = self._room.seq_was_stored
        self.record_seq = self._room.record_seq
        self._stats_task: asyncio.Task[None] | None = None
        self._stats = BackendStats(0, 0, 0, 0, 0)

    @classmethod
    def from_url(cls, url: str) -> Self:
        """Any URL form of ``redis_url``; raise ``BackendError`` for a bad one."""
        return cls(RedisSettings.from_url(url))

    # -- lifecycle -------------------------------------------------------------

    async def connect(self) -> None:
        """Connect to Redis and load the scripts; raise ``BackendUnavailable``."""
        if self._commands.topology is not None:
            return
        topology = Topology(
            self.settings,
            on_message=self._wakeups.on_message,
            on_subscribed=self._wakeups.on_subscribed,
            on_up=self._wakeups.rewake_all,
        )
        try:
            await topology.open()
        except BaseException:
            await topology.close()
            raise
        self._commands.topology = topology
        self._wakeups.start()
        self._leases.start()
        self._takes.pushed.start()
        self._edge.start()
        self._remote.start()
        self._stats_task = asyncio.get_running_loop().create_task(self._sample_stats())

    async def close(self) -> None:
        """Close every connection. Idempotent; the data stays in Redis."""
        if self._commands.topology is not None:
            # Grabbed messages go back to Redis, and background work (such as that,
            # for owners who just left) gets a moment to finish.
            self._takes.return_all()
            await self._leases.flush()
            await self._commands.settle(self.settings.timeout_s)
        self._leases.stop()
        self._edge.stop()
        self._remote.stop()
        self._takes.stop()
        self._wakeups.stop()
        if self._stats_task is not None:
            self._stats_task.cancel()
            self._stats_task = None
        await self._commands.close()

    async def is_ready(self) -> bool:
        """True when every connection is up and Redis answers PING within the timeout."""
        topology = self._commands.topology
        if topology is None or not topology.is_up():
            return False
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                for pipe in topology.pipes():
                    await pipe.execute("PING")
        except (BackendError, TimeoutError):
            return False
        return True

    # -- channels --------------------------------------------------------------

    async def send(
        self, ns: str, channel: str, payload: bytes, *, capacity: int, expiry_s: float
    ) -> bool:
        """Append unless full; the check and the append are one script."""
        refused = await self._sends.push(ns, [(channel, payload, capacity)], expiry_s)
        return not refused

    async def send_many(
        self,
        ns: str,
        items: Sequence[tuple[str, bytes]],
        *,
        capacity_of: CapacityOf,
        expiry_s: float,
    ) -> list[int]:
        """Send in order (one script per Cluster slot); return the refused indexes."""
        capacities = await capacity_of.all_of([channel for channel, _ in items])
        targets = [(c, p, n) for (c, p), n in zip(items, capacities, strict=True)]
        return await self._sends.push(ns, targets, expiry_s)

    async def take(self, ns: str, channel: str, limit: int, *, hold: bool) -> list[Taken]:
        """Pop up to ``limit`` unexpired messages; with ``hold`` they stay counted."""
        return (await self._takes.take(ns, [channel], limit, hold))[channel]

    async def take_many(
        self, ns: str, channels: Sequence[str], limit: int, *, hold: bool
    ) -> dict[str, list[Taken]]:
        """``take`` from each channel: one script per Cluster slot (a client's channels
        share one), all pipelined, so about one round trip."""
        return await self._takes.take_many(ns, channels, limit, hold)

    async def take_leased(self, ns: str, channel: str, limit: int) -> list[Taken]:
        """Up to ``limit`` messages of a normal channel, leased until ``acknowledge``."""
        if limit < 1:
            return []
        return await self._takes.take_leased(ns, channel, limit)

    async def acknowledge(self, ns: str, channel: str, leases: Sequence[str]) -> None:
        """End leases of messages a consumer received (written with this pass's others)."""
        if self._commands.topology is not None:
            self._leases.acknowledge(ns, channel, leases)

    def abandon(self, ns: str, channel: str, leases: Sequence[str]) -> None:
        """``RenewsLeases``: their DELIVERs' connection closed unacknowledged."""
        self._leases.release(ns, channel, leases)

    async def give_back(self, ns: str, channel: str, items: Sequence[Taken], held: int) -> None:
        """Pushed messages not acknowledged, back at the head of the queue: one script."""
        await self._takes.give_back(ns, channel, items, held)

    async def release(self, ns: str, channel: str, count: int) -> None:
        """Queue the release and return; it is sent before any later command of this
        daemon (and with the other releases of this loop pass, as one script).

        If the connection breaks before Redis runs it, the count lapses with the held
        messages' deadlines.
        """
        self._commands.release(self._keys.held(ns, channel), count)

    async def release_taken(self, ns: str, channel: str, count: int, leases: Sequence[str]) -> None:
        """As ``release``; the leases of pushed messages end with it (``pushed``)."""
        if leases:
            self._takes.pushed.end(ns, channel, leases)
        self._commands.release(self._keys.held(ns, channel), count - len(leases))

    async def channels_with_messages(self, ns: str, client_id: str) -> list[str]:
        """The client's channels with unexpired messages (one script on its slot), once
        the client is marked attached here, if it is (``remote``)."""
        await self._remote.attach(ns, client_id)
        return await self._takes.channels_with_messages(ns, client_id)

    # -- groups ----------------------------------------------------------------

    async def group_add(self, ns: str, group: str, channel: str, *, group_expiry_s: float) -> None:
        """Add or renew; the membership lapses ``group_expiry_s`` after this call."""
        expiry_ms = max(1, round(group_expiry_s * 1000))
        keys = [self._keys.group(ns, group), self._keys.group_version(ns, group)]
        args = [channel, expiry_ms, KEEP_MARGIN_MS, secrets.token_hex(8)]
        await self._commands.run(GROUP_ADD, keys, args)

    async def group_discard(self, ns: str, group: str, channel: str) -> None:
        keys = [self._keys.group(ns, group), self._keys.group_version(ns, group)]
        await self._commands.run(GROUP_DISCARD, keys, [channel, secrets.token_hex(8)])

    async def group_send(
        self, ns: str, group: str, payload: bytes, *, capacity_of: CapacityOf, expiry_s: float
    ) -> GroupSendResult:
        """One script call when every member has the same capacity (outside Cluster);
        else read the members, then one push script per slot."""
        return await self._sends.group_send(
            ns, group, payload, capacity_of=capacity_of, expiry_s=expiry_s
        )

    # -- fan-outs at the edge (``backends.FansOutAtTheEdge``, ``LeasesFanOuts``) --------

    def set_edge_owners(self, owners: EdgeOwners) -> None:
        self._edge.owners = owners

    async def end_fanouts(self, ns: str, leases: Sequence[str]) -> None:
        self._edge.end(ns, leases)

    async def give_back_fanouts(self, ns: str, leases: Sequence[str]) -> None:
        await self._edge.give_back(ns, leases)

    async def flush(self, ns: str) -> None:
        """Delete every key of the namespace: SCAN (never KEYS) on each server."""
        topology = self._commands.require()
        pattern = self._keys.namespace_pattern(ns)
        self._takes.drop_namespace(ns)
        self._edge.drop_namespace(ns)
        await asyncio.gather(*(self._flush_pipe(pipe, pattern) for pipe in topology.pipes()))

    # -- wake-ups and gauges ---------------------------------------------------

    def watch(self, ns: str, key: str) -> None:
        """Subscribe to the wake-ups of a normal channel or of a client id (batched)."""
        self._wakeups.watch(ns, key)

    def unwatch(self, ns: str, key: str) -> None:
        """Drop a watch; the subscription lingers ``LINGER_S`` (``wakeups``) in case it
        comes back."""
        self._wakeups.unwatch(ns, key)
        if (ns, key) not in self._edge.owners:
            self._remote.detach(ns, key)

    async def top_channels(self, limit: int) -> list[tuple[str, str, int]] | None:
        """The longest queues, by a SCAN of our keys (expired messages not yet removed
        count too); for ``channels-broker status``."""
        pipes = self._commands.require().pipes()
        return await read_top_channels(pipes, self.settings.prefix, limit)

    def stats(self) -> BackendStats:
        """The last reading (every ``STATS_INTERVAL_S``); ``expired_total`` is this daemon's."""
        s = self._stats
        return BackendStats(
            s.channels_waiting,
            s.messages_waiting,
            s.groups,
            s.memberships,
            self._takes.expired_total,
            given_back_total=self._leases.given_back_total,
        )

    # -- internals -------------------------------------------------------------

    def _notify(self, ns: str, channel: str) -> None:
        """Tell the router (whichever ``set_wakeup`` installed last)."""
        self._on_ready(ns, channel)

    async def _flush_pipe(self, pipe: Pipe, pattern: str) -> None:
        cursor = b"0"
        while True:
            cursor, keys = await pipe.execute("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            if keys:
                await self._unlink(pipe, keys)
            if cursor in (b"0", 0):
                return

    async def _unlink(self, pipe: Pipe, keys: list[bytes]) -> None:
        if not self._commands.require().is_cluster:
            await pipe.execute("UNLINK", *keys)
            return
        by_slot: dict[int, list[bytes]] = defaultdict(list)
        for key in keys:
            by_slot[Keys.slot(key.decode())].append(key)
        await asyncio.gather(*(pipe.execute("UNLINK", *group) for group in by_slot.values()))

    async def _sample_stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            try:
                self._stats = await read_stats(
                    self._commands.require().pipes(), self.settings.prefix
                )
            except BackendError as exc:
                log.debug("stats sample failed: %s", exc)
