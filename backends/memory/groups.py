"""Groups in the memory backend: members per (group, owning client), and group sends.

Theory of operation. A group keeps its members by the client id that owns them (the
part of a process-specific name before ``!``; normal channels under None), so that a
group send does work per owning client, not per member, wherever it can: for an owner
connected to this daemon that takes fan-outs (``backends.fanout``), the backend hands
the daemon that owner's member list, encoded once and kept until a member comes or
goes, and stores nothing; the owner's layer applies each member's capacity in its
buffers. Members of the other owners (away, or with pushes of theirs still waiting,
whose order a fan-out must not pass) are stored one by one, as before. With a
``channel_capacity`` pattern (no uniform capacity) every member is stored, since the
layer applies one capacity per fan-out.

Membership expiry: each owner's members are in deadline order while a site uses one
group_expiry; the sweep drops lapsed ones from each head, and a kept list is made
again once the soonest deadline in it passed, so a fan-out never names a lapsed member.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from protocol import encode_channels, ttl_ms

from ..base import CapacityOf, resolved
from ..deadlines import SharedDeadlines
from ..fanout import EdgeOwners
from ..records import GroupSendResult
from .budget import CHANNEL_OVERHEAD_BYTES, MESSAGE_OVERHEAD_BYTES, Refusals
from .records import Group, Members, Space, client_of
from .wheel import TimerWheel

__all__ = ["MemoryGroups"]

_now = time.monotonic
#: What a stored message may cost, as ``backend`` checks it against ``--max-memory``.
_NEW_MESSAGE_BYTES = MESSAGE_OVERHEAD_BYTES + CHANNEL_OVERHEAD_BYTES


class _Storage(Protocol):
    """What the group calls need of ``MemoryBackend``."""

    _max_bytes: int
    _spaces: dict[str, Space]
    _refusals: Refusals
    _group_wheel: TimerWheel[Group]
    _groups: int
    _memberships: int
    _owners: EdgeOwners
    _on_ready: Callable[[str, str], None]
    _deadlines: SharedDeadlines

    def _space(self, ns: str) -> Space: ...

    def _group(self, ns: str, name: str) -> Group | None: ...

    def _used_bytes(self) -> int: ...

    def _put(
        self, space: Space, name: str, payload: bytes, capacity: int, deadline: float, now: float
    ) -> bool: ...

    def _drop_members(
        self, record: Group, owner: str | None, members: Members, channels: list[str]
    ) -> None: ...

    def _listed(self, record: Group, owner: str, members: Members, now: float) -> bytes | None: ...


class _Send:
    """One group send's message and what became of it, member by member."""

    __slots__ = ("capacity_of", "deadline", "delivered", "fit", "ns", "payload", "skipped")

    def __init__(self, ns: str, payload: bytes, capacity_of: CapacityOf, deadline: float) -> None:
        self.ns, self.payload, self.capacity_of, self.deadline = ns, payload, capacity_of, deadline
        self.fit: int | None = None  # stored messages --max-memory leaves room for
        self.delivered: list[str] = []
        self.skipped = 0


