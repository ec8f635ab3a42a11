"""What ``/metrics`` and ``/status`` show: the daemon's numbers as Prometheus families and JSON.

The exporter is a prometheus_client ``Collector`` registered with the default
registry (beside the process, platform and GC collectors), so a scrape reads the
plain counters of ``Metrics`` and the backend's ``stats()`` at that moment and the
request path never pays for exposition. Metric names follow Prometheus' conventions:
``channels_broker_`` prefix, base units (seconds), ``_total`` for counters.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import os
import platform
import time
from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from backends import Backend, BackendError, BackendStats, redacted_url
from broker.config import Config
from broker.version import __version__
from protocol import ErrorCode

from .health import ALL_NAMESPACES, HealthServer, ReadinessCheck, Scope, is_visible
from .metrics import Histogram, Metrics

__all__ = ["PREFIX", "TOP_LIMIT", "Exporter"]

log = logging.getLogger("channels_broker.metrics")

PREFIX = "channels_broker_"
#: Rows of each "top" table in /status: one terminal screen.
TOP_LIMIT = 10
#: Seconds the backend may take to list its longest queues for /status.
TOP_TIMEOUT_S = 2.0


class Observed(Protocol):
    """What the exporter reads of a running daemon (the daemon's ``Context`` is one)."""

    config: Config
    backend: Backend
    #: Live connections; /status reads their ``peer``, ``session``, ``held`` and ``pulls``.
    connections: set[Any]


class Exporter(Collector):
    """The daemon's collector, /status document and systemd status line."""

    def __init__(
        self,
        metrics: Metrics,
        context: Observed,
        readiness: ReadinessCheck,
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self.metrics = metrics
        self.context = context
        self._readiness = readiness
        self._registry = registry
        self._registered = False
        self._ready: dict[str, object] = {}

    def attach(self, health: HealthServer) -> None:
        """Register with the registry and serve /status through ``health``."""
        health.status = self.status
        health.before_scrape = self.refresh
        if not self._registered:
            self._registry.register(self)
            self._registered = True

    def detach(self) -> None:
        """Unregister (a no-op if never attached), so a later daemon may register again."""
        if self._registered:
            self._registry.unregister(self)
            self._registered = False

    async def refresh(self) -> None:
        """Take the readiness reading the next scrape reports (it needs the backend)."""
        self._ready = await self._readiness()

    def summary(self) -> str:
        """One line for systemd's STATUS=: what ``systemctl status`` shows."""
        stats = self._stats()
        waiting = "" if stats is None else f", {stats.messages_waiting} messages waiting"
        return f"{len(self.context.connections)} connections{waiting}"

    def _stats(self) -> BackendStats | None:
        try:
            return self.context.backend.stats()
        except BackendError as exc:  # a scrape must not fail because of one source
            log.warning("backend stats unavailable: %s", exc)
            return None

    # -- /metrics --------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """Every channels_broker_ family, read now from plain counters."""
        stats = self._stats()
        yield from self._messages(stats)
        yield from self._latencies()
        yield from self._gauges(stats)
        yield from self._errors()
        yield from self._limits(stats)
        yield InfoMetricFamily(
            PREFIX + "build",
            "Version of the daemon, the Python running it, and the backend kind.",
            value={
                "version": __version__,
                "python_version": platform.python_version(),
                "backend": self.metrics.backend_label,
            },
        )

    def _messages(self, stats: BackendStats | None) -> Iterator[Metric]:
        metrics = self.metrics
        yield _labelled_counter(
            "messages_accepted",
            "Messages stored for delivery, by operation (group_send: one per member).",
            "operation",
            metrics.accepted,
        )
        yield _labelled_counter(
            "messages_rejected",
            "Messages refused because their channel was full, by operation.",
            "operation",
            metrics.rejected,
        )
        yield _labelled_counter(
            "messages_delivered",
            "Messages handed to a consumer: push (to a client's own channel, from storage), "
            "direct (pushed at once, never stored: PostgreSQL, to a client connected to "
            "this daemon), pull (RECEIVE) or edge (a group fan-out its owner's layer kept, "
            "never stored: the memory backend, to a client connected to this daemon).",
            "mode",
            metrics.delivered,
        )
        yield CounterMetricFamily(
            PREFIX + "messages_dropped",
            "Group members skipped by group_send because their channel was full (for a "
            "fan-out at the edge: as its owner's layer reports).",
            value=metrics.dropped,
        )
        if stats is not None:
            yield from _storage_counters(stats)
        fanout = HistogramMetricFamily(
            PREFIX + "group_send_members", "Members a group_send reached or skipped."
        )
        fanout.add_metric([], list(metrics.fanout.cumulative()), metrics.fanout.sum)
        yield fanout

    def _latencies(self) -> Iterator[Metric]:
        metrics = self.metrics
        yield _histograms(
            "operation_duration_seconds",
            "Time the daemon took to handle a request, by operation (receive: to register it).",
            ["operation"],
            {(name,): histogram for name, histogram in metrics.requests.items()},
        )
        backend = metrics.backend_label
        yield _histograms(
            "backend_operation_duration_seconds",
            "Time a storage call took, by backend and operation.",
            ["backend", "operation"],
            {(backend, name): histogram for name, histogram in metrics.backend_calls.items()},
        )
        errors = CounterMetricFamily(
            PREFIX + "backend_errors",
            "Storage calls that failed, by backend and operation.",
            labels=["backend", "operation"],
        )
        for name, count in metrics.backend_errors.items():
            errors.add_metric([backend, name], count)
        yield errors

    def _gauges(self, stats: BackendStats | None) -> Iterator[Metric]:
        yield _gauge("connections", "Client connections open now.", len(self.context.connections))
        if stats is not None:
            yield _gauge(
                "channels_waiting", "Channels with waiting messages.", stats.channels_waiting
            )
            yield _gauge("messages_waiting", "Messages waiting in storage.", stats.messages_waiting)
            yield _gauge("groups", "Groups with at least one member.", stats.groups)
            yield _gauge("group_memberships", "Channel memberships of groups.", stats.memberships)
        yield from self._store()
        if self._ready:
            ready, backend_up = bool(self._ready.get("ready")), bool(self._ready.get("backend"))
            yield _gauge("ready", "1 when listening and the backend answers (/readyz).", ready)
            yield _gauge("backend_up", "1 when the backend answered its last check.", backend_up)

    def _store(self) -> Iterator[Metric]:
        """memory:// only: whether the store started empty, or what --state-file restored."""
        started_empty = self.metrics.store_started_empty
        if started_empty is None:
            return
        yield _gauge(
            "store_started_empty",
            "1 if the memory store started empty (what an earlier daemon held is lost), 0 if"
            " it read --state-file back.",
            started_empty,
        )
        family = GaugeMetricFamily(
            PREFIX + "store_restored",
            "What the memory store read back from --state-file at start, by what: messages,"
            " memberships, and expired (dropped: their expiry passed while it was down).",
            labels=["what"],
        )
        for what, count in self.metrics.store_restored.items():
            family.add_metric([what], count)
        yield family

    def _errors(self) -> Iterator[Metric]:
        errors = self.metrics.errors
        family = CounterMetricFamily(
            PREFIX + "protocol_errors",
            "ERROR frames sent to clients, by error code.",
            labels=["code"],
        )
        for code in ErrorCode:
            family.add_metric([code.name.lower()], errors.get(code, 0))
        yield family
        yield CounterMetricFamily(
            PREFIX + "auth_failures",
            "Connections refused because their token was wrong.",
            value=errors.get(ErrorCode.AUTH_FAILED, 0),
        )
        yield CounterMetricFamily(
            PREFIX + "tls_refused",
            "TLS handshakes refused: no client certificate, or one not signed by"
            " --tls-client-ca, or a client not speaking TLS.",
            value=self.metrics.tls_refused,
        )

    def _limits(self, stats: BackendStats | None) -> Iterator[Metric]:
        hits = dict(self.metrics.limits_hit)
        if stats is not None and stats.memory_bytes is not None:
            hits["max-memory"] = stats.memory_refused
            yield _gauge(
                "memory_bytes",
                "Bytes the memory backend counts for its waiting messages (--max-memory).",
                stats.memory_bytes,
            )
        yield _labelled_counter(
            "limit_hits",
            "Requests and connections refused at one of the daemon's bounds, connections"
            " closed past one, reading paused at one, by the bound (its flag: max-capacity,"
            " max-batch...).",
            "limit",
            hits,
        )
        yield CounterMetricFamily(
            PREFIX + "accept_errors",
            "Connections the kernel could not hand over for want of file descriptors.",
            value=self.metrics.accept_errors,
        )

    # -- /status ---------------------------------------------------------------

    async def status(self, scope: Scope = ALL_NAMESPACES) -> dict[str, object]:
        """The document ``channels-broker status`` and ``top`` show.

        ``scope`` is the namespaces whose channels and clients the reader may see (a
        token's, from ``--token-file``), or ``ALL_NAMESPACES``; counts stay daemon-wide.
        """
        context, metrics = self.context, self.metrics
        readiness = await self._readiness()
        stats = self._stats()
        config = context.config
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - metrics.started_at, 3),
            "clock_s": time.monotonic(),
            "backend": redacted_url(config.backend_url),
            "listen": [f"tcp://{a}" for a in config.listen] + [f"unix://{p}" for p in config.unix],
            "ready": readiness,
            "connections": len(context.connections),
            "totals": metrics.totals() | ({"expired": stats.expired_total} if stats else {}),
            "waiting": None if stats is None else _waiting(stats),
            "top_channels": await self._top_channels(scope),
            "top_clients": _top_clients(context.connections, scope),
        }

    async def _top_channels(self, scope: Scope) -> list[dict[str, object]] | None:
        try:
            top = await asyncio.wait_for(
                self.context.backend.top_channels(TOP_LIMIT), TOP_TIMEOUT_S
            )
        except (BackendError, TimeoutError):
            return None
        if top is None:
            return None
        return [
            {"namespace": ns, "channel": name, "messages": n}
            for ns, name, n in top
            if is_visible(ns, scope)
        ]


