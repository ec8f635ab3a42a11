"""The HTTP listener for ``/healthz``, ``/readyz``, ``/metrics`` and ``/status``.

A few lines of HTTP/1.1 on asyncio streams: the endpoints are tiny, scraped a few
times a minute, and a web framework would be a larger dependency than this file.

Who may read what. ``/healthz``, ``/readyz`` and ``/metrics`` answer anyone: probes and
Prometheus ask without credentials, and they carry counts and fixed labels only, never
a channel, group, client or address. ``/status`` names channels, clients, peers and
namespaces, so it needs the daemon's token (``Authorization: Bearer <token>``), and a
daemon with no token shows it to loopback peers only.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from broker.config import is_loopback

__all__ = ["ALL_NAMESPACES", "HealthServer", "Scope", "StatusAccess", "is_visible"]

log = logging.getLogger("channels_broker.health")

#: A request line and headers longer than this are not a scraper's; refuse them.
MAX_REQUEST_BYTES = 8192
#: Seconds a client may take to send its request.
REQUEST_TIMEOUT_S = 5.0

#: The namespaces a /status reader may see; ``*`` among them: every one.
Scope = frozenset[str]
ALL_NAMESPACES: Scope = frozenset({"*"})

ReadinessCheck = Callable[[], Awaitable[dict[str, object]]]
#: Builds the ``/status`` document (see ``broker.ops.exporter``) for a scope.
StatusReport = Callable[[Scope], Awaitable[dict[str, object]]]
#: The scope a bearer token gives on /status, or None if it is not one of the daemon's.
StatusAccess = Callable[[str], Scope | None]


class HealthServer:
    """Serves health and metrics over HTTP on one address."""

    def __init__(
        self,
        host: str,
        port: int,
        readiness: ReadinessCheck,
        registry: CollectorRegistry = REGISTRY,
        status_access: StatusAccess | None = None,
    ) -> None:
        self.host, self.port = host, port
        self._readiness = readiness
        self._registry = registry
        #: None: the daemon has no token, and /status answers loopback peers only.
        self._status_access = status_access
        self._server: asyncio.Server | None = None
        #: Optional hooks, set by ``broker.ops.exporter``: the /status document, and a refresh
        #: of the gauges that need I/O (readiness), awaited before each /metrics scrape.
        self.status: StatusReport | None = None
        self.before_scrape: Callable[[], Awaitable[None]] | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, reuse_address=True, limit=MAX_REQUEST_BYTES
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            method, path = _request_target(head)
            peer = writer.get_extra_info("peername")
            status, content_type, body = await self._respond(method, path, head, peer)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            status, content_type, body = 400, "text/plain", b"bad request\n"
        except ConnectionError:
            writer.close()
            return
        header = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            + ('WWW-Authenticate: Bearer realm="channels-broker"\r\n' if status == 401 else "")
            + "Connection: close\r\n\r\n"
        )
        try:
            writer.write(header.encode() + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _respond(
        self, method: str, path: str, head: bytes, peer: Any
    ) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if path == "/healthz":
            return 200, "application/json", b'{"status": "ok"}\n'
        if path == "/readyz":
            report = await self._readiness()
            status = 200 if report.get("ready") else 503
            return status, "application/json", json.dumps(report).encode() + b"\n"
        if path == "/metrics":
            if self.before_scrape is not None:
                await self.before_scrape()
            return 200, CONTENT_TYPE_LATEST, generate_latest(self._registry)
        if path == "/status" and self.status is not None:
            return await self._status(self.status, head, peer)
        return 404, "text/plain", b"not found\n"

    async def _status(self, status: StatusReport, head: bytes, peer: Any) -> tuple[int, str, bytes]:
        """/status for the scope the request proves, or why it may not read it."""
        if self._status_access is None:
            if not _is_loopback_peer(peer):
                log.warning("refused /status to %s: the daemon has no token", _shown(peer))
                return 403, "text/plain", _NO_TOKEN_NO_STATUS
            scope = ALL_NAMESPACES
        else:
            token = _bearer_token(head)
            granted = None if token is None else self._status_access(token)
            if granted is None:
                reason = "no token" if token is None else "a wrong token"
                log.warning("refused /status to %s: %s", _shown(peer), reason)
                return 401, "text/plain", _TOKEN_NEEDED
            scope = granted
        return 200, "application/json", json.dumps(await status(scope)).encode() + b"\n"


_TOKEN_NEEDED = (
    b"/status needs the daemon's token: send 'Authorization: Bearer <token>'"
    b" (channels-broker status --token, or CHANNELS_BROKER_TOKEN)\n"
)
_NO_TOKEN_NO_STATUS = (
    b"/status answers on loopback only while the daemon has no token (--token or --token-file)\n"
)
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


def _request_target(head: bytes) -> tuple[str, str]:
    """Method and path (query dropped) of an HTTP request head; ValueError if not one."""
    method, target, _version = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
    return method, target.split("?", 1)[0]


def _bearer_token(head: bytes) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "authorization":
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def _is_loopback_peer(peer: Any) -> bool:
    return isinstance(peer, tuple) and is_loopback(str(peer[0]))


def _shown(peer: Any) -> str:
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


def is_visible(namespace: str | None, scope: Scope) -> bool:
    """Whether a row of ``namespace`` shows to a reader of ``scope``."""
    return "*" in scope or namespace in scope