class MemoryGroups:
    """Group calls of ``MemoryBackend`` (a base class of it)."""

    _owners: EdgeOwners

    def set_edge_owners(self: _Storage, owners: EdgeOwners) -> None:
        """Fan out to these owners instead of storing, when they can take it (the module)."""
        self._owners = owners

    async def group_add(
        self: _Storage, ns: str, group: str, channel: str, *, group_expiry_s: float
    ) -> None:
        """Add or renew a membership; it lapses ``group_expiry_s`` seconds from now."""
        space = self._space(ns)
        record = space.groups.get(group)
        if record is None:
            record = space.groups[group] = Group(space, group)
            self._groups += 1
        owner = client_of(channel)
        members = record.owners.get(owner)
        if members is None:
            members = record.owners[owner] = Members()
        # Pop and re-insert so the dict stays in deadline order (for a single expiry).
        if members.deadlines.pop(channel, None) is None:
            self._memberships += 1
            record.size += 1
            members.listed = None  # a renewal leaves the list as it is
        deadline = self._deadlines.after(_now(), group_expiry_s)
        members.deadlines[channel] = deadline
        if record.bucket is None:
            self._group_wheel.file(record, deadline)

    async def group_discard(self: _Storage, ns: str, group: str, channel: str) -> None:
        """Remove a membership; a no-op for a non-member."""
        record = self._group(ns, group)
        owner = client_of(channel)
        members = None if record is None else record.owners.get(owner)
        if members is not None and channel in members.deadlines:
            assert record is not None
            self._drop_members(record, owner, members, [channel])

    async def group_send(
        self: _Storage,
        ns: str,
        group: str,
        payload: bytes,
        *,
        capacity_of: CapacityOf,
        expiry_s: float,
    ) -> GroupSendResult:
        """Fan out to the owners the daemon can reach; store the same ``payload`` object
        for every other live member with room."""
        space = self._spaces.get(ns)  # not ``_group``: a fan-out runs no code of backend.py
        record, uniform = None if space is None else space.groups.get(group), capacity_of.uniform
        if record is not None and uniform is None:
            capacity_of = await resolved(capacity_of, record.channels())
            record = record if self._group(ns, group) is record else None  # flushed meanwhile
        if record is None:
            return GroupSendResult(delivered=[], skipped=0)
        now = _now()
        send = _Send(ns, payload, capacity_of, now + expiry_s)
        owners, edge = self._owners if uniform is not None else {}, 0
        for client, members in list(record.owners.items()):
            owner = None if client is None else owners.get((ns, client))
            if owner is not None:
                assert client is not None and uniform is not None
                listed = self._listed(record, client, members, now)
                if listed is None:
                    continue  # every member of it lapsed
                if owner.can_fan_out(len(listed) + len(payload)):
                    owner.fan_out(listed, payload, ttl_ms(expiry_s), uniform)
                    edge += len(members.deadlines)
                    continue
            _store(self, record, client, members, send, now)
        return GroupSendResult(delivered=send.delivered, skipped=send.skipped, edge=edge)

    def _listed(
        self: _Storage, record: Group, owner: str, members: Members, now: float
    ) -> bytes | None:
        """The owner's live members as a fan-out carries them; None if none is left."""
        if members.listed is None or members.earliest <= now:
            lapsed = [channel for channel, deadline in members.deadlines.items() if deadline <= now]
            if lapsed:
                self._drop_members(record, owner, members, lapsed)
            if not members.deadlines:
                return None
            members.listed = encode_channels(list(members.deadlines))
            members.earliest = min(members.deadlines.values())
        return members.listed

    def _drop_members(
        self: _Storage, record: Group, owner: str | None, members: Members, channels: list[str]
    ) -> None:
        """Remove these members of one owner (all present); forget what empties."""
        deadlines = members.deadlines
        for channel in channels:
            del deadlines[channel]
        members.listed = None
        self._memberships -= len(channels)
        record.size -= len(channels)
        if not deadlines:
            del record.owners[owner]
        if not record.size:
            del record.space.groups[record.name]
            self._groups -= 1
            self._group_wheel.unfile(record)

    def _sweep_group(self: _Storage, record: Group, now: float) -> None:
        for owner, members in list(record.owners.items()):
            lapsed = members.lapsed(now)
            if lapsed:
                self._drop_members(record, owner, members, lapsed)
        if record.size:
            self._group_wheel.file(record, record.earliest_head())


def _store(
    storage: _Storage,
    record: Group,
    owner: str | None,
    members: Members,
    send: _Send,
    now: float,
) -> None:
    """Store the message for each live member of one owner with room, as ``send`` says."""
    uniform, capacity_of, space = send.capacity_of.uniform, send.capacity_of, record.space
    put, on_ready = storage._put, storage._on_ready
    ns, payload, deadline, delivered = send.ns, send.payload, send.deadline, send.delivered
    fit = send.fit
    if fit is None:  # the first owner stored for (fan-outs take no memory here)
        fit = (storage._max_bytes - storage._used_bytes()) // (_NEW_MESSAGE_BYTES + len(payload))
    lapsed: list[str] = []
    refused = 0
    for channel, member_deadline in members.deadlines.items():
        if member_deadline <= now:
            lapsed.append(channel)
        elif fit <= 0:  # memory is nearly full
            refused += 1
        elif put(space, channel, payload, uniform or capacity_of(channel), deadline, now):
            delivered.append(channel)
            fit -= 1
            on_ready(ns, channel)
        else:
            send.skipped += 1
    send.fit = fit
    if refused:
        storage._refusals.count(refused, storage._used_bytes())
        send.skipped += refused
    if lapsed:
        storage._drop_members(record, owner, members, lapsed)
