"""The storage contract every backend keeps: few, coarse operations.

Terms: ``ns`` is a namespace (the layer's ``prefix``), so several sites can share
one daemon and ``flush`` empties one site only. Payloads are opaque bytes. A message
is *waiting* in its channel until taken; ``take(hold=True)`` (used for pushes to a
client's own channels) keeps it counted against the channel's capacity until
``release``, so capacity bounds the client's buffer too.

Wake-ups: a backend calls the ``on_ready(ns, channel)`` callback given to
``set_wakeup`` whenever messages may be waiting on a channel it was asked to
``watch`` (a normal channel with pullers, or a client id for every channel of
that client). A spurious wake-up is harmless; a missed one is a bug.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Protocol, Self

from .errors import BackendError
from .records import BackendStats, GroupSendResult, Taken

__all__ = ["Backend", "CapacityOf", "WakeupCallback", "resolved"]

#: Called with (namespace, channel) when messages may be waiting for a watched channel.
WakeupCallback = Callable[[str, str], None]


class CapacityOf(Protocol):
    """The sender's ``channel_capacity`` policy: a channel name to its capacity.

    A backend asks ``all_of`` for a batch (a group's members, a ``send_many``): a client's
    patterns may cost up to a millisecond a name, so it may yield to the event loop
    between slices of them, and whatever the backend read before it may change meanwhile.
    """

    #: The capacity of every channel when no pattern applies, else None: lets a backend
    #: check a whole group at once (one script on Redis) without asking per member.
    uniform: int | None

    def __call__(self, channel: str) -> int: ...

    async def all_of(self, channels: Sequence[str]) -> list[int]:
        """The capacity of each of ``channels``, in order."""
        ...


async def resolved(capacity_of: CapacityOf, channels: list[str]) -> CapacityOf:
    """``capacity_of`` with ``channels`` matched at once (``all_of``, which may yield):
    then a dict lookup each, and ``capacity_of`` itself for any other name."""
    return _Resolved(capacity_of, await capacity_of.all_of(channels), channels)


class _Resolved:
    """A ``CapacityOf`` that knows some names' capacities already (``resolved``)."""

    __slots__ = ("_known", "_policy")

    uniform: int | None = None

    def __init__(self, policy: CapacityOf, capacities: list[int], channels: list[str]) -> None:
        self._policy = policy
        self._known = dict(zip(channels, capacities, strict=True))

    def __call__(self, channel: str) -> int:
        capacity = self._known.get(channel)
        return self._policy(channel) if capacity is None else capacity

    async def all_of(self, channels: Sequence[str]) -> list[int]:
        return [self(channel) for channel in channels]


def _ignore_wakeup(ns: str, channel: str) -> None:
    """Default wake-up target until the daemon installs its router."""


class Backend(abc.ABC):
    """One storage for channels and groups, shared by all connections of a daemon."""

    #: True when several daemons may share this storage (Redis, PostgreSQL).
    is_shared: bool = False

    def __init__(self) -> None:
        self._on_ready: WakeupCallback = _ignore_wakeup

    @classmethod
    @abc.abstractmethod
    def from_url(cls, url: str) -> Self:
        """Build a backend from its URL; raise ``BackendError`` for a bad URL."""

    def set_wakeup(self, callback: WakeupCallback) -> None:
        """Install the callback told about channels that may have messages."""
        self._on_ready = callback

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open connections and start background jobs; raise ``BackendUnavailable``."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop background jobs and close connections. Idempotent."""

    async def prepare_to_stop(self) -> None:
        """The daemon is about to stop, its clients still connected: give storage back
        what this backend keeps in memory only to be faster (messages taken ahead), so
        that the clients, reconnecting elsewhere, find it there in order."""
        return  # most backends keep nothing of the kind

    @abc.abstractmethod
    async def is_ready(self) -> bool:
        """True when the storage answers now (for ``/readyz``)."""

    @abc.abstractmethod
    async def send(
        self, ns: str, channel: str, payload: bytes, *, capacity: int, expiry_s: float
    ) -> bool:
        """Append a message unless the channel holds ``capacity``; False when full.

        The capacity check and the insert are one atomic step.
        """

    @abc.abstractmethod
    async def send_many(
        self,
        ns: str,
        items: Sequence[tuple[str, bytes]],
        *,
        capacity_of: CapacityOf,
        expiry_s: float,
    ) -> list[int]:
        """Send several messages in order; return the indexes refused as full."""

    @abc.abstractmethod
    async def take(self, ns: str, channel: str, limit: int, *, hold: bool) -> list[Taken]:
        """Remove up to ``limit`` unexpired messages from the head of a channel.

        With ``hold`` they still count against capacity until ``release``.
        """

    async def take_many(
        self, ns: str, channels: Sequence[str], limit: int, *, hold: bool
    ) -> dict[str, list[Taken]]:
        """``take`` from several channels, in one step where the backend can.

        The result has an entry for each channel taken from (an empty list when it
        had nothing). A backend error is raised if no channel was reached; once some
        were, the rest are left out of the result, for the caller to try later. The
        default takes one channel after the other; shared backends do it in one
        round trip (a connection pushing a group message to many of its channels).
        """
        taken: dict[str, list[Taken]] = {}
        for channel in channels:
            try:
                taken[channel] = await self.take(ns, channel, limit, hold=hold)
            except BackendError:
                if not taken:
                    raise
                break
        return taken

    @abc.abstractmethod
    async def release(self, ns: str, channel: str, count: int) -> None:
        """Stop counting ``count`` held messages of ``channel`` against its capacity."""

    async def release_taken(self, ns: str, channel: str, count: int, leases: Sequence[str]) -> None:
        """The client acknowledged ``count`` held messages of ``channel``; ``leases``:
        those of them that storage keeps leased (``Taken.lease``: a take for a push, or
        on PostgreSQL a direct push, which ``count`` leaves out), whose leases end with
        them. Storage that leases no push just releases."""
        await self.release(ns, channel, count)

    @abc.abstractmethod
    async def give_back(self, ns: str, channel: str, items: Sequence[Taken], held: int) -> None:
        """Put messages pushed to a client and not acknowledged back at the head of
        ``channel``, in order, before anything waiting there, and stop counting ``held`` of
        its held messages (as ``release``): the client's connection closed, and its next
        one is pushed them again. Each keeps its deadline (``Taken.deadline``); expired
        ones are dropped. Never refused as full: they were accepted. Wakes the channel.
        """

    @abc.abstractmethod
    async def channels_with_messages(self, ns: str, client_id: str) -> list[str]:
        """Channels of one client (``...<client_id>!...``) with waiting messages.

        Asked when a client (re-)attaches, to push what waited while it was away.
        """

    @abc.abstractmethod
    async def group_add(self, ns: str, group: str, channel: str, *, group_expiry_s: float) -> None:
        """Add or renew a membership; it lapses ``group_expiry_s`` after this call."""

    @abc.abstractmethod
    async def group_discard(self, ns: str, group: str, channel: str) -> None:
        """Remove a membership; a no-op for a non-member."""

    @abc.abstractmethod
    async def group_send(
        self, ns: str, group: str, payload: bytes, *, capacity_of: CapacityOf, expiry_s: float
    ) -> GroupSendResult:
        """Send to every live member that has room; full members are skipped, not errors.

        A backend that ``AcceptsDirectPushes`` may leave out of storage the members the
        daemon can push to that have nothing waiting or held there, and name them in
        ``direct``.
        """

    @abc.abstractmethod
    async def flush(self, ns: str) -> None:
        """Drop every message, held count and group of the namespace."""

    @abc.abstractmethod
    def watch(self, ns: str, key: str) -> None:
        """Ask for wake-ups for a normal channel, or for all channels of a client id."""

    @abc.abstractmethod
    def unwatch(self, ns: str, key: str) -> None:
        """Stop the wake-ups asked for by ``watch``."""

    @abc.abstractmethod
    def stats(self) -> BackendStats:
        """Gauges for metrics; must not do I/O (a shared backend reports its last reading)."""

    async def top_channels(self, limit: int) -> list[tuple[str, str, int]] | None:
        """Up to ``limit`` channels with the most waiting messages, most first.

        Each is ``(namespace, channel, messages waiting)``. Asked on demand by
        ``channels-broker status`` (never per scrape), so it may cost a scan. None,
        the default, means this backend cannot tell cheaply.
        """
        return None
