"""Messages a send handed straight back to its daemon, for a client attached there.

When the owner of a process-specific channel is attached to the sending daemon and
nothing else waits on the channel, the PUSH script pops the new message again at once,
counted as held, and returns it: the daemon's next ``take`` of that channel needs no
round trip, so a message to a local consumer costs one script call instead of two.
The stash keeps such messages, oldest first, until that take. It is always older than
whatever waits in Redis for the channel (the queue was empty when the message was
grabbed), so a take serves the stash first. Messages nobody takes within
``HOLD_S`` (the owner left), or of a client that is no longer attached, go back to
the head of their Redis queue. Redis keeps each grabbed message under a lease until
then (``pushed``): a daemon killed with some here loses none.
"""

from __future__ import annotations

from collections import deque

from protocol import client_id_of

__all__ = ["HOLD_S", "Stash"]

#: A grabbed message is taken within a loop pass or two while its owner is attached;
#: one still here after this long goes back to Redis, where any daemon can deliver it.
HOLD_S = 1.0

#: (namespace, channel)
Key = tuple[str, str]
#: An entry as stored in Redis, its local deadline, when it was grabbed (loop time),
#: and the lease it is held under in Redis (``pushed``).
Item = tuple[bytes, float, float, str]


class Stash:
    """Grabbed entries per channel, oldest first."""

    def __init__(self) -> None:
        self._items: dict[Key, deque[Item]] = {}

    def __bool__(self) -> bool:
        return bool(self._items)

    def has(self, ns: str, channel: str) -> bool:
        return (ns, channel) in self._items

    def add(
        self, ns: str, channel: str, entry: bytes, deadline: float, now: float, lease: str
    ) -> None:
        self._items.setdefault((ns, channel), deque()).append((entry, deadline, now, lease))

    def take(self, ns: str, channel: str, limit: int, now: float) -> tuple[list[Item], list[Item]]:
        """Up to ``limit`` unexpired items of a channel, and the expired ones that went."""
        items = self._items.get((ns, channel))
        if not items:
            return [], []
        live: list[Item] = []
        expired: list[Item] = []
        while items and len(live) < limit:
            item = items.popleft()
            if item[1] > now:
                live.append(item)
            else:
                expired.append(item)
        if not items:
            del self._items[(ns, channel)]
        return live, expired

    def channels_of(self, ns: str, client_id: str) -> list[str]:
        return [
            channel
            for space, channel in self._items
            if space == ns and client_id_of(channel) == client_id
        ]

    def pop_client(self, ns: str, client_id: str) -> dict[Key, list[str]]:
        return self._pop([(ns, channel) for channel in self.channels_of(ns, client_id)])

    def pop_channel(self, ns: str, channel: str) -> list[str]:
        """The leases of one channel's entries, oldest first, gone from here."""
        return self._pop([(ns, channel)]).get((ns, channel), []) if self.has(ns, channel) else []

    def pop_namespace(self, ns: str) -> None:
        self._pop([key for key in self._items if key[0] == ns])

    def pop_stale(self, cutoff: float) -> dict[Key, list[str]]:
        """Every channel whose oldest item was grabbed at ``cutoff`` or before."""
        return self._pop([key for key, items in self._items.items() if items[0][2] <= cutoff])

    def pop_all(self) -> dict[Key, list[str]]:
        return self._pop(list(self._items))

    def _pop(self, keys: list[Key]) -> dict[Key, list[str]]:
        """The leases of these channels' entries: Redis keeps the entries under them."""
        return {key: [item[3] for item in self._items.pop(key)] for key in keys}
