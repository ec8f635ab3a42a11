"""Where the Redis backend keeps things: key names, hash tags and wake-up channels.

Every key is ``<prefix>:{<tag>}:<kind>...``. The hash tag decides the Cluster slot:

* ``{ns!CLIENT}`` for every process-specific channel of one client (``...CLIENT!x``),
  with that client's index set and wake-up channel: one slot per client, so a
  group_send to fifty consumers of one process is one script on one node;
* ``{ns:CHANNEL}`` for a normal channel and its wake-up channel;
* ``{ns#GROUP}`` for a group.

``!``, ``:`` and ``#`` cannot occur in a namespace (a group name), so tags never collide.
Kinds: ``q:<channel>`` the queue (a LIST of 13-digit deadline-in-ms + payload),
``h:<channel>`` the count of taken-and-held messages, ``r:<channel>`` the send room
reserved on it, ``s`` and ``k`` a client's record of numbered sends (``room_scripts``),
``l:<channel>`` and ``d:<channel>`` a normal channel's leased messages and their
leases (``lease_scripts``),
``i`` a client's SET of channels with messages, ``w`` the wake-up (pub/sub) channel,
``g`` a group's ZSET of member -> deadline in ms, ``gv`` its version (changed when its
live members change), ``f`` and ``fd`` a client's fan-out
records (payload and member list) and their leases (``edge_scripts``). ``scripts``
builds the same names in Lua. Queue, index and held keys outlive their newest deadline
by ``KEEP_MARGIN_MS``, so abandoned data vanishes by itself.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from redis.crc import key_slot

from protocol import client_id_of

__all__ = ["KEEP_MARGIN_MS", "Keys"]

#: Queue, index and held-count keys outlive their newest deadline by this much (ms):
#: reads check deadlines themselves; key expiry only frees abandoned data.
KEEP_MARGIN_MS = 5000


class Keys:
    """Key and channel names under one prefix."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    @staticmethod
    def tag(ns: str, channel: str) -> str:
        """The hash tag of a channel: its client's for a process-specific one."""
        if "!" in channel:
            return f"{ns}!{client_id_of(channel)}"
        return f"{ns}:{channel}"

    def base(self, tag: str) -> str:
        return f"{self.prefix}:{{{tag}}}:"

    def channel_keys(self, ns: str, channel: str) -> list[str]:
        """Queue, held count and (process-specific only) the client index, as a script's KEYS."""
        base = self.base(self.tag(ns, channel))
        keys = [f"{base}q:{channel}", f"{base}h:{channel}"]
        if "!" in channel:
            keys.append(f"{base}i")
        return keys

    def room(self, ns: str, channel: str) -> str:
        """Send room reserved on ``channel`` (``room_scripts``)."""
        return f"{self.base(self.tag(ns, channel))}r:{channel}"

    def seqs(self, ns: str, client_id: str) -> list[str]:
        """A client's record of numbered sends: highest seq, and which were stored."""
        base = self.base(f"{ns}!{client_id}")
        return [f"{base}s", f"{base}k"]

    def leased_keys(self, ns: str, channel: str) -> list[str]:
        """A normal channel's queue, held count, lease hash and lease zset (``leases``)."""
        base = self.base(self.tag(ns, channel))
        return [
            f"{base}q:{channel}",
            f"{base}h:{channel}",
            f"{base}l:{channel}",
            f"{base}d:{channel}",
        ]

    def held(self, ns: str, channel: str) -> str:
        return f"{self.base(self.tag(ns, channel))}h:{channel}"

    def index(self, ns: str, client_id: str) -> str:
        return f"{self.base(f'{ns}!{client_id}')}i"

    def wake(self, ns: str, channel: str) -> str:
        """The wake-up channel published to when ``channel`` gets a message."""
        return f"{self.base(self.tag(ns, channel))}w"

    def client_wake(self, ns: str, client_id: str) -> str:
        """The wake-up channel of all process-specific channels of one client."""
        return f"{self.base(f'{ns}!{client_id}')}w"

    def group(self, ns: str, group: str) -> str:
        return f"{self.base(f'{ns}#{group}')}g"

    def group_version(self, ns: str, group: str) -> str:
        """Changed whenever the group's live members change (``edge``)."""
        return f"{self.base(f'{ns}#{group}')}gv"

    def namespace_pattern(self, ns: str) -> str:
        """A SCAN MATCH glob for every key of a namespace (prefix and ns have no glob chars)."""
        return f"{self.prefix}:{{{ns}[:#!]*"

    @staticmethod
    def slot(key: str) -> int:
        """The Cluster slot of a key (by its hash tag)."""
        return int(key_slot(key.encode()))

    def slot_batches(
        self, ns: str, channels: Sequence[str], *, is_cluster: bool, most: int | None = None
    ) -> list[list[int]]:
        """Indexes of ``channels`` grouped by Cluster slot (one group outside Cluster),
        in order, each group cut into batches of at most ``most``: each batch can be one
        script call."""
        if not channels:
            return []
        if not is_cluster:
            groups = [list(range(len(channels)))]
        else:
            by_slot: dict[int, list[int]] = defaultdict(list)
            for i, channel in enumerate(channels):
                by_slot[Keys.slot(self.wake(ns, channel))].append(i)
            groups = list(by_slot.values())
        if most is None:
            return groups
        return [group[at : at + most] for group in groups for at in range(0, len(group), most)]
