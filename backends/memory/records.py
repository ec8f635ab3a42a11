"""The records of the memory backend: namespaces, channels and groups."""

from __future__ import annotations

import heapq
import sys
from collections import deque

from .wheel import Filed

__all__ = [
    "SHORT_QUEUE",
    "Channel",
    "Group",
    "Members",
    "Queue",
    "Space",
    "client_of",
    "longest_queues",
]

#: A channel's messages: a list while it holds fewer than ``SHORT_QUEUE`` (a deque costs
#: 760 bytes from its first message, a list of one 64: most channels hold one or two),
#: then a deque (taking from a long list's head would move everything behind it).
SHORT_QUEUE = 32
Queue = list[tuple[float, bytes]] | deque[tuple[float, bytes]]


def client_of(name: str) -> str | None:
    """The client id of a process-specific channel name, None for a normal one
    (``protocol.client_id_of``, inlined: this runs for every record made)."""
    bang = name.find("!")
    return None if bang < 0 else name[name.rfind(".", 0, bang) + 1 : bang]


class Space:
    """One namespace: its channels (also by client id) and its groups."""

    __slots__ = ("channels", "clients", "groups")

    def __init__(self) -> None:
        self.channels: dict[str, Channel] = {}
        self.clients: dict[str, dict[str, Channel]] = {}
        self.groups: dict[str, Group] = {}

    def add_channel(self, name: str) -> Channel:
        name = sys.intern(name)  # the same object as the channel's group memberships hold
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
        self.client = client_of(name)
        self.queue: Queue = []
        self.held = 0
        self.reserved = 0


class Group(Filed):
    """A group's members, by owning client id (None: normal channels), and how many."""

    __slots__ = ("name", "owners", "size", "space")

    def __init__(self, space: Space, name: str) -> None:
        self.bucket = None
        self.space = space
        self.name = name
        self.owners: dict[str | None, Members] = {}
        self.size = 0

    def channels(self) -> list[str]:
        """Every member's name."""
        return [channel for members in self.owners.values() for channel in members.deadlines]

    def earliest_head(self) -> float:
        """The soonest deadline at the head of any owner's members (where sweeps look)."""
        return min(next(iter(members.deadlines.values())) for members in self.owners.values())


class Members:
    """One owner's members of a group: channel -> deadline, in the order of their latest
    ``group_add``, and the list a fan-out carries (``listed``, encoded), made again only
    once a member came or went (None meanwhile) or the soonest deadline in it passed."""

    __slots__ = ("deadlines", "earliest", "listed")

    def __init__(self) -> None:
        self.deadlines: dict[str, float] = {}
        self.listed: bytes | None = None
        self.earliest = 0.0

    def lapsed(self, now: float) -> list[str]:
        """The members lapsed at ``now``, looked for at the head only: members are in
        deadline order while a site uses one group_expiry."""
        lapsed: list[str] = []
        for channel, deadline in self.deadlines.items():
            if deadline > now:
                break
            lapsed.append(channel)
        return lapsed


def longest_queues(spaces: dict[str, Space], limit: int) -> list[tuple[str, str, int]]:
    """``(namespace, channel, messages)`` of the ``limit`` longest queues: O(channels)."""
    records = ((ns, record) for ns, space in spaces.items() for record in space.channels.values())
    longest = heapq.nlargest(limit, records, key=lambda item: len(item[1].queue))
    return [(ns, record.name, len(record.queue)) for ns, record in longest if record.queue]
