"""Per-connection capacity and expiry policy, from the layer's HELLO settings."""

from __future__ import annotations

import re

from protocol import Hello

__all__ = ["CapacityPolicy"]


class CapacityPolicy:
    """Maps a channel name to its capacity: first matching pattern, else the default.

    Results are cached per name, because a consumer sends to the same few channels
    again and again and a regex scan per send would be the costliest part of it.
    """

    __slots__ = ("_cache", "_patterns", "default", "uniform")

    #: Bound on cached names, so a sender to ever-new channel names stays small.
    CACHE_SIZE = 4096

    def __init__(self, default: int, patterns: tuple[tuple[str, int], ...] = ()) -> None:
        self.default = default
        self._patterns = [(re.compile(pattern), capacity) for pattern, capacity in patterns]
        self._cache: dict[str, int] = {}
        #: The one capacity of every channel when no pattern applies, else None: lets a
        #: shared backend check a group's members inside one script.
        self.uniform: int | None = None if self._patterns else default

    @classmethod
    def from_hello(cls, hello: Hello) -> CapacityPolicy:
        """Raise ``re.error`` if a pattern does not compile."""
        return cls(hello.capacity, hello.channel_capacity)

    def __call__(self, channel: str) -> int:
        capacity = self._cache.get(channel)
        if capacity is None:
            capacity = self._lookup(channel)
            if len(self._cache) >= self.CACHE_SIZE:
                self._cache.clear()
            self._cache[channel] = capacity
        return capacity

    def _lookup(self, channel: str) -> int:
        for pattern, capacity in self._patterns:
            if pattern.match(channel):
                return capacity
        return self.default
