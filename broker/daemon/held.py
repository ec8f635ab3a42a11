"""What one connection's own channels hold of their capacity, and the messages behind it.

Messages pushed to a client's own channels count against their capacity until its
layer acknowledges them, by count per channel, as ``receive`` takes them (``Ack.counts``):
``Held`` keeps those counts. It also keeps the messages themselves (``Unacked``):
references to what storage handed over, no copy, in push order, the n oldest of a
channel dropped by an ACK of n. A connection that closes with some left gives them back
to storage, at the head of their channel, in order (``Backend.give_back``), so the
client's next connection (the same client id, so the same channel names) is pushed them
again and nothing in flight is lost with a cut connection; its layer drops a copy of one
it handed to ``receive`` already, by its message id (``HandedIds``). A layer that does
not say ``acks_deliveries`` in its HELLO (an older one) would see those copies: its held
counts are released as before, and what it did not get is lost with its connection.

Fan-outs that storage keeps leased (``backends.LeasesFanOuts``: Redis) are kept here too,
in push order (``fanouts``): an ACK's ``fanout_kept`` + ``fanout_dropped`` count whole
fan-out PUSHes, the oldest first, whose leases then end; a connection that closes hands
the rest back to storage, which stores each for its members.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence

from backends import Backend, BackendError, FanOutLease, LeasesFanOuts, Taken

__all__ = ["Held", "Leased", "Unacked"]

#: A fan-out's lease in storage, or None (storage keeps none: ``memory://``).
Leased = FanOutLease | None

log = logging.getLogger("channels_broker.connection")

#: Past this many unacknowledged messages a channel's list becomes a deque: an ACK
#: drops from its head, which in a long list moves everything behind it.
LONG_UNACKED = 32


class Unacked:
    """Messages pushed to a connection's own channels and not acknowledged, per channel,
    oldest first: each a ``Taken`` as storage handed it over (a reference, no copy)."""

    __slots__ = ("_by_channel",)

    def __init__(self) -> None:
        self._by_channel: dict[str, list[Taken] | deque[Taken]] = {}

    def __len__(self) -> int:
        return sum(len(kept) for kept in self._by_channel.values())

    def pushed(self, channel: str, items: list[Taken]) -> None:
        """``items`` of ``channel`` were pushed (the list is kept as it is, not copied)."""
        kept = self._by_channel.get(channel)
        if kept is None:
            self._by_channel[channel] = items
            return
        kept.extend(items)
        if type(kept) is list and len(kept) > LONG_UNACKED:
            self._by_channel[channel] = deque(kept)

    def acknowledge(self, channel: str, count: int) -> list[str]:
        """The client consumed the ``count`` oldest of ``channel``: return the leases
        storage keeps them under (``Taken.lease``), which end now."""
        kept = self._by_channel.get(channel)
        if kept is None:
            return []
        leased = bool(kept[0].lease)
        if count >= len(kept):
            del self._by_channel[channel]
            return [item.lease for item in kept if item.lease] if leased else []
        if isinstance(kept, list):
            dropped = kept[:count]
            del kept[:count]
        else:
            dropped = [kept.popleft() for _ in range(count)]
        return [item.lease for item in dropped if item.lease] if leased else []

    def take_all(self) -> Mapping[str, Sequence[Taken]]:
        """Forget them all and return them, by channel (to give back)."""
        kept, self._by_channel = self._by_channel, {}
        return kept

    def clear(self) -> None:
        self._by_channel.clear()


class Held:
    """What one connection's own channels hold of their capacity: messages pushed and not
    yet acknowledged, the one count the daemon keeps of them.

    Two kinds. *Stored* ones were taken from storage with ``hold`` (storage counts them
    too, until released: other daemons see only those). *Direct* ones were pushed without
    being stored to wait (``DirectPusher``; PostgreSQL keeps them leased until
    acknowledged, uncounted): storage counts none of them, so every
    capacity it checks is lowered by them; their count lapses when the newest of them
    expires, as counts held in storage do.

    The channels one connection holds messages of, here or waiting to be pushed, are
    bounded (``--max-channels``, ``has_room``): past it, storage keeps the others'
    messages, and the connection asks for them again once half of those it held are read
    (``should_take_in``; ``Handlers.take_in_own_channels``).
    """

    __slots__ = ("_direct_until", "direct", "fanouts", "left_out", "limit", "stored", "unacked")

    def __init__(self, limit: int = sys.maxsize) -> None:
        self.stored: dict[str, int] = {}
        #: The messages behind ``stored`` and ``direct``, kept until acknowledged.
        self.unacked = Unacked()
        self.direct: dict[str, int] = {}
        self._direct_until: dict[str, float] = {}
        self.limit = limit
        #: True once a channel was left out at ``limit``: storage has messages for it.
        self.left_out = False
        #: Leased fan-outs pushed and not yet acknowledged, oldest first.
        self.fanouts: deque[FanOutLease] = deque()

    def has_room(self, channel: str, ready: int) -> bool:
        """True if the connection may hold messages of ``channel`` beside the ``ready``
        channels waiting to be pushed: it holds some already, or there is room for one
        more (a channel with stored and direct ones counts twice)."""
        return (
            len(self.stored) + len(self.direct) + ready < self.limit
            or channel in self.stored
            or channel in self.direct
        )

    def should_take_in(self, ready: int) -> bool:
        """True if channels were left out and half of ``limit`` is free again."""
        return self.left_out and len(self.stored) + len(self.direct) + ready <= self.limit // 2

    @property
    def total(self) -> int:
        """Every message held, of every channel (for status)."""
        return sum(self.stored.values()) + sum(self.direct.values())

    def add_stored(self, channel: str, taken: list[Taken]) -> None:
        """``taken`` (from storage, held there) was pushed."""
        self.stored[channel] = self.stored.get(channel, 0) + len(taken)
        self.unacked.pushed(channel, taken)

    def add_direct(
        self, channels: Sequence[str], payload: bytes, ttl_s: float, leases: Sequence[str] = ()
    ) -> None:
        """A direct push (reserved already, ``reserve_direct``) went out to ``channels``;
        ``leases``: storage's lease on each (it keeps a leased copy), or empty."""
        deadline = time.monotonic() + ttl_s
        for index, channel in enumerate(channels):
            lease = leases[index] if leases else ""
            self.unacked.pushed(channel, [Taken(payload, ttl_s, lease, deadline)])

    def direct_of(self, channel: str) -> int:
        """Direct pushes of ``channel`` not yet acknowledged; lapsed ones count 0."""
        count = self.direct.get(channel, 0)
        if count and self._direct_until[channel] < time.monotonic():
            del self.direct[channel]
            del self._direct_until[channel]
            return 0
        return count

    def reserve_direct(self, channel: str, expiry_s: float) -> None:
        """Count one direct push to come (or gone out) for ``channel``."""
        self.direct[channel] = self.direct.get(channel, 0) + 1
        until = time.monotonic() + expiry_s
        if until > self._direct_until.get(channel, 0.0):
            self._direct_until[channel] = until

    def unreserve_direct(self, channel: str, count: int = 1) -> None:
        """Undo ``count`` of ``reserve_direct``."""
        _uncount(self.direct, channel, count)
        if channel not in self.direct:
            self._direct_until.pop(channel, None)

    def acknowledge(self, channel: str, count: int) -> tuple[int, list[str]]:
        """The client consumed ``count`` of ``channel``: stored ones first (storage must
        release those, the number returned, and end the leases returned), then direct
        ones. Never more than held: a client must not lift its own capacity."""
        leases = self.unacked.acknowledge(channel, count)
        stored = _uncount(self.stored, channel, count)
        if count > stored:
            self.unreserve_direct(channel, count - stored)
        return stored, leases

    async def end_fanouts(self, backend: Backend, ns: str, deliveries: int) -> None:
        """The layer made ``deliveries`` of fan-outs (kept or dropped): the oldest fan-outs
        they cover are acknowledged, and storage forgets them."""
        fanouts, leases = self.fanouts, []
        while fanouts and fanouts[0].members <= deliveries:
            deliveries -= fanouts[0].members
            leases.append(fanouts.popleft().lease)
        if leases and isinstance(backend, LeasesFanOuts):
            await backend.end_fanouts(ns, leases)

    async def give_back(self, backend: Backend, ns: str, *, redeliver: bool) -> None:
        """The connection closed: have storage release the stored counts, so that what
        was pushed and not acknowledged does not keep its channel full forever; and,
        ``redeliver``, give those messages back to their channels first (the module)."""
        await _give_back_fanouts(backend, ns, self.fanouts, redeliver=redeliver)
        stored, self.stored = self.stored, {}
        pushed = self.unacked.take_all()
        given = 0
        for channel in stored.keys() | pushed.keys():
            items, count = pushed.get(channel, ()), stored.get(channel, 0)
            try:
                if items and redeliver:
                    await backend.give_back(ns, channel, items, count)
                    given += len(items)
                elif count or any(item.lease for item in items):
                    # storage ends the leases it kept them under
                    leases = [item.lease for item in items if item.lease]
                    await backend.release_taken(ns, channel, count, leases)
            except BackendError:
                log.warning("could not give back %d messages of %s", len(items) or count, channel)
        if given:
            log.debug("gave back %d pushed messages not acknowledged (%s)", given, ns)

    def clear(self) -> None:
        """Storage dropped everything (a flush): so do we."""
        self.stored.clear()
        self.unacked.clear()
        self.direct.clear()
        self._direct_until.clear()
        self.fanouts.clear()
        self.left_out = False


async def _give_back_fanouts(
    backend: Backend, ns: str, fanouts: deque[FanOutLease], *, redeliver: bool
) -> None:
    """Fan-outs not acknowledged at close: stored for their members (``redeliver``: the
    layer drops a copy of one it got), or, for a layer that cannot drop copies, ended."""
    leases = [fanout.lease for fanout in fanouts]
    fanouts.clear()
    if not leases or not isinstance(backend, LeasesFanOuts):
        return
    try:
        if redeliver:
            await backend.give_back_fanouts(ns, leases)
        else:
            await backend.end_fanouts(ns, leases)
    except BackendError:
        log.warning("could not give back %d fan-outs (%s)", len(leases), ns)


def _uncount(counts: dict[str, int], channel: str, count: int) -> int:
    """Take up to ``count`` off ``counts[channel]``; return how many were taken off."""
    have = counts.get(channel, 0)
    count = min(count, have)
    if count:
        if have > count:
            counts[channel] = have - count
        else:
            del counts[channel]
    return max(count, 0)
