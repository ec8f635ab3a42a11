"""In-process storage: per-namespace dicts of deques, swept by a coarse timer wheel.

Theory of operation. Each namespace is a ``Space`` holding two dicts, channel name
-> ``Channel`` and group name -> ``Group``, so ``flush`` touches one namespace only,
plus an index client id -> its process-specific channels, for ``channels_with_messages``.
A channel is a deque of ``(deadline, payload)`` in send order plus ``held``, the count of
messages taken with ``hold=True`` and not yet released, and ``reserved``, the send room
senders hold on it (``room``); ``len(queue) + held + reserved`` is what its capacity
bounds. A record outlives its last message until the sweep of its bucket (at most one
expiry later): a consumer's own channel, which gets one message at a time, keeps its
record instead of making and forgetting one (and filing it) per message.

Groups and group sends are in ``groups`` (members per owning client, fan-outs at the
edge). Expiry is checked where data is read (``take`` drops every expired message it
pops, ``group_send`` skips lapsed members) and swept by a timer wheel for data nobody reads:
records are filed under a coarse time bucket by the deadline of their head (oldest)
entry, one tick visits only the buckets that came due, and a visited record that still
holds something is filed again under its new head. No call ever scans all channels
(the fault of channels' ``InMemoryChannelLayer``). With mixed expiries in one record a
later, shorter-lived entry behind the head waits for the head's sweep; reads still
never return it.

Everything runs on the event loop thread, each call atomically (no other call comes
between the capacity check and the append), once a batch sent with patterns has matched
its names (``CapacityOf.all_of`` may yield). Waiting messages cost at most ``max_bytes``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from collections.abc import Sequence
from typing import Self

from ..base import Backend, CapacityOf, resolved
from ..deadlines import SharedDeadlines
from ..errors import BackendError
from ..fanout import EdgeOwners
from ..records import BackendStats, Taken
from .budget import CHANNEL_OVERHEAD_BYTES, MESSAGE_OVERHEAD_BYTES, Refusals
from .groups import MemoryGroups
from .records import SHORT_QUEUE, Channel, Group, Space, longest_queues
from .room import MemoryRoom
from .state import MemoryState
from .url import check_url
from .wheel import TimerWheel

__all__ = ["DEFAULT_TICK_S", "MemoryBackend"]

#: Width of a timer-wheel bucket. Reads never return expired data, so a sweep only frees
#: memory; a second of slack costs little and keeps an idle daemon's wake-ups rare.
DEFAULT_TICK_S = 1.0

#: What a message may cost beyond its payload, as the bound is checked: as if it made a
#: new channel record, so that the bound is never passed.
_NEW_MESSAGE_BYTES = MESSAGE_OVERHEAD_BYTES + CHANNEL_OVERHEAD_BYTES
#: The clock of every deadline here (seconds, monotonic).
_now = time.monotonic


class MemoryBackend(MemoryState, MemoryGroups, MemoryRoom, Backend):
    """Channels and groups in this process's memory: the daemon's default backend. Not
    shared: each daemon on ``memory://`` has its own, kept by ``--state-file`` only."""

    def __init__(self, *, tick_s: float = DEFAULT_TICK_S) -> None:
        """``tick_s``: seconds per timer-wheel bucket (how late expired data is freed)."""
        super().__init__()
        if not tick_s > 0:
            raise BackendError(f"tick_s must be positive, not {tick_s!r}")
        self._bytes = 0  # payloads and channel records; see _used_bytes
        self._max_bytes = sys.maxsize  # no bound until limit_memory
        self._refusals = Refusals(None)
        self._tick_s = tick_s
        self._spaces: dict[str, Space] = {}
        self._channel_wheel: TimerWheel[Channel] = TimerWheel(tick_s)
        self._group_wheel: TimerWheel[Group] = TimerWheel(tick_s)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        # The running counts ``stats`` reports.
        self._channels_waiting = self._messages_waiting = self._expired_total = 0
        self._groups = self._memberships = 0
        self._deadlines = SharedDeadlines()
        self._owners: EdgeOwners = {}  # connections that may take fan-outs: groups

    @classmethod
    def from_url(cls, url: str) -> Self:
        """Accept ``memory://`` (a trailing ``/`` is fine); raise ``BackendError`` otherwise."""
        check_url(url)
        return cls()

    def limit_memory(self, max_bytes: int) -> None:
        """Refuse sends once waiting messages would cost more than ``max_bytes`` (the
        daemon's ``--max-memory``; see ``budget``)."""
        self._max_bytes = max_bytes
        self._refusals = Refusals(max_bytes)

    async def connect(self) -> None:
        """Start the timer wheel on the running loop (again, if the old loop is gone)."""
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._timer is not None:
            return
        await self.close()
        self._loop = loop
        self._timer = loop.call_later(self._tick_s, self._tick)

    async def close(self) -> None:
        """Stop the timer wheel. The data stays: a later ``connect`` carries on with it."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop = None

    async def is_ready(self) -> bool:
        """True between ``connect`` and ``close``."""
        return self._timer is not None

    async def send(
        self, ns: str, channel: str, payload: bytes, *, capacity: int, expiry_s: float
    ) -> bool:
        """Append a message unless the channel (or memory) is full; False when full."""
        now = _now()
        if self._used_bytes() + _NEW_MESSAGE_BYTES + len(payload) > self._max_bytes:
            self._refusals.count(1, self._used_bytes())
            return False
        if not self._put(self._space(ns), channel, payload, capacity, now + expiry_s, now):
            return False
        self._on_ready(ns, channel)
        return True

    async def send_many(
        self,
        ns: str,
        items: Sequence[tuple[str, bytes]],
        *,
        capacity_of: CapacityOf,
        expiry_s: float,
    ) -> list[int]:
        """Send several messages in order; return the indexes refused as full."""
        uniform = capacity_of.uniform
        if uniform is None:
            capacity_of = await resolved(capacity_of, [channel for channel, _ in items])
        space, now = self._space(ns), _now()  # after matching: a flush may come meanwhile
        deadline = now + expiry_s
        refused: list[int] = []
        for index, (channel, payload) in enumerate(items):
            capacity = capacity_of(channel) if uniform is None else uniform
            if self._used_bytes() + _NEW_MESSAGE_BYTES + len(payload) > self._max_bytes:
                self._refusals.count(1, self._used_bytes())
                refused.append(index)
            elif self._put(space, channel, payload, capacity, deadline, now):
                self._on_ready(ns, channel)
            else:
                refused.append(index)
        return refused

    async def take(self, ns: str, channel: str, limit: int, *, hold: bool) -> list[Taken]:
        """Remove up to ``limit`` unexpired messages; ``ttl_s`` is each one's time left."""
        return self._take(ns, channel, limit, hold)

    async def take_many(
        self, ns: str, channels: Sequence[str], limit: int, *, hold: bool
    ) -> dict[str, list[Taken]]:
        """``take`` from each channel, in one call: nothing here can fail part-way."""
        return {channel: self._take(ns, channel, limit, hold) for channel in channels}

    def _take(self, ns: str, channel: str, limit: int, hold: bool) -> list[Taken]:
        space = self._spaces.get(ns)
        record = None if space is None else space.channels.get(channel)
        if record is None or not record.queue:
            return []
        now = _now()
        queue = record.queue
        taken: list[Taken] = []
        popped = popped_bytes = 0
        while queue and len(taken) < limit:
            deadline, payload = queue[0]
            del queue[0]  # a deque's popleft; a short list's shift (``SHORT_QUEUE``)
            popped += 1
            popped_bytes += len(payload)
            if deadline > now:  # expired ones are dropped, never returned
                taken.append(Taken(payload, deadline - now, "", deadline))
        self._messages_waiting -= popped
        self._bytes -= popped_bytes
        self._expired_total += popped - len(taken)
        if hold:
            record.held += len(taken)
        if not queue:
            self._channels_waiting -= 1  # the record stays until its sweep
        return taken

    async def release(self, ns: str, channel: str, count: int) -> None:
        """Uncount ``count`` held messages (never below zero)."""
        record = self._channel(ns, channel)
        if record is None or count <= 0:
            return
        record.held = max(0, record.held - count)
        if not (record.queue or record.held or record.reserved) and record.bucket is None:
            self._forget_channel(record)  # its sweep passed while it was held

    async def give_back(self, ns: str, channel: str, items: Sequence[Taken], held: int) -> None:
        """Messages pushed and not acknowledged, back at the head of their channel."""
        now = _now()
        live = [(item.deadline or now + item.ttl_s, item.payload) for item in items]
        live = [entry for entry in live if entry[0] > now]
        self._expired_total += len(items) - len(live)
        if live:
            space = self._space(ns)
            record = space.channels.get(channel)
            if record is None:
                record = space.add_channel(channel)
                self._bytes += CHANNEL_OVERHEAD_BYTES
            self._channels_waiting += not record.queue
            queue = [*live, *record.queue]
            record.queue = queue if len(queue) < SHORT_QUEUE else deque(queue)
            self._messages_waiting += len(live)
            self._bytes += sum(len(payload) for _, payload in live)
            self._channel_wheel.unfile(record)  # filed again under its new head
            self._channel_wheel.file(record, queue[0][0])
        await self.release(ns, channel, held)
        if live:
            self._on_ready(ns, channel)

    async def channels_with_messages(self, ns: str, client_id: str) -> list[str]:
        """The client's channels holding unexpired messages: O(that client's channels)."""
        space = self._spaces.get(ns)
        of_client = None if space is None else space.clients.get(client_id)
        if not of_client:
            return []
        now = _now()
        names: list[str] = []
        for record in list(of_client.values()):  # a copy: trimming may forget a record
            self._trim(record, now)
            if record.queue:
                names.append(record.name)
            elif not (record.queue or record.held or record.reserved):
                self._forget_channel(record)
        return names

    async def flush(self, ns: str) -> None:
        """Drop the namespace's messages, held counts and groups (not the room its senders
        hold: ``room``); other namespaces are untouched."""
        space = self._spaces.pop(ns, None)
        if space is None:
            return
        for channel in space.channels.values():
            self._channel_wheel.unfile(channel)
            self._messages_waiting -= len(channel.queue)
            self._channels_waiting -= bool(channel.queue)
            self._bytes -= CHANNEL_OVERHEAD_BYTES + sum(len(p) for _, p in channel.queue)
        for group in space.groups.values():
            self._group_wheel.unfile(group)
            self._memberships -= group.size
        self._groups -= len(space.groups)
        self._keep_room(ns, space)
        space.forget_all()  # its records point back at it: free them now, not at a GC

    def watch(self, ns: str, key: str) -> None:
        """Nothing to do: every enqueue here calls the wake-up at once, watched or not."""

    def unwatch(self, ns: str, key: str) -> None:
        """Nothing to do; see ``watch``."""

    def stats(self) -> BackendStats:
        """Running counters, kept up to date by every change: O(1)."""
        return BackendStats(
            channels_waiting=self._channels_waiting,
            messages_waiting=self._messages_waiting,
            groups=self._groups,
            memberships=self._memberships,
            expired_total=self._expired_total,
            memory_bytes=self._used_bytes(),
            memory_refused=self._refusals.total,
        )

    async def top_channels(self, limit: int) -> list[tuple[str, str, int]] | None:
        """The longest queues: one pass over every channel record, O(channels)."""
        return longest_queues(self._spaces, limit)

    def _space(self, ns: str) -> Space:
        # Namespaces are kept until flushed: they are a site's prefixes, a handful.
        space = self._spaces.get(ns)
        if space is None:
            space = self._spaces[ns] = Space()
        return space

    def _channel(self, ns: str, name: str) -> Channel | None:
        space = self._spaces.get(ns)
        return None if space is None else space.channels.get(name)

    def _group(self, ns: str, name: str) -> Group | None:
        space = self._spaces.get(ns)
        return None if space is None else space.groups.get(name)

    def _put(
        self, space: Space, name: str, payload: bytes, capacity: int, deadline: float, now: float
    ) -> bool:
        """Append unless full: the capacity check and the append are one step."""
        if capacity < 1:
            return False
        record = space.channels.get(name)
        if record is None:
            record = space.add_channel(name)
            self._bytes += CHANNEL_OVERHEAD_BYTES
        else:
            queue = record.queue
            if queue and queue[0][0] <= now:
                self._trim(record, now)  # expired messages must not take up room
            if len(queue) + record.held + record.reserved >= capacity:
                return False
        self._append(record, payload, deadline)
        return True

    def _append(self, record: Channel, payload: bytes, deadline: float) -> None:
        if not record.queue:
            self._channels_waiting += 1
        queue = record.queue
        queue.append((deadline, payload))
        if len(queue) == SHORT_QUEUE and type(queue) is list:
            record.queue = deque(queue)
        self._messages_waiting += 1
        self._bytes += len(payload)
        if record.bucket is None:
            self._channel_wheel.file(record, deadline)

    def _used_bytes(self) -> int:
        """What waiting messages and channel records cost, as ``limit_memory`` counts it."""
        return self._bytes + self._messages_waiting * MESSAGE_OVERHEAD_BYTES

    def _trim(self, record: Channel, now: float) -> None:
        """Drop the expired messages at the head of a channel (keeps the record)."""
        queue = record.queue
        expired = expired_bytes = 0
        while queue and queue[0][0] <= now:
            expired_bytes += len(queue[0][1])
            del queue[0]
            expired += 1
        self._messages_waiting -= expired
        self._bytes -= expired_bytes
        self._expired_total += expired
        if expired and not queue:
            self._channels_waiting -= 1

    def _forget_channel(self, record: Channel) -> None:
        record.space.remove_channel(record)
        self._bytes -= CHANNEL_OVERHEAD_BYTES
        self._channel_wheel.unfile(record)

    def _tick(self) -> None:
        """Sweep the buckets that came due; come back one tick later."""
        assert self._loop is not None  # the timer runs only between connect and close
        self._timer = self._loop.call_later(self._tick_s, self._tick)
        now = _now()
        for channel in self._channel_wheel.pop_due(now):
            self._sweep_channel(channel, now)
        for group in self._group_wheel.pop_due(now):
            self._sweep_group(group, now)

    def _sweep_channel(self, record: Channel, now: float) -> None:
        self._trim(record, now)
        if record.queue:
            self._channel_wheel.file(record, record.queue[0][0])
        elif not (record.queue or record.held or record.reserved):
            self._forget_channel(record)
