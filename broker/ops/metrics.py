"""The daemon's counters and histograms: plain numbers on the hot path, read at scrape time.

Theory of operation. Counting must cost a few increments per request, so nothing on
the request path touches prometheus_client (its ``Counter.inc`` takes a lock, its
``Histogram.observe`` more). ``Metrics`` holds ints, dicts of ints and ``Histogram``s
(a bucket array and a sum), which the daemon's handlers and connections increment
where the event happens, without a call (one timing per request, a count per
outcome: stored, refused, delivered, ERROR frame); the event loop is the only writer,
so no lock is needed. For shared backends ``InstrumentedBackend`` times each storage
call, which is a network round trip there. ``broker.ops.exporter`` turns them into
Prometheus metric families when ``/metrics`` is scraped, and into ``/status``.

Every label value comes from a fixed set (operation names, error codes, the backend's
URL scheme), never from channel or group names, so the series count stays bounded
whatever the traffic.
"""

from __future__ import annotations

import re
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence

from broker.config import SERVE_OPTIONS
from protocol import (
    Ack,
    Cancel,
    ErrorCode,
    Flush,
    GroupAdd,
    GroupDiscard,
    GroupSend,
    Hello,
    Ping,
    Receive,
    ReturnRoom,
    Send,
    SendMany,
)

__all__ = [
    "FANOUT_BUCKETS",
    "LATENCY_BUCKETS_S",
    "LIMITS",
    "REQUEST_OPERATIONS",
    "Histogram",
    "Metrics",
    "operation_name",
]

#: Latency bucket bounds in seconds: from 50 µs (a send to the memory backend is a few
#: µs of daemon time plus the loop's turn) to 2.5 s (a backend failing over), spaced
#: about 2-2.5x apart so p50 and p99 read within one bucket of the truth.
LATENCY_BUCKETS_S = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
#: Group sizes: a private chat (2), a room (tens), a broadcast to a whole site (thousands).
FANOUT_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)

#: Request operations, made up front so their series exist (at zero) from the first
#: scrape: ``rate()`` misses the first increment of a series that appears later.
REQUEST_FRAMES = (
    Hello, Send, SendMany, Receive, Cancel, Ack, GroupAdd, GroupDiscard, GroupSend, Flush, Ping,
    ReturnRoom,
)  # fmt: skip

_CAMEL_HUMP = re.compile(r"(?<!^)(?=[A-Z])")


def operation_name(frame_type: type) -> str:
    """The label of a request frame type: ``GroupSend`` -> ``group_send``."""
    return _CAMEL_HUMP.sub("_", frame_type.__name__).lower()


REQUEST_OPERATIONS = tuple(operation_name(frame_type) for frame_type in REQUEST_FRAMES)
#: The bounds a refusal is counted under: the daemon's ``--max-*`` flags, and
#: ``--hello-timeout``.
LIMITS = tuple(
    option.name
    for option in SERVE_OPTIONS
    if option.name.startswith("max-") or option.name == "hello-timeout"
)


class Histogram:
    """Counts per bucket and a sum: what a Prometheus histogram exports, nothing more.

    ``counts[i]`` holds the observations at most ``bounds[i]`` and above the bound
    before it; the last slot holds those above every bound (the ``+Inf`` bucket).
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left puts a value equal to a bound in that bound's bucket: "le".
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> Iterator[tuple[str, int]]:
        """``(le, count at or below le)`` pairs, ending with ``+Inf``, as exported."""
        total = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            total += count
            yield _format_bound(bound), total
        yield "+Inf", total + self.counts[-1]


def _format_bound(bound: float) -> str:
    # Prometheus clients print le as a float ("1.0", "0.005"); dashboards match on it.
    return repr(float(bound))


class Metrics:
    """Everything the daemon counts, as plain numbers (see the module docstring).

    Message counters are keyed by operation (``send``, ``send_many``,
    ``group_send``) or delivery mode (``push``, ``direct``, ``pull``); request and backend
    latencies by operation name; errors by ``ErrorCode``.
    """

    def __init__(self, backend_label: str = "memory") -> None:
        self.backend_label = backend_label
        self.started_at = time.time()
        self.accepted = {"send": 0, "send_many": 0, "group_send": 0}
        self.rejected = {"send": 0, "send_many": 0}
        self.delivered = {"push": 0, "direct": 0, "pull": 0, "edge": 0}
        self.dropped = 0
        self.fanout = Histogram(FANOUT_BUCKETS)
        self.requests = {name: Histogram(LATENCY_BUCKETS_S) for name in REQUEST_OPERATIONS}
        #: The same histograms by frame type: what the request path looks up.
        self.request_by_type: dict[type, Histogram] = {
            frame_type: self.requests[operation_name(frame_type)] for frame_type in REQUEST_FRAMES
        }
        self.backend_calls: dict[str, Histogram] = {}
        self.backend_errors: dict[str, int] = {}
        self.errors: dict[ErrorCode, int] = {}
        #: TLS handshakes the daemon refused: no client certificate, or one it does not trust.
        self.tls_refused = 0
        #: Hits of one of the daemon's bounds (a request or connection refused, a
        #: connection closed, reading paused), by the bound: its flag's name
        #: (``max-batch``), made up front like the request series.
        self.limits_hit: dict[str, int] = dict.fromkeys(LIMITS, 0)
        #: accept() calls that failed for want of file descriptors (EMFILE, ENFILE...).
        self.accept_errors = 0
        #: memory:// only (None otherwise): 1 if the store started empty, 0 if it read
        #: --state-file back; and what that put back or dropped as expired (``restarts``).
        self.store_started_empty: int | None = None
        self.store_restored = {"messages": 0, "memberships": 0, "expired": 0}

    # -- counted where it happens (see the module docstring); errors are rare --

    def count_error(self, code: ErrorCode | int) -> None:
        """Record one ERROR frame sent to a client."""
        code = ErrorCode(code)
        self.errors[code] = self.errors.get(code, 0) + 1

    def count_limit(self, limit: str | None) -> None:
        """Record one refusal at the bound ``limit`` (None: a refusal at no bound)."""
        if limit is not None:
            self.limits_hit[limit] = self.limits_hit.get(limit, 0) + 1

    def backend_histogram(self, operation: str) -> Histogram:
        """The latency histogram of one backend operation, made on first use."""
        histogram = self.backend_calls.get(operation)
        if histogram is None:
            histogram = self.backend_calls[operation] = Histogram(LATENCY_BUCKETS_S)
            self.backend_errors[operation] = 0
        return histogram

    # -- totals, for /status and the systemd STATUS line --------------------

    def totals(self) -> dict[str, int]:
        """Counter totals over every label, for rates in ``channels-broker status``."""
        return {
            "accepted": sum(self.accepted.values()),
            "delivered": sum(self.delivered.values()),
            "rejected": sum(self.rejected.values()),
            "dropped": self.dropped,
            "requests": sum(histogram.count for histogram in self.requests.values()),
            "errors": sum(self.errors.values()),
            "auth_failures": self.errors.get(ErrorCode.AUTH_FAILED, 0),
            "tls_refused": self.tls_refused,
            "backend_errors": sum(self.backend_errors.values()),
        }
