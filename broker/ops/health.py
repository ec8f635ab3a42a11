"""The HTTP listener for ``/healthz``, ``/readyz`` and ``/metrics``.

A few lines of HTTP/1.1 on asyncio streams: the endpoints are tiny, scraped a few
times a minute, and a web framework would be a larger dependency than this file.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

__all__ = ["HealthServer"]

log = logging.getLogger("channels_broker.health")

#: A request line and headers longer than this are not a scraper's; refuse them.
MAX_REQUEST_BYTES = 8192
#: Seconds a client may take to send its request.
REQUEST_TIMEOUT_S = 5.0

ReadinessCheck = Callable[[], Awaitable[dict[str, object]]]
#: Builds the ``/status`` document (see ``broker.ops.exporter``).
StatusReport = Callable[[], Awaitable[dict[str, object]]]


class HealthServer:
    """Serves health and metrics over HTTP on one address."""

    def __init__(
        self,
        host: str,
        port: int,
        readiness: ReadinessCheck,
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self.host, self.port = host, port
        self._readiness = readiness
        self._registry = registry
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
            status, content_type, body = await self._respond(method, path)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            status, content_type, body = 400, "text/plain", b"bad request\n"
        except ConnectionError:
            writer.close()
            return
        header = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        try:
            writer.write(header.encode() + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _respond(self, method: str, path: str) -> tuple[int, str, bytes]:
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
            return 200, "application/json", json.dumps(await self.status()).encode() + b"\n"
        return 404, "text/plain", b"not found\n"


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


def _request_target(head: bytes) -> tuple[str, str]:
    """Method and path (query dropped) of an HTTP request head; ValueError if not one."""
    method, target, _version = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
    return method, target.split("?", 1)[0]
