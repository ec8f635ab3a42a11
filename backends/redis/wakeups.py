"""Which wake-up channels the Redis backend listens to, for whom, and since when idle.

A ``watch`` key is a normal channel (``work``), a process-specific channel pulled like
one (``specific.ab12!x``: its client's wake-up channel), or a client id (all of that
client's channels). A client id and a normal channel name can look alike, so a name
that could be a client id is listened to both ways; the other wake-ups are spurious
and harmless. A channel nobody watches lingers until ``idle`` hands it back, so a
puller coming back for the next message costs no new subscription.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .keys import Keys

__all__ = ["Subscriptions", "Watcher"]

_client_id_like = re.compile(r"^[A-Za-z0-9]{8,32}$")

#: (namespace, watch key, whether the key is a client id)
Watcher = tuple[str, str, bool]


@dataclass(slots=True)
class _Subscription:
    """One wake-up channel: its namespace and watchers (key, is_client) -> count."""

    ns: str
    watchers: dict[tuple[str, bool], int] = field(default_factory=dict)
    idle_since: float | None = None


class Subscriptions:
    """Wake-up channels and who watches each."""

    def __init__(self, keys: Keys) -> None:
        self._keys = keys
        self._subs: dict[bytes, _Subscription] = {}

    def channels(self) -> list[bytes]:
        return list(self._subs)

    def add(self, ns: str, key: str) -> list[bytes]:
        """Count a watcher; return the channels not listened to until now."""
        new: list[bytes] = []
        for wake, is_client in self._wakes_of(ns, key):
            sub = self._subs.get(wake)
            if sub is None:
                sub = self._subs[wake] = _Subscription(ns)
                new.append(wake)
            sub.watchers[(key, is_client)] = sub.watchers.get((key, is_client), 0) + 1
            sub.idle_since = None
        return new

    def remove(self, ns: str, key: str, now: float) -> None:
        """Uncount a watcher; a channel left without any is idle from ``now``."""
        for wake, is_client in self._wakes_of(ns, key):
            sub = self._subs.get(wake)
            if sub is None:
                continue
            count = sub.watchers.pop((key, is_client), 0) - 1
            if count > 0:
                sub.watchers[(key, is_client)] = count
            if not sub.watchers:
                sub.idle_since = now

    def owns(self, ns: str, client_id: str) -> bool:
        """True if ``client_id`` is watched as a client: its owner is attached here."""
        sub = self._subs.get(self._keys.client_wake(ns, client_id).encode())
        return sub is not None and (client_id, True) in sub.watchers

    def pop_idle(self, cutoff: float) -> list[bytes]:
        """Forget and return the channels idle since ``cutoff`` or earlier."""
        idle = [
            wake
            for wake, sub in self._subs.items()
            if sub.idle_since is not None and sub.idle_since <= cutoff
        ]
        for wake in idle:
            del self._subs[wake]
        return idle

    def namespace_of(self, wake: bytes) -> str | None:
        """The namespace of a channel we listen to (idle ones too), else None."""
        sub = self._subs.get(wake)
        return None if sub is None else sub.ns

    def watchers(self, wake: bytes | None = None) -> list[Watcher]:
        """Who watches ``wake`` (or any channel, for None)."""
        subs = self._subs.values() if wake is None else [self._subs.get(wake)]
        return [(s.ns, key, is_client) for s in subs if s for key, is_client in s.watchers]

    def _wakes_of(self, ns: str, key: str) -> list[tuple[bytes, bool]]:
        wakes = [(self._keys.wake(ns, key).encode(), False)]
        if "!" not in key and _client_id_like.match(key):
            wakes.append((self._keys.client_wake(ns, key).encode(), True))
        return wakes
