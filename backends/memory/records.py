"""The records of the memory backend: namespaces, channels and groups."""

from __future__ import annotations

import heapq
from collections import deque

from .wheel import Filed

__all__ = ["Channel", "Group", "Space", "longest_queues"]


class Space:
    """One namespace: its channels (also by client id) and its groups."""

    __slots__ = ("channels", "clients", "groups")

    def __init__(self) -> None:
        self.channels: dict[str, Channel] = {}
        self.clients: dict[str, dict[str, Channel]] = {}
        self.groups: dict[str, Group] = {}

    def add_channel(self, name: str) -> Channel:
        record = self.channels[name] = Channel(self, name)
        if record.client is not None:
            self.clients.setdefault(record.client, {})[name] = record
        return record

    def forget_all(self) -> None:
        """Drop every record (the namespace was flushed), so none outlives it."""
        self.channels.clear()
        self.clients.clear()
        self.groups.clear()

    def remove_channel(self, record: Channel) -> None:
        del self.channels[record.name]
        if record.client is not None:
            of_client = self.clients[record.client]
            del of_client[record.name]
            if not of_client:
                del self.clients[record.client]


class Channel(Filed):
    """A channel's waiting messages, oldest first, how many taken ones are held, and how
    much send room senders hold on it (``reserved``, see ``backends.room``)."""

    __slots__ = ("client", "held", "name", "queue", "reserved", "space")

    def __init__(self, space: Space, name: str) -> None:
        self.bucket = None
        self.space = space
        self.name = name
        # protocol.client_id_of, inlined: this runs for every channel record made.
        bang = name.find("!")
        self.client = None if bang < 0 else name[name.rfind(".", 0, bang) + 1 : bang]
        self.queue: deque[tuple[float, bytes]] = deque()
        self.held = 0
        self.reserved = 0


class Group(Filed):
    """A group's members, channel -> deadline, in the order of their latest ``group_add``."""

    __slots__ = ("members", "name", "space")

    def __init__(self, space: Space, name: str) -> None:
        self.bucket = None
        self.space = space
        self.name = name
        self.members: dict[str, float] = {}

    def lapsed(self, now: float) -> list[str]:
        """The members lapsed at ``now``, looked for at the head only: members are in
        deadline order while a site uses one group_expiry."""
        lapsed: list[str] = []
        for channel, deadline in self.members.items():
            if deadline > now:
                break
            lapsed.append(channel)
        return lapsed


def longest_queues(spaces: dict[str, Space], limit: int) -> list[tuple[str, str, int]]:
    """``(namespace, channel, messages)`` of the ``limit`` longest queues: O(channels)."""
    records = ((ns, record) for ns, space in spaces.items() for record in space.channels.values())
    longest = heapq.nlargest(limit, records, key=lambda item: len(item[1].queue))
    return [(ns, record.name, len(record.queue)) for ns, record in longest if record.queue]
