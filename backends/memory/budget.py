"""What the memory backend counts against its ``max_bytes``, and its refusals.

``max_bytes`` (the daemon's ``--max-memory``) bounds what waiting messages cost: their
payloads, plus a fixed overhead per message and per channel record, CPython's own costs
measured with tracemalloc and rounded up, so that the bound holds the process's memory
and not only its payloads. The backend keeps three running counts (payload bytes,
messages, records) and compares once per message sent, once per call for a group send
(which knows its member count up front). Past the bound a send is refused as if its
channel were full. A group send counts its one shared payload once per member it
waits for: the bound errs on the safe side, as a large broadcast to many slow readers
is refused sooner than its real cost would require.
"""

from __future__ import annotations

import logging
import time

__all__ = [
    "CHANNEL_OVERHEAD_BYTES",
    "MESSAGE_OVERHEAD_BYTES",
    "REFUSAL_LOG_INTERVAL_S",
    "Refusals",
]

log = logging.getLogger("channels_broker.backends.memory")

#: One waiting message beyond its payload bytes: the (deadline, payload) tuple (56), the
#: deadline float (24), its slot in the channel's deque (8) and the payload's bytes
#: header (33): 121, measured 88 + 33.
MESSAGE_OVERHEAD_BYTES = 128
#: One channel record: the record, its deque and first block, its name, its entries in
#: the namespace's dicts and in the timer wheel. Measured 1,000-1,080 bytes with names of
#: 17-38 characters; names may have 99.
CHANNEL_OVERHEAD_BYTES = 1280
#: Seconds between two warnings while sends are refused for memory: one line per burst.
REFUSAL_LOG_INTERVAL_S = 10.0


class Refusals:
    """Messages refused because memory was full: counted, and logged once per burst."""

    __slots__ = ("_logged_at", "_max_bytes", "_unlogged", "total")

    def __init__(self, max_bytes: int | None) -> None:
        self._max_bytes = max_bytes
        self.total = 0
        self._unlogged = 0
        self._logged_at = -REFUSAL_LOG_INTERVAL_S

    def count(self, refused: int, used_bytes: int) -> None:
        """Count ``refused`` messages; warn if the last warning is old enough."""
        if not refused:
            return
        self.total += refused
        self._unlogged += refused
        now = time.monotonic()
        if now - self._logged_at >= REFUSAL_LOG_INTERVAL_S:
            log.warning(
                "memory full: waiting messages take %d bytes of the %d allowed "
                "(--max-memory); %d messages refused as full since the last such line",
                used_bytes,
                self._max_bytes or 0,
                self._unlogged,
            )
            self._logged_at = now
            self._unlogged = 0
