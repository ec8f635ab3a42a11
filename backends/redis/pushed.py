"""Leases on the messages pushed to a client's own channels, while its layer holds them.

Theory of operation. A take for a push (and a grab of the PUSH script) leaves each
message it pops in Redis under a lease (``pushed_scripts``), named to the daemon by
``<token>.<i>.<n>`` in ``Taken.lease``: the i-th of a take of n. The daemon keeps the
pushed messages until the layer's ACK counts cover them (``broker.daemon.held``), and
then ends their leases here: ``end`` queues them, and one ``END_PUSHED`` per slot goes
with the loop pass's releases (``Commands``), so an ACK costs no round trip of its own.
While they are held, this daemon renews the leases of its takes (``live``): one
``RENEW_PUSHED`` per slot every third of the lease. When the daemon dies, nothing
renews them: they lapse, and their messages go back to the head of their channel, in
order, with their held count; the client's next connection finds them
(``own_waiting``: at once if lapsed, else again when the soonest lapses), and its
layer drops a copy of one it handed out already (``HandedIds``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from backends import Taken
from backends.renewer import Renewer

from .commands import Commands
from .keys import KEEP_MARGIN_MS, Keys
from .leases import REAP_MOST_TAKES
from .pushed_scripts import OWN_WAITING, RENEW_PUSHED

__all__ = ["PushedLeases"]

log = logging.getLogger("channels_broker.backends.redis")

#: Members a script stores lapsed or given-back fan-outs for at most (``edge_scripts``):
#: a few milliseconds of Redis, as a group send's slices.
EXPAND_MOST_MEMBERS = 256
#: Channels whose leases one RENEW_PUSHED renews at most.
RENEW_MOST_CHANNELS = 512
#: A client's channels are looked at again this long after their soonest lease lapses.
RECHECK_SLACK_S = 0.05

#: (namespace, channel)
ChannelKey = tuple[str, str]


class PushedLeases:
    """The leases of this daemon's pushes: their names, ends, renewal and lapses."""

    def __init__(
        self, keys: Keys, commands: Commands, lease_s: float, wake: Callable[[str, str], None]
    ) -> None:
        self._keys = keys
        self._commands = commands
        self.lease_ms = int(lease_s * 1000)
        self._wake = wake
        #: The takes this daemon holds leased, by channel: their members ``<token>.<n>``.
        self._live: dict[ChannelKey, set[str]] = {}
        self._renewer = Renewer("the leases of pushed messages", lease_s, self.renew_once, log)
        self._rechecks: dict[tuple[str, str], asyncio.TimerHandle] = {}

    # -- takes -----------------------------------------------------------------

    @staticmethod
    def new_token() -> str:
        return str(secrets.randbits(62) or 1)

    def grab_arg(self, token: str, number: int) -> str:
        """PUSH's grab argument for its target ``number``: lease it to a token of its own."""
        return f"{self.lease_ms}:{token}-{number}"

    def grabbed(self, ns: str, channel: str, token: str, number: int) -> str:
        """The lease of a message grabbed for target ``number``: now held by us."""
        self._live.setdefault((ns, channel), set()).add(f"{token}-{number}.1")
        return f"{token}-{number}.1.1"

    def leased(self, ns: str, channel: str, token: str, items: list[Taken]) -> list[Taken]:
        """A take's ``items``, each with its lease, now held by us."""
        n = len(items)
        self._live.setdefault((ns, channel), set()).add(f"{token}.{n}")
        return [
            Taken(item.payload, item.ttl_s, f"{token}.{i}.{n}", item.deadline)
            for i, item in enumerate(items, 1)
        ]

    def end(self, ns: str, channel: str, leases: Sequence[str]) -> None:
        """The messages of these leases were acknowledged (or dropped): end the leases,
        with this pass's releases."""
        self._commands.end_leases(self._keys.leased_keys(ns, channel)[1:], leases)
        live = self._live.get((ns, channel))
        if live is None:
            return
        for lease in leases:
            token, i, n = lease.split(".")
            if i == n:
                live.discard(f"{token}.{n}")
        if not live:
            del self._live[(ns, channel)]

    def forget(self, ns: str, channel: str, leases: Sequence[str]) -> None:
        """These leases were given back: nothing of them to renew."""
        live = self._live.get((ns, channel))
        if live is not None:
            live.difference_update(lease.rsplit(".", 1)[0] for lease in leases)
            if not live:
                del self._live[(ns, channel)]

    def drop_namespace(self, ns: str) -> None:
        for key in [key for key in self._live if key[0] == ns]:
            del self._live[key]

    # -- renewal ---------------------------------------------------------------

    def start(self) -> None:
        self._renewer.start()

    def stop(self) -> None:
        self._renewer.stop()
        for timer in self._rechecks.values():
            timer.cancel()
        self._rechecks.clear()

    async def renew_once(self) -> None:
        """Renew every lease this daemon holds: one script per slot (and per
        ``RENEW_MOST_CHANNELS``)."""
        if not self._live:
            return
        is_cluster = self._commands.require().is_cluster
        by_slot: dict[int, list[ChannelKey]] = defaultdict(list)
        for ns, channel in self._live:
            by_slot[Keys.slot(self._keys.wake(ns, channel)) if is_cluster else 0].append(
                (ns, channel)
            )
        for channels in by_slot.values():
            for at in range(0, len(channels), RENEW_MOST_CHANNELS):
                keys: list[str] = []
                args: list[Any] = [self.lease_ms, KEEP_MARGIN_MS]
                for ns, channel in channels[at : at + RENEW_MOST_CHANNELS]:
                    members = self._live.get((ns, channel), ())
                    keys += self._keys.leased_keys(ns, channel)[2:]
                    args += [len(members), *members]
                await self._commands.run(RENEW_PUSHED, keys, args)

    # -- a client's channels -----------------------------------------------------

    async def own_waiting(self, ns: str, client_id: str, until: float = 0.0) -> list[str]:
        """The client's channels with messages, after giving back lapsed leases; if
        some are leased still (a daemon killed with them, perhaps), look again when
        the soonest lapses, while the client is attached here (``forget_client``), for
        a lease and a second: a dead daemon's leases have all lapsed by then, and later
        ones are ours (we renew them) or a live daemon's (it gives them back itself)."""
        loop = asyncio.get_running_loop()
        until = until or loop.time() + self.lease_ms / 1000 + 1.0
        base = self._keys.base(f"{ns}!{client_id}")
        pubcmd = self._commands.require().publish_command
        args = [base, pubcmd, KEEP_MARGIN_MS, REAP_MOST_TAKES, EXPAND_MOST_MEMBERS]
        index = [self._keys.index(ns, client_id)]
        reply = await self._commands.run(OWN_WAITING, index, args)
        while int(reply[0]) < 0:  # lapsed fan-outs left to store: a slice a call
            reply = await self._commands.run(OWN_WAITING, index, args)
        soonest_ms = int(reply[0])
        key = (ns, client_id)
        timer = self._rechecks.pop(key, None)
        if timer is not None:
            timer.cancel()
        delay = soonest_ms / 1000 + RECHECK_SLACK_S
        if soonest_ms and loop.time() + delay <= until:
            self._rechecks[key] = loop.call_later(delay, self._recheck, ns, client_id, until)
        return [name.decode() for name in reply[1:]]

    def forget_client(self, ns: str, client_id: str) -> None:
        """The client is no longer attached here: stop looking at its channels."""
        timer = self._rechecks.pop((ns, client_id), None)
        if timer is not None:
            timer.cancel()

    def _recheck(self, ns: str, client_id: str, until: float) -> None:
        self._rechecks.pop((ns, client_id), None)
        self._commands.spawn(self._wake_waiting(ns, client_id, until))

    async def _wake_waiting(self, ns: str, client_id: str, until: float) -> None:
        for channel in await self.own_waiting(ns, client_id, until):
            self._wake(ns, channel)
