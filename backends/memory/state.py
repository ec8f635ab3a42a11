"""The memory backend's waiting messages and memberships as a ``State`` and back.

``export_state`` runs when the daemon stops (its connections closed: nothing changes
meanwhile), ``import_state`` when it starts, before it listens. Deadlines here are on
the monotonic clock, which means nothing in another process: the state carries seconds
left, and the time between writing and reading (wall clock) is taken off each, so an
expiry counts the time the daemon was down and an expired entry is dropped.
"""

from __future__ import annotations

import time
from typing import Protocol

from .budget import CHANNEL_OVERHEAD_BYTES
from .records import Channel, Space
from .state_file import SpaceState, State

__all__ = ["MemoryState", "Restored"]

_now = time.monotonic


class _Storage(Protocol):
    """What the state calls need of ``MemoryBackend``."""

    _bytes: int
    _spaces: dict[str, Space]

    def _space(self, ns: str) -> Space: ...

    def _append(self, record: Channel, payload: bytes, deadline: float) -> None: ...

    async def group_add(
        self, ns: str, group: str, channel: str, *, group_expiry_s: float
    ) -> None: ...


class Restored:
    """What ``import_state`` put back, and what it dropped as expired."""

    __slots__ = ("expired", "memberships", "messages")

    def __init__(self) -> None:
        self.messages = self.memberships = self.expired = 0


class MemoryState:
    """``export_state`` and ``import_state`` for ``MemoryBackend`` (a base class of it)."""

    def export_state(self: _Storage, incarnation: str, written_at: float) -> State:
        """Every unexpired waiting message and membership, with its seconds left."""
        now = _now()
        state = State(incarnation, written_at)
        for ns, space in self._spaces.items():
            saved = SpaceState()
            for name, record in space.channels.items():
                messages = [(deadline - now, p) for deadline, p in record.queue if deadline > now]
                if messages:
                    saved.channels[name] = messages
            for name, group in space.groups.items():
                members = [
                    (channel, deadline - now)
                    for of_owner in group.owners.values()
                    for channel, deadline in of_owner.deadlines.items()
                    if deadline > now
                ]
                if members:
                    saved.groups[name] = members
            if saved.channels or saved.groups:
                state.spaces[ns] = saved
        return state

    async def import_state(self: _Storage, state: State, read_at: float) -> Restored:
        """Put ``state`` back (into an empty store), less what expired since it was
        written; messages go in as they were accepted, past capacity and ``--max-memory``."""
        restored, now = Restored(), _now()
        down_s = max(0.0, read_at - state.written_at)
        for ns, saved in state.spaces.items():
            space = self._space(ns)
            for name, messages in saved.channels.items():
                live = [(left_s - down_s, p) for left_s, p in messages if left_s > down_s]
                restored.expired += len(messages) - len(live)
                if not live:
                    continue
                record = space.channels.get(name)
                if record is None:
                    record = space.add_channel(name)
                    self._bytes += CHANNEL_OVERHEAD_BYTES
                for left_s, payload in live:
                    self._append(record, payload, now + left_s)
                restored.messages += len(live)
            for group, members in saved.groups.items():
                for channel, left_s in members:
                    if left_s > down_s:
                        await self.group_add(ns, group, channel, group_expiry_s=left_s - down_s)
                        restored.memberships += 1
        return restored