def _waiting(stats: BackendStats) -> dict[str, int]:
    return {
        "channels": stats.channels_waiting,
        "messages": stats.messages_waiting,
        "groups": stats.groups,
        "memberships": stats.memberships,
    }


def _top_clients(connections: set[Any], scope: Scope) -> list[dict[str, object]]:
    """Connections holding the most pushed, unacknowledged messages: the slow consumers."""
    if scope != ALL_NAMESPACES:
        connections = {c for c in connections if c.session and is_visible(c.session.ns, scope)}
    busiest = heapq.nlargest(
        TOP_LIMIT,
        connections,
        key=lambda connection: (connection.held.total, len(connection.pulls)),
    )
    return [
        {
            "peer": connection.peer,
            "namespace": None if connection.session is None else connection.session.ns,
            "client_id": None if connection.session is None else connection.session.client_id,
            "held": connection.held.total,
            "pulls": len(connection.pulls),
        }
        for connection in busiest
    ]


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, documentation, value=value)


def _storage_counters(stats: BackendStats) -> Iterator[Metric]:
    """What storage counted of the messages: expired, and given back by their lease."""
    yield CounterMetricFamily(
        PREFIX + "messages_expired",
        "Messages that expired before anyone took them.",
        value=stats.expired_total,
    )
    yield CounterMetricFamily(
        PREFIX + "messages_given_back",
        "Messages taken for a worker whose lease lapsed before they were acknowledged "
        "(a daemon killed, a connection or the storage stalled), put back in their queue.",
        value=stats.given_back_total,
    )


def _labelled_counter(
    name: str, documentation: str, label: str, values: dict[str, int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(PREFIX + name, documentation, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


def _histograms(
    name: str,
    documentation: str,
    labels: list[str],
    histograms: dict[tuple[str, ...], Histogram],
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(PREFIX + name, documentation, labels=labels)
    for values, histogram in histograms.items():
        family.add_metric(list(values), list(histogram.cumulative()), histogram.sum)
    return family
