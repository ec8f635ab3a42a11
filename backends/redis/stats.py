"""Gauges of the Redis backend, and its longest queues, read by a SCAN of its keys
(never KEYS), now and then or when ``channels-broker status`` asks."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence

from backends import BackendStats

from .pipe import Pipe

__all__ = ["STATS_MAX_KEYS", "read_stats", "read_top_channels"]

#: A reading stops after this many keys: gauges are for dashboards, and a sample of a
#: huge keyspace is better than a SCAN that keeps Redis busy for seconds.
STATS_MAX_KEYS = 100_000


async def read_stats(pipes: Sequence[Pipe], prefix: str) -> BackendStats:
    """Count our keys by kind, summing queue lengths and group sizes.

    ``expired_total`` is left 0: each daemon counts what it found expired itself.
    """
    channels = messages = groups = memberships = 0
    async for queues, group_sizes in _sizes(pipes, prefix):
        channels += sum(1 for _, n in queues if n)
        messages += sum(n for _, n in queues)
        groups += len(group_sizes)
        memberships += sum(group_sizes)
    return BackendStats(channels, messages, groups, memberships, 0)


async def read_top_channels(
    pipes: Sequence[Pipe], prefix: str, limit: int
) -> list[tuple[str, str, int]]:
    """The longest queues as (namespace, channel, length), longest first.

    Lengths count expired messages not yet removed too, as the gauges do.
    """
    found: list[tuple[int, str, str]] = []
    head = f"{prefix}:".encode()
    async for queues, _ in _sizes(pipes, prefix):
        for key, length in queues:
            match = _QUEUE_KEY.fullmatch(key.removeprefix(head).decode(errors="replace"))
            if length and match is not None:
                found.append((length, match["ns"], match["channel"]))
    found.sort(key=lambda item: (-item[0], item[1], item[2]))
    return [(ns, channel, length) for length, ns, channel in found[:limit]]


#: ``{<tag>}:q:<channel>`` after the prefix; the namespace starts the tag, before one
#: of the characters no namespace holds (see ``keys``).
_QUEUE_KEY = re.compile(r"\{(?P<ns>[^!:#}]*)[!:#][^}]*\}:q:(?P<channel>.+)")


async def _sizes(
    pipes: Sequence[Pipe], prefix: str
) -> AsyncIterator[tuple[list[tuple[bytes, int]], list[int]]]:
    """Per SCAN batch: (queue key, length) pairs and group sizes, up to ``STATS_MAX_KEYS``."""
    seen = 0
    for pipe in pipes:
        cursor = b"0"
        while seen < STATS_MAX_KEYS:
            cursor, keys = await pipe.execute("SCAN", cursor, "MATCH", f"{prefix}:*", "COUNT", 1000)
            seen += len(keys)
            queues = [k for k in keys if b"}:q:" in k]
            group_keys = [k for k in keys if k.endswith(b"}:g")]
            sizes = [pipe.call("LLEN", k) for k in queues]
            sizes += [pipe.call("ZCARD", k) for k in group_keys]
            counts = [int(n) for n in await asyncio.gather(*sizes)]
            yield list(zip(queues, counts, strict=False)), counts[len(queues) :]
            if cursor in (b"0", 0):
                break
