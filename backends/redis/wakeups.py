"""Wake-ups across daemons: which wake-up channels we listen to, for whom, and what a
message on one of them does.

Theory of operation. A script that queues a message also publishes on the wake-up
channel of the receiving client (all its process-specific channels) or of the normal
channel (see ``keys`` and ``scripts``). ``watch`` subscribes to it; a message another
daemon published becomes ``on_ready(ns, channel)`` here. Our own sends wake our router
at once (``sends``), and our echo is ignored: each message names its origin.

A ``watch`` key is a normal channel (``work``), a process-specific channel pulled like
one (``specific.ab12!x``: its client's wake-up channel), or a client id (all of that
client's channels). A client id and a normal channel name can look alike, so a name
that could be a client id is listened to both ways; the other wake-ups are spurious
and harmless. A channel nobody watches lingers ``LINGER_S`` before it is unsubscribed,
so a puller coming back for the next message (pull churn) costs no SUBSCRIBE.

Three gaps are closed: (1) a message sent before a subscription became active is
found by looking once more when Redis confirms the subscription (``on_subscribed``);
(2) after a reconnect every watched key is looked at again (``rewake_all``); (3) a
wake-up that meets a take of that channel in flight is handled by ``takes``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol import client_id_of

from .commands import Commands
from .keys import Keys
from .takes import Takes

__all__ = ["LINGER_S", "Subscriptions", "Watcher", "Wakeups"]

#: Seconds a wake-up subscription outlives its last watcher: pullers come and go with
#: every message, and re-subscribing each time would cost a round trip and a rescan.
LINGER_S = 30.0

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

    def watched_channels(self) -> list[tuple[str, str]]:
        """The normal channels watched (for their lapsed leases): (namespace, channel)."""
        return [(ns, key) for ns, key, is_client in self.watchers() if not is_client]

    def _wakes_of(self, ns: str, key: str) -> list[tuple[bytes, bool]]:
        wakes = [(self._keys.wake(ns, key).encode(), False)]
        if "!" not in key and _client_id_like.match(key):
            wakes.append((self._keys.client_wake(ns, key).encode(), True))
        return wakes


class Wakeups:
    """Watches and what comes in on the wake-up channels, turned into wake-ups of takes."""

    def __init__(
        self, subs: Subscriptions, commands: Commands, takes: Takes, *, origin: bytes
    ) -> None:
        self._subs = subs
        self._commands = commands
        self._takes = takes
        self._origin = origin
        self._sweeper: asyncio.TimerHandle | None = None
        #: Called with (ns, client id) when records may wait in the client's fan-out
        #: list (``remote``): the wake-up ``*``, or a look after a gap.
        self.on_fanouts: Callable[[str, str], None] = lambda ns, client: None

    def start(self) -> None:
        """Listen to every watched channel (the topology is new) and sweep idle ones."""
        self._sweeper = asyncio.get_running_loop().call_later(LINGER_S, self._sweep)
        topology = self._commands.require()
        if self._subs.channels():
            topology.subscribe(self._subs.channels())

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def watch(self, ns: str, key: str) -> None:
        """Subscribe to the wake-ups of a normal channel or of a client id (batched)."""
        new = self._subs.add(ns, key)
        if new and self._commands.topology is not None:
            self._commands.topology.subscribe(new)

    def unwatch(self, ns: str, key: str) -> None:
        """Drop a watch; the subscription lingers ``LINGER_S`` in case it comes back."""
        self._subs.remove(ns, key, asyncio.get_running_loop().time())
        if not self._subs.owns(ns, key):
            self._takes.return_client(ns, key)

    def on_message(self, wake: bytes, data: bytes) -> None:
        """A wake-up published by some daemon: ``<origin> <channel> [<channel>...]``."""
        origin, _, names = data.partition(b" ")
        if origin == self._origin:
            return  # our own send: the router was woken already
        ns = self._subs.namespace_of(wake)
        if ns is not None and names == b"*":  # a fan-out appended to a client's list
            for ns, key, is_client in self._subs.watchers(wake):
                if is_client:
                    self.on_fanouts(ns, key)
        elif ns is not None:
            for name in names.split(b" "):
                self._takes.wake(ns, name.decode())

    def on_subscribed(self, wake: bytes) -> None:
        """Redis confirmed a subscription: look for what came before it."""
        for ns, key, is_client in self._subs.watchers(wake):
            self._rewake(ns, key, is_client)

    def rewake_all(self) -> None:
        """A command connection is back: wake every watched key, in case we missed one."""
        for ns, key, is_client in self._subs.watchers():
            self._rewake(ns, key, is_client)

    def rewake_client(self, ns: str, client_id: str) -> None:
        """Look at a client's channels (lapsed leases given back) and wake those with
        messages."""
        self._commands.spawn(self._wake_client(ns, client_id))

    def _rewake(self, ns: str, key: str, is_client: bool) -> None:
        if is_client:
            self._commands.spawn(self._wake_client(ns, key))
            self.on_fanouts(ns, key)
        else:
            self._takes.wake(ns, key)

    async def _wake_client(self, ns: str, client_id: str) -> None:
        for channel in await self._takes.channels_with_messages(ns, client_id):
            if client_id_of(channel) == client_id:
                self._takes.wake(ns, channel)

    def _sweep(self) -> None:
        """Unsubscribe wake-up channels idle for ``LINGER_S``; come back later."""
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(LINGER_S, self._sweep)
        idle = self._subs.pop_idle(loop.time() - LINGER_S)
        if idle and self._commands.topology is not None:
            self._commands.topology.unsubscribe(idle)
