"""The records of the memory backend: namespaces, channels and groups."""

from __future__ import annotations

from collections import deque

from .wheel import Filed

__all__ = ["Channel", "Group", "Space"]


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
    """A channel's waiting messages, oldest first, and how many taken ones are held."""

    __slots__ = ("client", "held", "name", "queue", "space")

    def __init__(self, space: Space, name: str) -> None:
        self.bucket = None
        self.space = space
        self.name = name
        # protocol.client_id_of, inlined: this runs for every channel record made.
        bang = name.find("!")
        self.client = None if bang < 0 else name[name.rfind(".", 0, bang) + 1 : bang]
        self.queue: deque[tuple[float, bytes]] = deque()
        self.held = 0


class Group(Filed):
    """A group's members, channel -> deadline, in the order of their latest ``group_add``."""

    __slots__ = ("members", "name", "space")

    def __init__(self, space: Space, name: str) -> None:
        self.bucket = None
        self.space = space
        self.name = name
        self.members: dict[str, float] = {}
