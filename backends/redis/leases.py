"""Leases on the messages taken for workers: none is lost between a take and its pull.

Theory of operation. A take for workers (a normal channel, not held) does not just pop
its messages: the same script keeps them under a lease of ``lease_s`` in the channel's
lease keys (``lease_scripts``), with a token of the take, so that nothing is lost if
the answer never arrives (Redis stalled or restarted, the daemon killed). Once the
daemon has handed them out, the lease is ended (``ACK_LEASES``, written in the
background ``ACK_DELAY_S`` later, all those due together, so that the DELIVER has left
the daemon first). A lease that lapses puts its messages back at the head of their
queue, in order: at the channel's next take (any daemon), or within ``reap_interval``
by the reaper of any daemon that watches the channel (one script per slot per pass,
over at most ``REAP_MOST_CHANNELS`` channels and ``REAP_MOST_TAKES`` takes each).

A message is handed out only within the first half of its lease (``in_time``): the
rest is left for its acknowledgement. A consumer's lease (``take_leased``) is renewed
every third of the lease while its DELIVER's connection lasts and it is not
acknowledged (``hold``, ``release``): a worker whose loop is busy, or whose ACK waits
behind others, may take longer than a lease to answer, and its message must not go to
another worker meanwhile (issue 15). Once the daemon dies or the connection closes,
renewal stops and the lease lapses within ``lease_s``: time for the layer's next
connection to acknowledge it again. One handed out just before a fault may so come
again (its lease lapsed before the acknowledgement was written): never lost, and the
receiving layer drops it by its message id. The token of a take is new each time, so
a lease that lapsed and was taken again is never ended under the old one.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from backends import BackendError
from backends.renewer import Renewer

from .commands import Commands
from .keys import KEEP_MARGIN_MS, Keys
from .lease_scripts import ACK_LEASES, REAP_LEASES, RENEW_LEASES

__all__ = ["ACK_DELAY_S", "REAP_MOST_CHANNELS", "REAP_MOST_TAKES", "Leases"]

log = logging.getLogger("channels_broker.backends.redis")

#: Seconds after a message was handed out before its lease is ended (``PostgreSQL``'s
#: acknowledgement waits as long): the daemon writes its DELIVER at the end of a pass.
ACK_DELAY_S = 0.02
#: Seconds between tries of acknowledgements Redis did not take (it was away).
ACK_RETRY_S = 0.2
#: Takes given back per channel by one script, and channels one reaper pass looks at.
REAP_MOST_TAKES = 64
REAP_MOST_CHANNELS = 256

#: A lease token as ``TAKE_LEASED`` makes them: ``<token>.<count>``.
_LEASE = re.compile(r"\d{1,19}\.\d{1,4}\Z")

#: An acknowledgement to write: when, until when it is worth trying (the lease may
#: still run), namespace, channel, lease (``<token>.<count>``).
_Ack = tuple[float, float, str, str, str]

#: The normal channels this daemon watches (its workers' pulls): (namespace, channel).
Watched = Callable[[], list[tuple[str, str]]]


class Leases:
    """Tokens and deadlines of takes for workers, their acknowledgements, the reaper."""

    def __init__(self, keys: Keys, commands: Commands, lease_s: float, watched: Watched) -> None:
        self._keys = keys
        self._commands = commands
        self.lease_s = lease_s
        #: Seconds between reaper passes: a lapsed lease waits at most this long more.
        self.reap_interval_s = min(1.0, lease_s / 2)
        self._watched = watched
        self._pending: list[_Ack] = []
        self._timer: asyncio.TimerHandle | None = None
        self._reaper: asyncio.Task[None] | None = None
        #: Consumers' leases delivered on live connections and not yet acknowledged,
        #: by (namespace, channel): renewed until then (``hold``).
        self._live: dict[tuple[str, str], set[str]] = {}
        self._renewer = Renewer("consumers' leases", lease_s, self.renew_once, log, logging.DEBUG)
        self._cursor = 0
        #: Messages whose lease lapsed, put back in their queue (by this daemon).
        self.given_back_total = 0

    # -- takes -----------------------------------------------------------------

    @staticmethod
    def new_token() -> str:
        return str(secrets.randbits(62) or 1)

    def take_args(self, ns: str, channel: str, limit: int, token: str) -> list[Any]:
        """ARGV of ``TAKE_LEASED``."""
        pubcmd = self._commands.require().publish_command
        lease_ms = int(self.lease_s * 1000)
        wake = self._keys.wake(ns, channel)
        return [limit, KEEP_MARGIN_MS, lease_ms, token, channel, wake, pubcmd, REAP_MOST_TAKES]

    def in_time(self, started: float) -> bool:
        """True if a take begun at ``started`` (loop time) may still hand out its
        messages: within half its lease, leaving the other half to acknowledge them."""
        return asyncio.get_running_loop().time() < started + self.lease_s / 2

    def handed(self, ns: str, channel: str, token: str, count: int) -> None:
        """A take's ``count`` messages were handed out: end its lease soon."""
        self._end_later(ns, channel, f"{token}.{count}", ACK_DELAY_S)

    def hold(self, ns: str, channel: str, lease: str) -> None:
        """Renew ``lease`` (a consumer's) until it is acknowledged or ``release``d."""
        self._live.setdefault((ns, channel), set()).add(lease)
        self._renewer.start()

    def release(self, ns: str, channel: str, leases: Sequence[str]) -> None:
        """Renew these leases no more (acknowledged, or their connection closed)."""
        live = self._live.get((ns, channel))
        if live is not None:
            live.difference_update(leases)
            if not live:
                del self._live[(ns, channel)]

    def acknowledge(self, ns: str, channel: str, leases: Sequence[str]) -> None:
        """The consumer received the messages of these leases: end them (with the
        others due). A token not of our making is ignored: the script trusts its form."""
        self.release(ns, channel, leases)
        for lease in leases:
            if _LEASE.match(lease):
                self._end_later(ns, channel, lease, 0.0)
            else:
                log.debug("ignored a malformed lease %r of %s", lease, channel)

    def _end_later(self, ns: str, channel: str, member: str, delay_s: float) -> None:
        due = asyncio.get_running_loop().time() + delay_s
        self._pending.append((due, due + self.lease_s, ns, channel, member))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(delay_s, self._ack_due)

    def gave_back(self, count: int) -> None:
        if count:
            self.given_back_total += count
            log.info("gave back %d messages whose lease lapsed", count)

    # -- acknowledgements ------------------------------------------------------

    def _ack_due(self) -> None:
        self._timer = None
        now = asyncio.get_running_loop().time()
        due = [item for item in self._pending if item[0] <= now]
        self._pending = [item for item in self._pending if item[0] > now]
        if due:
            self._commands.spawn(self._write_or_retry(due))
        if self._pending:
            delay = max(0.0, min(ack[0] for ack in self._pending) - now)
            self._timer = asyncio.get_running_loop().call_later(delay, self._ack_due)

    async def flush(self) -> None:
        """Write every acknowledgement now (the backend closes)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, []
        if pending and self._commands.topology is not None:
            try:
                await self._write_acks(pending)
            except BackendError as exc:
                log.warning("could not end %d leases (they lapse): %s", len(pending), exc)

    async def _write_or_retry(self, acks: list[_Ack]) -> None:
        """Write; if Redis did not answer, try again while the leases may still run:
        ending a lease twice is harmless, and one left to lapse is a redelivery."""
        try:
            await self._write_acks(acks)
        except BackendError as exc:
            now = asyncio.get_running_loop().time()
            again = [(now + ACK_RETRY_S, *ack[1:]) for ack in acks if ack[1] > now]
            log.info("ending %d leases failed (%s); %d tried again", len(acks), exc, len(again))
            if again:
                self._pending += again
                if self._timer is None:
                    self._timer = asyncio.get_running_loop().call_later(ACK_RETRY_S, self._ack_due)

    async def _write_acks(self, acks: list[_Ack]) -> None:
        """One ``ACK_LEASES`` per slot (one in all outside a Cluster)."""
        by_channel: dict[tuple[str, str], list[str]] = defaultdict(list)
        for _, _, ns, channel, member in acks:
            by_channel[(ns, channel)].append(member)
        is_cluster = self._commands.require().is_cluster
        by_slot: dict[int, list[tuple[str, str]]] = defaultdict(list)
        for ns, channel in by_channel:
            slot = Keys.slot(self._keys.wake(ns, channel)) if is_cluster else 0
            by_slot[slot].append((ns, channel))
        for channels in by_slot.values():
            keys: list[str] = []
            args: list[Any] = []
            for ns, channel in channels:
                keys += self._keys.leased_keys(ns, channel)[2:]
                args += [len(by_channel[(ns, channel)]), *by_channel[(ns, channel)]]
            lapsed = await self._commands.run(ACK_LEASES, keys, args)
            if lapsed:
                log.info("%d leases had lapsed before their acknowledgement", lapsed)

    # -- the reaper ------------------------------------------------------------

    def start(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())

    def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        self._renewer.stop()

    # -- renewal ---------------------------------------------------------------

    async def renew_once(self) -> None:
        """One ``RENEW_LEASES`` per slot for every lease held (one outside a Cluster)."""
        if not self._live or self._commands.topology is None:
            return
        is_cluster = self._commands.require().is_cluster
        by_slot: dict[int, list[tuple[tuple[str, str], list[str]]]] = defaultdict(list)
        for (ns, channel), live in self._live.items():
            slot = Keys.slot(self._keys.wake(ns, channel)) if is_cluster else 0
            by_slot[slot].append(((ns, channel), list(live)))
        for channels in by_slot.values():
            keys: list[str] = []
            args: list[Any] = [int(self.lease_s * 1000), KEEP_MARGIN_MS]
            for (ns, channel), leases in channels:
                keys += self._keys.leased_keys(ns, channel)[2:]
                args += [len(leases), *leases]
            await self._commands.run(RENEW_LEASES, keys, args)

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.reap_interval_s)
            try:
                await self.reap_once()
            except BackendError as exc:
                log.debug("lease reaper pass failed: %s", exc)

    async def reap_once(self) -> int:
        """Give back the lapsed leases of (up to ``REAP_MOST_CHANNELS``) watched normal
        channels, the next ones each pass; return how many messages went back."""
        watched = self._watched()
        if not watched:
            return 0
        start = self._cursor % len(watched)
        channels = (watched[start:] + watched[:start])[:REAP_MOST_CHANNELS]
        self._cursor = start + len(channels)
        topology = self._commands.require()
        by_slot: dict[int, list[tuple[str, str]]] = defaultdict(list)
        for ns, channel in channels:
            by_slot[Keys.slot(self._keys.wake(ns, channel)) if topology.is_cluster else 0].append(
                (ns, channel)
            )
        back = 0
        for batch in by_slot.values():
            keys: list[str] = []
            args: list[Any] = [KEEP_MARGIN_MS, topology.publish_command, REAP_MOST_TAKES]
            for ns, channel in batch:
                keys += self._keys.leased_keys(ns, channel)
                args += [channel, self._keys.wake(ns, channel)]
            back += int(await self._commands.run(REAP_LEASES, keys, args))
        self.gave_back(back)
        return back
