"""A coarse timer wheel: records filed by the time bucket in which they next need a look.

A tick visits only the buckets that came due, so expiring what nobody reads never
scans everything (the fault of channels' ``InMemoryChannelLayer``).
"""

from __future__ import annotations

import heapq
from typing import Generic, TypeVar

__all__ = ["Filed", "TimerWheel"]


class Filed:
    """Something the timer wheel can hold; ``bucket`` says where it is filed, if at all."""

    __slots__ = ("bucket",)

    bucket: int | None


_R = TypeVar("_R", bound=Filed)


class TimerWheel(Generic[_R]):
    """Records filed by the time bucket in which they next need a look."""

    __slots__ = ("_buckets", "_due", "_per_s")

    def __init__(self, tick_s: float) -> None:
        self._per_s = 1.0 / tick_s
        self._buckets: dict[int, set[_R]] = {}
        # A heap of the bucket numbers in _buckets, so a tick finds the due ones without
        # looking at the others (buckets reach as far ahead as the longest expiry).
        self._due: list[int] = []

    def file(self, record: _R, deadline: float) -> None:
        """File ``record`` (not filed now) to be looked at once ``deadline`` has passed."""
        # Rounding up: a bucket comes due only after every deadline filed in it.
        bucket = int(deadline * self._per_s) + 1
        records = self._buckets.get(bucket)
        if records is None:
            records = self._buckets[bucket] = set()
            heapq.heappush(self._due, bucket)
        records.add(record)
        record.bucket = bucket

    def unfile(self, record: _R) -> None:
        """Take ``record`` out of the wheel, if it is in it."""
        if record.bucket is not None:
            self._buckets[record.bucket].discard(record)
            record.bucket = None

    def pop_due(self, now: float) -> list[_R]:
        """Remove and return the records of every bucket due at ``now``."""
        due: list[_R] = []
        current = now * self._per_s
        while self._due and self._due[0] <= current:
            records = self._buckets.pop(heapq.heappop(self._due))
            for record in records:
                record.bucket = None
            due.extend(records)
        return due
