"""Gauges of the Redis backend, read now and then by a SCAN of its keys (never KEYS)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from .base import BackendStats
from .redis_pipe import Pipe

__all__ = ["STATS_MAX_KEYS", "read_stats"]

#: A reading stops after this many keys: gauges are for dashboards, and a sample of a
#: huge keyspace is better than a SCAN that keeps Redis busy for seconds.
STATS_MAX_KEYS = 100_000


async def read_stats(pipes: Sequence[Pipe], prefix: str) -> BackendStats:
    """Count our keys by kind, summing queue lengths and group sizes.

    ``expired_total`` is left 0: each daemon counts what it found expired itself.
    """
    channels = messages = groups = memberships = seen = 0
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
            channels += sum(1 for n in counts[: len(queues)] if n)
            messages += sum(counts[: len(queues)])
            groups += len(group_keys)
            memberships += sum(counts[len(queues) :])
            if cursor in (b"0", 0):
                break
    return BackendStats(channels, messages, groups, memberships, 0)
