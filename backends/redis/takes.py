"""Takes from Redis channels: the stash first, then one TAKE script per Cluster slot.

Theory of operation. A take of channels that share a slot (all channels of one client
do) is one TAKE script: it pops up to ``limit`` unexpired entries per channel, counts
them as held if asked, and reports how many expired ones it dropped. An entry is the
deadline in ms (``DEADLINE_DIGITS`` digits, Redis server time) followed by the payload;
small identical entries (one group message taken by several members) come back as one
shared ``bytes`` object, so the daemon can push them in one frame.

The stash (see ``stash``) holds messages a send grabbed back for an owner attached
here; it is older than anything in Redis for its channel, so a take serves it first
and asks Redis only for the rest. A channel woken by something other than a grab since
its last full take (``maybe_more``) may hold messages in Redis behind the stash.
Grabbed messages nobody took within ``HOLD_S``, or whose owner left, go back to the
head of their Redis queue (UNGRAB).

Wake-ups and takes in flight. A wake-up that arrives while a take of that channel is
in flight may find the taker out of the router's line, so ``wake`` notes it, and an
empty take after such a wake-up wakes the channel again on the next loop pass.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from backends import BackendError, Taken, WakeupCallback

from .commands import Commands
from .keys import KEEP_MARGIN_MS, Keys
from .lease_scripts import GIVE_BACK, TAKE_LEASED
from .leases import REAP_MOST_TAKES, Leases
from .pushed import PushedLeases
from .pushed_scripts import TAKE_HELD
from .scripts import TAKE
from .stash import HOLD_S, Stash

__all__ = ["DEADLINE_DIGITS", "Takes"]

log = logging.getLogger("channels_broker.backends.redis")

#: Deadline digits at the head of each queue entry (see scripts).
DEADLINE_DIGITS = 13
#: Payloads up to this size are shared between takes of identical entries (a group
#: message taken by several members), so the daemon can push them in one frame.
SHARE_MAX_BYTES = 65536
SHARE_CACHE_SIZE = 1024

#: (namespace, channel)
ChannelKey = tuple[str, str]


class Takes:
    """Takes, the stash they serve first, and the takes in flight that wake-ups meet."""

    def __init__(
        self, keys: Keys, commands: Commands, notify: WakeupCallback, leases: Leases
    ) -> None:
        self._keys = keys
        self.leases = leases
        self._commands = commands
        self._notify = notify
        self._stash = Stash()
        #: The leases of what we push (and grab for a push): ``pushed``.
        self.pushed = PushedLeases(keys, commands, leases.lease_s, self.wake)
        self._stash_timer: asyncio.TimerHandle | None = None
        self._inflight: dict[ChannelKey, int] = {}
        self._woken_inflight: set[ChannelKey] = set()
        #: Channels woken by something other than a grab since their last full take:
        #: Redis may hold messages for them behind the stash.
        self._maybe_more: set[ChannelKey] = set()
        self._shared: dict[bytes, bytes] = {}
        self.expired_total = 0

    # -- takes -----------------------------------------------------------------

    async def take_many(
        self, ns: str, channels: Sequence[str], limit: int, hold: bool
    ) -> dict[str, list[Taken]]:
        """One take per Cluster slot, all at once; the channels of slots that failed
        are left out, and the first error raised if no slot answered."""
        if not channels:
            return {}
        is_cluster = self._commands.require().is_cluster
        batches = self._keys.slot_batches(ns, channels, is_cluster=is_cluster)
        if len(batches) == 1:
            return await self.take(ns, list(channels), limit, hold)
        results = await asyncio.gather(
            *(self.take(ns, [channels[i] for i in b], limit, hold) for b in batches),
            return_exceptions=True,
        )
        taken: dict[str, list[Taken]] = {}
        for result in results:
            if isinstance(result, BaseException):
                if not isinstance(result, BackendError):
                    raise result
                continue
            taken.update(result)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors and not taken:
            raise errors[0]
        return taken

    async def take(
        self, ns: str, channels: list[str], limit: int, hold: bool
    ) -> dict[str, list[Taken]]:
        """Take from channels of one slot: the stash first, then one TAKE script; a
        normal channel's messages for workers (not held) under a lease (``leases``)."""
        if not hold and any("!" not in channel for channel in channels):
            leased: dict[str, list[Taken]] = {}
            for channel in channels:
                if "!" not in channel:
                    leased[channel] = await self._take_leased(ns, channel, limit)
            others = [channel for channel in channels if "!" in channel]
            return leased | (await self.take(ns, others, limit, hold) if others else {})
        if not self._stash:
            return await self._take_from_redis(ns, channels, limit, hold)
        now = asyncio.get_running_loop().time()
        taken: dict[str, list[Taken]] = {}
        rest: list[str] = []
        for channel in channels:
            taken[channel] = self._take_stashed(ns, channel, limit, hold, now)
            count = len(taken[channel])
            if not count:
                rest.append(channel)
            elif count < limit and (
                (ns, channel) in self._maybe_more or (hold and self.pushed.has_lost(ns, channel))
            ):
                more = await self._take_from_redis(ns, [channel], limit - count, hold)
                taken[channel] += more[channel]
        if rest:
            taken.update(await self._take_from_redis(ns, rest, limit, hold))
        return taken

    def _take_stashed(
        self, ns: str, channel: str, limit: int, hold: bool, now: float
    ) -> list[Taken]:
        items, expired = self._stash.take(ns, channel, limit, now)
        # Stashed messages are leased and held in Redis: end the leases of expired ones,
        # and of all for a pull.
        if expired or (items and not hold):
            ended = expired + ([] if hold else items)
            self.pushed.end(ns, channel, [item[3] for item in ended])
        self.expired_total += len(expired)
        mono = time.monotonic()  # Taken's clock (the stash's is the loop's)
        return [
            Taken(e[DEADLINE_DIGITS:], d - now, lease if hold else "", mono + d - now)
            for e, d, _, lease in items
        ]

    async def _take_from_redis(
        self, ns: str, channels: list[str], limit: int, hold: bool
    ) -> dict[str, list[Taken]]:
        """One TAKE script for channels of one slot; for a push (``hold``) TAKE_HELD,
        which leases what it takes of process-specific channels (``pushed``), first
        giving back what our takes of them whose answer was lost leased."""
        keys: list[str] = []
        for channel in channels:
            keys += self._keys.channel_keys(ns, channel)
            self._inflight[(ns, channel)] = self._inflight.get((ns, channel), 0) + 1
        pushed = self.pushed
        token = pushed.new_token()
        lost = {channel: pushed.lost_of(ns, channel) for channel in channels if hold}
        try:
            if hold:
                pubcmd = self._commands.require().publish_command
                args = [limit, KEEP_MARGIN_MS, pushed.lease_ms, token, pubcmd, REAP_MOST_TAKES]
                for channel in channels:
                    args += [channel, len(lost[channel]), *lost[channel]]
                reply = await self._commands.run(TAKE_HELD, keys, args)
            else:
                args = [limit, 0, KEEP_MARGIN_MS, *channels]
                reply = await self._commands.run(TAKE, keys, args)
        except BaseException:
            # It may have run: what it leased is given back by the channel's next take.
            for channel in lost:
                if "!" in channel:
                    pushed.lost(ns, channel, token)
            raise
        finally:
            woken = [self._end_take(ns, channel) for channel in channels]
        if not hold:
            return self._read_take(ns, channels, woken, limit, reply)
        self.leases.gave_back(int(reply[-1]))
        taken = self._read_take(ns, channels, woken, limit, reply[:-1])
        for channel, items in taken.items():
            pushed.found(ns, channel, lost[channel])
            if items and "!" in channel:
                taken[channel] = pushed.leased(ns, channel, token, items)
        return taken

    async def _take_leased(
        self, ns: str, channel: str, limit: int, by_consumer: bool = False
    ) -> list[Taken]:
        """One TAKE_LEASED: the channel's lapsed leases given back, then up to ``limit``
        messages leased, ended once handed out (``Leases.handed``), or, ``by_consumer``,
        once the consumer acknowledges them (each ``Taken`` carries its lease)."""
        leases = self.leases
        token = leases.new_token()
        args = leases.take_args(ns, channel, limit, token)
        key = (ns, channel)
        self._inflight[key] = self._inflight.get(key, 0) + 1
        started = asyncio.get_running_loop().time()
        try:
            reply = await self._commands.run(TAKE_LEASED, self._keys.leased_keys(ns, channel), args)
        finally:
            woken = self._end_take(ns, channel)
        leases.gave_back(int(reply[-1]))
        items = self._read_take(ns, [channel], [woken], limit, reply[:-1])[channel]
        if items and not leases.in_time(started):
            # Its answer came late (Redis or this loop stalled): the lease may lapse
            # before an acknowledgement, so it is left to lapse, and given back then.
            log.warning(
                "left %d messages of %s to their lease: answered too late", len(items), channel
            )
            return []
        if by_consumer:
            lease = f"{token}.{len(items)}"
            if items:
                leases.hold(ns, channel, lease)
            return [item._replace(lease=lease) for item in items]
        if items:
            leases.handed(ns, channel, token, len(items))
        return items

    async def take_leased(self, ns: str, channel: str, limit: int) -> list[Taken]:
        """A normal channel's messages for a consumer that acknowledges them itself."""
        return await self._take_leased(ns, channel, limit, by_consumer=True)

    def _read_take(
        self, ns: str, channels: list[str], woken: list[bool], limit: int, reply: Any
    ) -> dict[str, list[Taken]]:
        """TAKE's reply: server time, expired count, then per channel a count and entries."""
        now_ms = int(reply[0])
        mono = time.monotonic()
        self.expired_total += int(reply[1])
        taken: dict[str, list[Taken]] = {}
        at = 2
        for channel, was_woken in zip(channels, woken, strict=True):
            count = int(reply[at])
            entries = reply[at + 1 : at + 1 + count]
            items = [self._taken(entry, now_ms, mono) for entry in entries]
            at += 1 + count
            taken[channel] = items
            if count < limit:
                self._maybe_more.discard((ns, channel))
            if not items and was_woken:
                # A wake-up came while this take was in flight, perhaps for a message
                # it missed, when the taker was out of the router's line: wake again.
                asyncio.get_running_loop().call_soon(self._notify, ns, channel)
        return taken

    def _end_take(self, ns: str, channel: str) -> bool:
        """End a take in flight; True if the channel was woken meanwhile."""
        key = (ns, channel)
        left = self._inflight.pop(key) - 1
        woken = key in self._woken_inflight
        if left:
            self._inflight[key] = left
        else:
            self._woken_inflight.discard(key)
        return woken

    def _taken(self, entry: bytes, now_ms: int, mono: float) -> Taken:
        deadline_ms = int(entry[:DEADLINE_DIGITS])
        ttl_s = (deadline_ms - now_ms) / 1000
        if len(entry) > SHARE_MAX_BYTES:
            return Taken(entry[DEADLINE_DIGITS:], ttl_s, "", mono + ttl_s)
        # Identical entries (a group message) share one payload object: one PUSH frame.
        payload = self._shared.get(entry)
        if payload is None:
            if len(self._shared) >= SHARE_CACHE_SIZE:
                self._shared.clear()
            payload = self._shared[entry] = entry[DEADLINE_DIGITS:]
        return Taken(payload, ttl_s, "", mono + ttl_s)

    async def channels_with_messages(self, ns: str, client_id: str) -> list[str]:
        """The client's channels with unexpired messages, in Redis or in the stash."""
        names = set(await self.pushed.own_waiting(ns, client_id))
        return sorted(names.union(self._stash.channels_of(ns, client_id)))

    # -- wake-ups --------------------------------------------------------------

    def wake(self, ns: str, channel: str, *, more: bool = True) -> None:
        """Tell the router; ``more``: Redis may hold messages for it (not just the stash)."""
        key = (ns, channel)
        if key in self._inflight:
            self._woken_inflight.add(key)
        if more and self._stash.has(ns, channel):
            self._maybe_more.add(key)
        self._notify(ns, channel)

    # -- the stash -------------------------------------------------------------

    def keep_grabbed(
        self, ns: str, channel: str, entry: bytes, deadline: float, now: float, lease: str
    ) -> None:
        """Stash an entry a send grabbed (and leased) for its owner here, and wake the
        channel."""
        self._stash.add(ns, channel, entry, deadline, now, lease)
        self._arm_stash_timer()
        self.wake(ns, channel, more=False)

    async def give_back(self, ns: str, channel: str, items: Sequence[Taken], held: int) -> None:
        """Pushed messages not acknowledged, back at the head of their queue in one
        GIVE_BACK, before what the stash holds of the channel (grabbed after them)."""
        stashed = self._stash.pop_channel(ns, channel)  # grabbed after the pushes
        mono = time.monotonic()
        tagged: list[str | bytes] = []
        for item in items:
            if item.lease:  # Redis has the entry: it goes back unless its lease lapsed
                tagged.append("L" + item.lease)
                continue
            ttl_ms = int(((item.deadline or mono + item.ttl_s) - mono) * 1000)
            if ttl_ms > 0:  # expired ones are dropped
                tagged.append(b"E%013d" % ttl_ms + item.payload)
            else:
                self.expired_total += 1
        tagged += ["L" + lease for lease in stashed]
        leases = [item.lease for item in items if item.lease] + stashed
        # Leased ones are uncounted by the script, as their leases end.
        uncount = max(0, held - (len(leases) - len(stashed)))
        if not tagged:
            self._commands.release(self._keys.held(ns, channel), uncount)
            return
        self.pushed.forget(ns, channel, leases)
        await self._give_back(ns, channel, uncount, tagged)

    async def _give_back(
        self, ns: str, channel: str, uncount: int, tagged: Sequence[str | bytes]
    ) -> None:
        """One GIVE_BACK (``lease_scripts``), then wake the channel here."""
        self._maybe_more.discard((ns, channel))
        pubcmd = self._commands.require().publish_command
        args = [channel, self._keys.wake(ns, channel), pubcmd, KEEP_MARGIN_MS, uncount]
        await self._commands.run(GIVE_BACK, self._keys.channel_keys(ns, channel), [*args, *tagged])
        self.wake(ns, channel)

    def return_client(self, ns: str, client_id: str) -> None:
        """The client is no longer attached here: its grabbed messages go back to Redis."""
        self.pushed.forget_client(ns, client_id)
        if self._stash:
            self._return(self._stash.pop_client(ns, client_id))

    def return_all(self) -> None:
        """Every grabbed message goes back to Redis (the backend is closing)."""
        self._return(self._stash.pop_all())

    def drop_namespace(self, ns: str) -> None:
        """Forget the grabbed messages of a namespace being flushed."""
        self._stash.pop_namespace(ns)
        self.pushed.drop_namespace(ns)

    def stop(self) -> None:
        """Stop looking for stale grabbed messages, and renewing leases."""
        self.pushed.stop()
        if self._stash_timer is not None:
            self._stash_timer.cancel()
            self._stash_timer = None

    def _stale_stash(self) -> None:
        """Return what nobody took within ``HOLD_S``; look again while any is left."""
        self._stash_timer = None
        cutoff = asyncio.get_running_loop().time() - HOLD_S
        self._return(self._stash.pop_stale(cutoff))
        if self._stash:
            self._arm_stash_timer()

    def _arm_stash_timer(self) -> None:
        if self._stash_timer is None:
            self._stash_timer = asyncio.get_running_loop().call_later(HOLD_S, self._stale_stash)

    def _return(self, grabbed: dict[ChannelKey, list[str]]) -> None:
        """Put grabbed entries back at the head of their Redis queue, by their leases
        (see stash)."""
        for (ns, channel), leases in grabbed.items():
            self.pushed.forget(ns, channel, leases)
            tagged = ["L" + lease for lease in leases]
            self._commands.spawn(self._give_back(ns, channel, 0, tagged))
