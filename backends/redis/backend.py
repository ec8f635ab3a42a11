"""Redis storage: durable queues and groups that several daemons share.

Theory of operation. Data lives in Redis under hash-tagged keys (``keys``) and
changes only through Lua scripts (``scripts``), one script call per operation,
so every capacity check is atomic with its insert and a send costs one round trip.
Commands of all connections of a daemon share one auto-pipelined Redis connection
per server (``pipe``), so concurrent operations share writes and reads.

Wake-ups. A script that queues a message also publishes on the wake-up channel of the
receiving client (all its process-specific channels) or of the normal channel.
``watch`` subscribes to it (a lost watcher's subscription lingers ``LINGER_S``, so pull
churn costs no SUBSCRIBE per message); a message published by another daemon becomes
``on_ready(ns, channel)`` here. Our own sends wake our router at once and our echo is
ignored. Three gaps are closed: (1) a message sent before a subscription became
active is found by looking once more when Redis confirms the subscription; (2) after
a reconnect every watched key is looked at again; (3) a wake-up that arrives while a
``take`` of that channel is in flight may find the taker out of the router's line, so
an empty take after such a wake-up wakes the channel again on the next loop pass.

A send to a client attached here may hand its message straight back, held, to skip
the take's round trip (``stash``); takes serve that stash first.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Self

from redis.exceptions import AskError, NoScriptError

from backends import (
    Backend,
    BackendError,
    BackendStats,
    BackendUnavailable,
    CapacityOf,
    GroupSendResult,
    Taken,
)
from protocol import client_id_of

from .keys import Keys
from .scripts import (
    GROUP_ADD,
    GROUP_MEMBERS,
    GROUP_SEND,
    PUSH,
    RELEASE,
    TAKE,
    UNGRAB,
    WAITING,
)
from .stash import HOLD_S, Stash
from .stats import read_stats, read_top_channels
from .topology import Topology
from .url import RedisSettings
from .wakeups import Subscriptions

__all__ = ["LINGER_S", "RedisBackend"]

log = logging.getLogger("channels_broker.backends.redis")

#: Seconds a wake-up subscription outlives its last watcher: pullers come and go with
#: every message, and re-subscribing each time would cost a round trip and a rescan.
LINGER_S = 30.0
#: Queue, index and held-count keys outlive their newest deadline by this much (ms):
#: reads check deadlines themselves; key expiry only frees abandoned data.
KEEP_MARGIN_MS = 5000
#: Payloads up to this size are shared between takes of identical entries (a group
#: message taken by several members), so the daemon can push them in one frame.
SHARE_MAX_BYTES = 65536
SHARE_CACHE_SIZE = 1024
#: Gauges are read from Redis this often (a SCAN of our keys; ``stats`` does no I/O).
STATS_INTERVAL_S = 15.0
#: Deadline digits at the head of each queue entry (see scripts).
DEADLINE_DIGITS = 13


class RedisBackend(Backend):
    """Channels and groups in Redis (standalone, Sentinel or Cluster), shared by daemons."""

    is_shared = True

    def __init__(self, settings: RedisSettings) -> None:
        super().__init__()
        self.settings = settings
        self._keys = Keys(settings.prefix)
        self._origin = secrets.token_hex(4)
        self._origin_bytes = self._origin.encode()
        self._topology: Topology | None = None
        self._subs = Subscriptions(self._keys)
        self._inflight: dict[tuple[str, str], int] = {}
        self._woken_inflight: set[tuple[str, str]] = set()
        self._releases: dict[str, int] = {}  # held-count key -> count, not yet sent
        self._stash = Stash()
        self._stash_timer: asyncio.TimerHandle | None = None
        #: Channels woken by something other than a grab since their last full take:
        #: Redis may hold messages for them behind the stash.
        self._maybe_more: set[tuple[str, str]] = set()
        self._shared: dict[bytes, bytes] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._stats_task: asyncio.Task[None] | None = None
        self._stats = BackendStats(0, 0, 0, 0, 0)
        self._expired_total = 0
        self._tasks: set[asyncio.Task[Any]] = set()

    @classmethod
    def from_url(cls, url: str) -> Self:
        """Any URL form of ``redis_url``; raise ``BackendError`` for a bad one."""
        return cls(RedisSettings.from_url(url))

    # -- lifecycle -------------------------------------------------------------

    async def connect(self) -> None:
        """Connect to Redis and load the scripts; raise ``BackendUnavailable``."""
        if self._topology is not None:
            return
        topology = Topology(
            self.settings,
            on_message=self._on_message,
            on_subscribed=self._on_subscribed,
            on_up=self._rewake_all,
        )
        try:
            await topology.open()
        except BaseException:
            await topology.close()
            raise
        self._topology = topology
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(LINGER_S, self._sweep)
        self._stats_task = loop.create_task(self._sample_stats())
        if self._subs.channels():
            topology.subscribe(self._subs.channels())

    async def close(self) -> None:
        """Close every connection. Idempotent; the data stays in Redis."""
        if self._topology is not None:
            # Grabbed messages go back to Redis, and background work (such as that,
            # for owners who just left) gets a moment to finish.
            for (ns, channel), entries in self._stash.pop_all().items():
                self._spawn(self._ungrab(ns, channel, entries))
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=self.settings.timeout_s)
        if self._stash_timer is not None:
            self._stash_timer.cancel()
            self._stash_timer = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for task in [self._stats_task, *self._tasks]:
            if task is not None:
                task.cancel()
        self._stats_task = None
        self._tasks.clear()
        topology, self._topology = self._topology, None
        if topology is not None:
            await topology.close()

    async def is_ready(self) -> bool:
        """True when every connection is up and Redis answers PING within the timeout."""
        topology = self._topology
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
        refused = await self._push(ns, [(channel, payload, capacity)], expiry_s)
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
        return await self._push(
            ns, [(channel, payload, capacity_of(channel)) for channel, payload in items], expiry_s
        )

    async def take(self, ns: str, channel: str, limit: int, *, hold: bool) -> list[Taken]:
        """Pop up to ``limit`` unexpired messages; with ``hold`` they stay counted."""
        return (await self._take_batch(ns, [channel], limit, hold))[channel]

    async def take_many(
        self, ns: str, channels: Sequence[str], limit: int, *, hold: bool
    ) -> dict[str, list[Taken]]:
        """``take`` from each channel: one script per Cluster slot (a client's channels
        share one), all pipelined, so about one round trip."""
        batches = self._slot_batches(ns, channels)
        if len(batches) <= 1:
            return await self._take_batch(ns, list(channels), limit, hold) if batches else {}
        results = await asyncio.gather(
            *(self._take_batch(ns, [channels[i] for i in b], limit, hold) for b in batches),
            return_exceptions=True,
        )
        taken: dict[str, list[Taken]] = {}
        for result in results:
            if isinstance(result, BaseException):
                if not isinstance(result, BackendError):
                    raise result
                continue
            taken.update(result)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors and not taken:
            raise errors[0]
        return taken

    async def release(self, ns: str, channel: str, count: int) -> None:
        """Queue the release and return; it is sent before any later command of this
        daemon (and with the other releases of this loop pass, as one script).

        If the connection breaks before Redis runs it, the count lapses with the held
        messages' deadlines.
        """
        if count <= 0:
            return
        self._require()
        key = self._keys.held(ns, channel)
        self._releases[key] = self._releases.get(key, 0) + count
        if len(self._releases) == 1:
            asyncio.get_running_loop().call_soon(self._send_releases)

    async def channels_with_messages(self, ns: str, client_id: str) -> list[str]:
        """The client's channels with unexpired messages (one script on its slot)."""
        index = self._keys.index(ns, client_id)
        queues = f"{self._keys.base(f'{ns}!{client_id}')}q:"
        names = {name.decode() for name in await self._run(WAITING, [index], [queues])}
        return sorted(names.union(self._stash.channels_of(ns, client_id)))

    # -- groups ----------------------------------------------------------------

    async def group_add(self, ns: str, group: str, channel: str, *, group_expiry_s: float) -> None:
        """Add or renew; the membership lapses ``group_expiry_s`` after this call."""
        expiry_ms = max(1, round(group_expiry_s * 1000))
        await self._run(
            GROUP_ADD, [self._keys.group(ns, group)], [channel, expiry_ms, KEEP_MARGIN_MS]
        )

    async def group_discard(self, ns: str, group: str, channel: str) -> None:
        key = self._keys.group(ns, group)
        topology = self._require()
        if self._releases:
            self._send_releases()
        await topology.command(key, "ZREM", key, channel)

    async def group_send(
        self, ns: str, group: str, payload: bytes, *, capacity_of: CapacityOf, expiry_s: float
    ) -> GroupSendResult:
        """One script call when every member has the same capacity (outside Cluster);
        else read the members, then one push script per slot."""
        topology = self._require()
        key = self._keys.group(ns, group)
        uniform = capacity_of.uniform
        if uniform is not None and not topology.is_cluster:
            args = [self.settings.prefix, ns, _ms(expiry_s), _ms(expiry_s) + KEEP_MARGIN_MS]
            args += [self._origin, topology.publish_command, payload, uniform]
            reply = await self._run(GROUP_SEND, [key], args)
            delivered = [name.decode() for name in reply[1:]]
            for channel in delivered:
                self._wake(ns, channel)
            return GroupSendResult(delivered=delivered, skipped=int(reply[0]))
        members = [name.decode() for name in await self._run(GROUP_MEMBERS, [key], [])]
        targets = [(channel, payload, capacity_of(channel)) for channel in members]
        refused = set(await self._push(ns, targets, expiry_s))
        delivered = [channel for i, channel in enumerate(members) if i not in refused]
        return GroupSendResult(delivered=delivered, skipped=len(refused))

    async def flush(self, ns: str) -> None:
        """Delete every key of the namespace: SCAN (never KEYS) on each server."""
        topology = self._require()
        pattern = self._keys.namespace_pattern(ns)
        self._stash.pop_namespace(ns)
        await asyncio.gather(*(self._flush_pipe(pipe, pattern) for pipe in topology.pipes()))

    # -- wake-ups --------------------------------------------------------------

    def watch(self, ns: str, key: str) -> None:
        """Subscribe to the wake-ups of a normal channel or of a client id (batched)."""
        new = self._subs.add(ns, key)
        if new and self._topology is not None:
            self._topology.subscribe(new)

    def unwatch(self, ns: str, key: str) -> None:
        """Drop a watch; the subscription lingers ``LINGER_S`` in case it comes back."""
        self._subs.remove(ns, key, asyncio.get_running_loop().time())
        if self._stash and not self._subs.owns(ns, key):
            for (space, channel), entries in self._stash.pop_client(ns, key).items():
                self._spawn(self._ungrab(space, channel, entries))

    async def top_channels(self, limit: int) -> list[tuple[str, str, int]] | None:
        """The longest queues, by a SCAN of our keys (expired messages not yet removed
        count too); for ``channels-broker status``."""
        return await read_top_channels(self._require().pipes(), self.settings.prefix, limit)

    def stats(self) -> BackendStats:
        """The last reading (every ``STATS_INTERVAL_S``); ``expired_total`` is this daemon's."""
        s = self._stats
        return BackendStats(
            s.channels_waiting, s.messages_waiting, s.groups, s.memberships, self._expired_total
        )

    # -- internals -------------------------------------------------------------

    def _require(self) -> Topology:
        if self._topology is None:
            raise BackendError("the Redis backend is not connected")
        return self._topology

    async def _run(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        topology = self._require()
        if self._releases:
            self._send_releases()  # releases go first: later commands see their effect
        return await topology.run(script, keys, args)

    async def _push(
        self, ns: str, targets: Sequence[tuple[str, bytes, int]], expiry_s: float
    ) -> list[int]:
        """Capacity-checked sends of ``targets``; the indexes refused as full."""
        if not targets:
            return []
        batches = self._slot_batches(ns, [channel for channel, _, _ in targets])
        if len(batches) == 1:  # the common case: no task per call
            results = [await self._push_batch(ns, targets, expiry_s)]
        else:
            results = await asyncio.gather(
                *(self._push_batch(ns, [targets[i] for i in b], expiry_s) for b in batches)
            )
        refused: list[int] = []
        now = asyncio.get_running_loop().time()
        for batch, accepted in zip(batches, results, strict=True):
            for i, ok in zip(batch, accepted, strict=True):
                channel = targets[i][0]
                if isinstance(ok, bytes):  # grabbed for its owner here: see stash
                    self._stash.add(ns, channel, ok, now + expiry_s, now)
                    self._arm_stash_timer()
                    self._wake(ns, channel, more=False)
                elif ok:
                    self._wake(ns, channel)
                else:
                    refused.append(i)
        return sorted(refused)

    async def _push_batch(
        self, ns: str, targets: Sequence[tuple[str, bytes, int]], expiry_s: float
    ) -> list[int | bytes]:
        topology = self._require()
        keys: list[str] = []
        payload_numbers: dict[int, int] = {}
        payloads: list[bytes] = []
        per_target: list[Any] = []
        for channel, payload, capacity in targets:
            keys += self._keys.channel_keys(ns, channel)
            number = payload_numbers.get(id(payload))
            if number is None:
                payloads.append(payload)
                number = payload_numbers[id(payload)] = len(payloads)
            wake = self._keys.wake(ns, channel)
            # Whether our own subscription is among the listeners (see PUSH).
            mine = int(topology.is_listening(wake.encode()))
            grab = "!" in channel and self._subs.owns(ns, client_id_of(channel))
            per_target += [channel, capacity, number, wake, mine, int(grab)]
        args = [_ms(expiry_s), _ms(expiry_s) + KEEP_MARGIN_MS, self._origin]
        args += [topology.publish_command, len(payloads), *payloads, *per_target]
        return [
            ok if isinstance(ok, bytes) else int(ok) for ok in await self._run(PUSH, keys, args)
        ]

    async def _take_batch(
        self, ns: str, channels: list[str], limit: int, hold: bool
    ) -> dict[str, list[Taken]]:
        """Take from channels of one slot: the stash first, then one TAKE script."""
        if not self._stash:
            return await self._redis_take(ns, channels, limit, hold)
        now = asyncio.get_running_loop().time()
        taken: dict[str, list[Taken]] = {}
        rest: list[str] = []
        for channel in channels:
            items, expired = self._stash.take(ns, channel, limit, now)
            # Stashed messages are held in Redis: uncount expired ones, and all for a pull.
            if expired or (items and not hold):
                await self.release(ns, channel, expired + (0 if hold else len(items)))
            self._expired_total += expired
            taken[channel] = [Taken(e[DEADLINE_DIGITS:], d - now) for e, d, _ in items]
            if not items:
                rest.append(channel)
            elif len(items) < limit and (ns, channel) in self._maybe_more:
                more = await self._redis_take(ns, [channel], limit - len(items), hold)
                taken[channel] += more[channel]
        if rest:
            taken.update(await self._redis_take(ns, rest, limit, hold))
        return taken

    async def _redis_take(
        self, ns: str, channels: list[str], limit: int, hold: bool
    ) -> dict[str, list[Taken]]:
        """One TAKE script for channels of one slot."""
        keys: list[str] = []
        for channel in channels:
            keys += self._keys.channel_keys(ns, channel)
            self._inflight[(ns, channel)] = self._inflight.get((ns, channel), 0) + 1
        try:
            args = [limit, 1 if hold else 0, KEEP_MARGIN_MS, *channels]
            reply = await self._run(TAKE, keys, args)
        finally:
            woken = [self._end_take(ns, channel) for channel in channels]
        now_ms = int(reply[0])
        self._expired_total += int(reply[1])
        taken: dict[str, list[Taken]] = {}
        at = 2
        for channel, was_woken in zip(channels, woken, strict=True):
            count = int(reply[at])
            items = [self._taken(entry, now_ms) for entry in reply[at + 1 : at + 1 + count]]
            at += 1 + count
            taken[channel] = items
            if count < limit:
                self._maybe_more.discard((ns, channel))
            if not items and was_woken:
                # A wake-up came while this take was in flight, perhaps for a message
                # it missed, when the taker was out of the router's line: wake again.
                asyncio.get_running_loop().call_soon(self._on_ready, ns, channel)
        return taken

    async def _ungrab(self, ns: str, channel: str, entries: list[bytes]) -> None:
        """Put grabbed entries back at the head of their Redis queue (see stash)."""
        self._maybe_more.discard((ns, channel))
        topology = self._require()
        wake = self._keys.wake(ns, channel)
        args = [channel, wake, topology.publish_command, KEEP_MARGIN_MS, *entries]
        await self._run(UNGRAB, self._keys.channel_keys(ns, channel), args)

    def _arm_stash_timer(self) -> None:
        if self._stash_timer is None:
            self._stash_timer = asyncio.get_running_loop().call_later(HOLD_S, self._stale_stash)

    def _stale_stash(self) -> None:
        """Return what nobody took within ``HOLD_S``; look again while any is left."""
        self._stash_timer = None
        cutoff = asyncio.get_running_loop().time() - HOLD_S
        for (ns, channel), entries in self._stash.pop_stale(cutoff).items():
            self._spawn(self._ungrab(ns, channel, entries))
        if self._stash:
            self._arm_stash_timer()

    def _end_take(self, ns: str, channel: str) -> bool:
        """End a take in flight; True if the channel was woken meanwhile."""
        key = (ns, channel)
        left = self._inflight.pop(key) - 1
        woken = key in self._woken_inflight
        if left:
            self._inflight[key] = left
        else:
            self._woken_inflight.discard(key)
        return woken

    def _slot_batches(self, ns: str, channels: Sequence[str]) -> list[list[int]]:
        """Indexes of ``channels`` grouped by Cluster slot (one group outside Cluster)."""
        if not channels:
            return []
        if not self._require().is_cluster:
            return [list(range(len(channels)))]
        by_slot: dict[int, list[int]] = defaultdict(list)
        for i, channel in enumerate(channels):
            by_slot[Keys.slot(self._keys.wake(ns, channel))].append(i)
        return list(by_slot.values())

    def _send_releases(self) -> None:
        """Send the queued releases: one script per slot (Cluster) or one in all."""
        releases, self._releases = self._releases, {}
        topology = self._topology
        if not releases or topology is None:
            return
        groups: dict[int, list[str]] = defaultdict(list)
        for key in releases:
            groups[Keys.slot(key) if topology.is_cluster else 0].append(key)
        for keys in groups.values():
            counts = [releases[key] for key in keys]
            try:
                future = topology.pipe_for(keys[0]).call(
                    "EVALSHA", RELEASE.sha, len(keys), *keys, *counts
                )
            except BackendUnavailable as exc:
                log.warning("release of held messages failed: %s", exc)
                continue
            future.add_done_callback(functools.partial(self._released, keys=keys, counts=counts))

    def _taken(self, entry: bytes, now_ms: int) -> Taken:
        deadline_ms = int(entry[:DEADLINE_DIGITS])
        ttl_s = (deadline_ms - now_ms) / 1000
        if len(entry) > SHARE_MAX_BYTES:
            return Taken(entry[DEADLINE_DIGITS:], ttl_s)
        # Identical entries (a group message) share one payload object: one PUSH frame.
        payload = self._shared.get(entry)
        if payload is None:
            if len(self._shared) >= SHARE_CACHE_SIZE:
                self._shared.clear()
            payload = self._shared[entry] = entry[DEADLINE_DIGITS:]
        return Taken(payload, ttl_s)

    def _released(self, done: asyncio.Future[Any], *, keys: list[str], counts: list[int]) -> None:
        if done.cancelled() or done.exception() is None or self._topology is None:
            return
        exc = done.exception()
        if isinstance(exc, NoScriptError | AskError):  # AskError covers MOVED too
            self._spawn(self._require().run(RELEASE, keys, counts))
        else:
            log.warning("release of held messages failed: %s", exc)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("Redis background operation failed: %s", task.exception())

    async def _flush_pipe(self, pipe: Any, pattern: str) -> None:
        cursor = b"0"
        while True:
            cursor, keys = await pipe.execute("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            if keys:
                await self._unlink(pipe, keys)
            if cursor in (b"0", 0):
                return

    async def _unlink(self, pipe: Any, keys: list[bytes]) -> None:
        if not self._require().is_cluster:
            await pipe.execute("UNLINK", *keys)
            return
        by_slot: dict[int, list[bytes]] = defaultdict(list)
        for key in keys:
            by_slot[Keys.slot(key.decode())].append(key)
        await asyncio.gather(*(pipe.execute("UNLINK", *group) for group in by_slot.values()))

    def _wake(self, ns: str, channel: str, *, more: bool = True) -> None:
        """Tell the router; ``more``: Redis may hold messages for it (not just the stash)."""
        key = (ns, channel)
        if key in self._inflight:
            self._woken_inflight.add(key)
        if more and self._stash.has(ns, channel):
            self._maybe_more.add(key)
        self._on_ready(ns, channel)

    def _on_message(self, wake: bytes, data: bytes) -> None:
        origin, _, names = data.partition(b" ")
        if origin == self._origin_bytes:
            return  # our own send: the router was woken already
        ns = self._subs.namespace_of(wake)
        if ns is not None:
            for name in names.split(b" "):
                self._wake(ns, name.decode())

    def _on_subscribed(self, wake: bytes) -> None:
        """Redis confirmed a subscription: look for what came before it."""
        for ns, key, is_client in self._subs.watchers(wake):
            self._rewake(ns, key, is_client)

    def _rewake_all(self) -> None:
        """A command connection is back: wake every watched key, in case we missed one."""
        for ns, key, is_client in self._subs.watchers():
            self._rewake(ns, key, is_client)

    def _rewake(self, ns: str, key: str, is_client: bool) -> None:
        if is_client:
            self._spawn(self._wake_client(ns, key))
        else:
            self._wake(ns, key)

    async def _wake_client(self, ns: str, client_id: str) -> None:
        for channel in await self.channels_with_messages(ns, client_id):
            if client_id_of(channel) == client_id:
                self._wake(ns, channel)

    def _sweep(self) -> None:
        """Unsubscribe wake-up channels idle for ``LINGER_S``; come back later."""
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(LINGER_S, self._sweep)
        idle = self._subs.pop_idle(loop.time() - LINGER_S)
        if idle and self._topology is not None:
            self._topology.unsubscribe(idle)

    async def _sample_stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            try:
                self._stats = await read_stats(self._require().pipes(), self.settings.prefix)
            except BackendError as exc:
                log.debug("stats sample failed: %s", exc)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
