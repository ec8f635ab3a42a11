"""Deadlines that memberships share, so that each costs no float object of its own.

A site holds millions of group memberships, each with a deadline: a float object is 24
bytes, and the memory backend and the daemon's per-connection count each keep one per
membership. A deadline is rounded up to a step (a power of two seconds, at most 1 s and
at most 1/64 of the expiry) and the last one handed out is handed out again while the
value is the same: the memberships made within one step share one object. So a
membership lapses at most one step late (1 s of a day's group_expiry); rounding up keeps
deadlines in the order of their ``group_add``, which the sweeps rely on.
"""

from __future__ import annotations

import math

__all__ = ["SharedDeadlines"]

#: The longest step (seconds), and the step's largest share of the expiry.
MAX_STEP_S = 1.0
STEPS_PER_EXPIRY = 64


class SharedDeadlines:
    """Hands out rounded deadlines, the same object for the same value in a row."""

    __slots__ = ("_expiry", "_last", "_step")

    def __init__(self) -> None:
        self._last = -math.inf
        self._expiry = math.nan  # equal to no expiry: the first call sets the step
        self._step = MAX_STEP_S

    def after(self, now: float, expiry_s: float) -> float:
        """``now + expiry_s`` rounded up to the step: the last object if it has that value."""
        if expiry_s <= 0:
            return now + expiry_s  # lapsed already: not to be put off by a step
        if expiry_s != self._expiry:
            self._expiry, self._step = expiry_s, _step_for(expiry_s)
        step = self._step
        rounded = math.ceil((now + expiry_s) / step) * step
        if rounded != self._last:
            self._last = rounded
        return self._last


def _step_for(expiry_s: float) -> float:
    return min(MAX_STEP_S, 2.0 ** math.floor(math.log2(expiry_s / STEPS_PER_EXPIRY)))
