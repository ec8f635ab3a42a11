"""Send windows on Redis (``backends.ReservesRoom``): room reserved in Redis, and each
client's numbered sends stored at most once, whichever daemon it reaches.

Theory of operation (docs/flow.md, docs/redis.md). Room is counted in the channel's
``r:`` hash per connection (its ``holder`` and this daemon's ``origin``), and every
capacity check of every daemon counts it (``scripts.push``). A request of a windowed
client is one SEND_RESERVING script: the client's seq record, the checked store and
the room it gets, atomically; a run of windowed SENDs is one SEND_RESERVED script,
whatever their channels. Both record the seqs in the client's own keys, so a client
that reconnects to another daemon and sends again what it has no answer for is
answered there without a second store, and what its dead daemon had not stored goes
into the room reserved for it there (``room_scripts``). Room lapses ``room_lapse``
after its holder's last change.

Outside Cluster only: the record lives in the client's slot and a run of sends spans
channels of any slot (on Cluster, ``can_reserve_room`` is False and windows are off).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from backends import ALREADY_STORED, SEQ_SPAN

from .commands import Commands
from .keys import KEEP_MARGIN_MS, Keys
from .room_scripts import (
    RECORD_SEQ,
    RELEASE_ROOM,
    RESERVE_ROOM,
    SEND_RESERVED,
    SEND_RESERVING,
    SEQ_STORED,
)
from .takes import Takes

__all__ = ["RedisRoom"]


class RedisRoom:
    """Room and numbered sends of one Redis backend (``origin``: this daemon's name)."""

    def __init__(
        self, keys: Keys, commands: Commands, takes: Takes, *, origin: str, lapse_s: float
    ) -> None:
        self._keys = keys
        self._commands = commands
        self._takes = takes
        self._origin = origin
        self._lapse_ms = _ms(lapse_s)

    def can_reserve_room(self) -> bool:
        topology = self._commands.topology
        return topology is not None and not topology.is_cluster

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
        topology = self._commands.require()
        keys = self._keys.seqs(ns, client) + self._keys.channel_keys(ns, channel)
        wake = self._keys.wake(ns, channel)
        expiry_ms = _ms(expiry_s)
        args: list[Any] = [channel, capacity, payload, expiry_ms, expiry_ms + KEEP_MARGIN_MS]
        mine = int(topology.is_listening(wake.encode()))
        args += [self._origin, topology.publish_command, wake, mine]
        args += [window, self._field(holder), self._lapse_ms, seq, expiry_ms + KEEP_MARGIN_MS]
        args += [SEQ_SPAN, f"{client} "]
        outcome, room = await self._commands.run(SEND_RESERVING, keys, args)
        if outcome == 0:
            return None
        if outcome == 2:
            return ALREADY_STORED
        self._takes.wake(ns, channel)
        return int(room)

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
        """Store each into a unit of its channel's room, in order, in one script."""
        topology = self._commands.require()
        keys = self._keys.seqs(ns, client)
        expiry_ms = _ms(expiry_s)
        args: list[Any] = [expiry_ms, expiry_ms + KEEP_MARGIN_MS, self._origin]
        args += [topology.publish_command, self._field(holder), self._lapse_ms]
        args += [expiry_ms + KEEP_MARGIN_MS, SEQ_SPAN]
        for (channel, payload), seq in zip(items, seqs or [0] * len(items), strict=True):
            keys += self._keys.channel_keys(ns, channel)
            wake = self._keys.wake(ns, channel)
            args += [channel, payload, wake, int(topology.is_listening(wake.encode())), seq]
        stored = await self._commands.run(SEND_RESERVED, keys, args)
        for (channel, _), outcome in zip(items, stored, strict=True):
            if outcome == 1:
                self._takes.wake(ns, channel)

    async def reserve_room(
        self, ns: str, channel: str, *, capacity: int, window: int, size: int, holder: str = ""
    ) -> int:
        """Reserve room, storing nothing (Redis bounds its memory itself: ``size`` unused)."""
        keys = self._keys.channel_keys(ns, channel)[:2]
        args = [channel, capacity, window, self._field(holder), self._lapse_ms]
        return int(await self._commands.run(RESERVE_ROOM, keys, args))

    async def release_room(self, ns: str, channel: str, count: int, *, holder: str = "") -> None:
        if count > 0:
            keys = [self._keys.room(ns, channel)]
            args = [self._field(holder), count, self._lapse_ms]
            await self._commands.run(RELEASE_ROOM, keys, args)

    async def seq_was_stored(self, ns: str, client: str, seq: int) -> bool:
        """``backends.RecordsSeqs``: a numbered GROUP_SEND stored before?"""
        return bool(
            await self._commands.run(SEQ_STORED, self._keys.seqs(ns, client), [seq, SEQ_SPAN])
        )

    async def record_seq(
        self, ns: str, client: str, seqs: Sequence[int], *, stored: bool, keep_s: float
    ) -> None:
        """``backends.RecordsSeqs``: a numbered GROUP_SEND's outcome, in the record."""
        args = [int(stored), _ms(keep_s) + KEEP_MARGIN_MS, SEQ_SPAN, *seqs]
        await self._commands.run(RECORD_SEQ, self._keys.seqs(ns, client), args)

    def _field(self, holder: str) -> str:
        """The room hash's field of a connection: its holder, and this daemon's name."""
        return f"{holder} {self._origin}"


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
