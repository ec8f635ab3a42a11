"""Send room in the memory backend (``backends.room``): a count per channel record.

A channel's ``reserved`` is the room senders hold on it; its capacity bounds
``len(queue) + held + reserved``. Everything runs on the event loop and nothing awaits,
so each call is atomic, as the rest of the backend's calls are. A message stored into
reserved room is never refused: not for capacity (it was counted when reserved), nor
for ``--max-memory``, so room is granted only while memory has space for it at the
size of the message that asked (larger messages later may pass the bound by what the
room holds; room is bounded per connection and released on close).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

from .budget import CHANNEL_OVERHEAD_BYTES, MESSAGE_OVERHEAD_BYTES
from .records import Channel, Space

__all__ = ["MemoryRoom"]

_now = time.monotonic


class _Storage(Protocol):
    """What the room calls need of ``MemoryBackend``."""

    _bytes: int
    _max_bytes: int
    _spaces: dict[str, Space]
    _on_ready: Callable[[str, str], None]

    def _space(self, ns: str) -> Space: ...

    def _channel(self, ns: str, name: str) -> Channel | None: ...

    def _used_bytes(self) -> int: ...

    def _append(self, record: Channel, payload: bytes, deadline: float) -> None: ...

    def _forget_channel(self, record: Channel) -> None: ...

    def _trim(self, record: Channel, now: float) -> None: ...

    def _reserve(self, record: Channel, capacity: int, window: int, size: int) -> int: ...

    async def send(
        self, ns: str, channel: str, payload: bytes, *, capacity: int, expiry_s: float
    ) -> bool: ...


class MemoryRoom:
    """``ReservesRoom`` for ``MemoryBackend`` (a base class of it)."""

    #: The daemon keeps the record of numbered sends: it is the only one over this storage.
    dedupes_sends = False

    def can_reserve_room(self) -> bool:
        return True

    async def send_reserving(
        self: _Storage,
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
        """``send``, then reserve room on the channel in the same step (see the module)."""
        if not await self.send(ns, channel, payload, capacity=capacity, expiry_s=expiry_s):
            return None
        return self._reserve(self._spaces[ns].channels[channel], capacity, window, len(payload))

    async def reserve_room(
        self: _Storage,
        ns: str,
        channel: str,
        *,
        capacity: int,
        window: int,
        size: int,
        holder: str = "",
    ) -> int:
        """Reserve room on the channel, storing nothing (its sender keeps sending)."""
        space = self._space(ns)
        record = space.channels.get(channel)
        if record is None:  # its messages were all taken and its sweep came: a new one
            record = space.add_channel(channel)
            self._bytes += CHANNEL_OVERHEAD_BYTES
        self._trim(record, _now())  # expired messages must not take up room
        room = self._reserve(record, capacity, window, size)
        if not (record.queue or record.held or record.reserved) and record.bucket is None:
            self._forget_channel(record)
        return room

    def _reserve(self: _Storage, record: Channel, capacity: int, window: int, size: int) -> int:
        """Reserve half of what fits the channel, up to ``window``, and up to what fits
        ``--max-memory`` at ``size`` bytes a message."""
        free = capacity - len(record.queue) - record.held - record.reserved
        fit = (self._max_bytes - self._used_bytes()) // (MESSAGE_OVERHEAD_BYTES + size)
        room = max(0, min(window, fit, free // 2))  # ``room_to_grant``, inline: every burst
        record.reserved += room
        return room

    async def send_reserved(
        self: _Storage,
        ns: str,
        items: Sequence[tuple[str, bytes]],
        *,
        expiry_s: float,
        client: str = "",
        seqs: Sequence[int] = (),
        holder: str = "",
    ) -> None:
        """Store each message into a unit of its channel's room, in order, unchecked."""
        space = self._space(ns)
        deadline = _now() + expiry_s
        ready: dict[str, None] = {}  # one wake-up per channel: a burst goes to a few
        for channel, payload in items:
            record = space.channels.get(channel)
            if record is None:  # the daemon checks the room; a flush keeps records with room
                record = space.add_channel(channel)
                self._bytes += CHANNEL_OVERHEAD_BYTES
            elif record.reserved:
                record.reserved -= 1
            self._append(record, payload, deadline)
            ready[channel] = None
        for channel in ready:
            self._on_ready(ns, channel)

    async def release_room(
        self: _Storage, ns: str, channel: str, count: int, *, holder: str = ""
    ) -> None:
        """Uncount ``count`` units of room (never below zero)."""
        record = self._channel(ns, channel)
        if record is None or count <= 0:
            return
        record.reserved = max(0, record.reserved - count)
        if not (record.queue or record.held or record.reserved) and record.bucket is None:
            self._forget_channel(record)

    def _keep_room(self: _Storage, ns: str, flushed: Space) -> None:
        """A flush of ``ns`` drops its messages, not the room senders hold: carry each
        reservation over into a record of the new, empty namespace."""
        reserved = [(record.name, record.reserved) for record in flushed.channels.values()]
        for name, count in reserved:
            if count:
                self._space(ns).add_channel(name).reserved = count
                self._bytes += CHANNEL_OVERHEAD_BYTES
