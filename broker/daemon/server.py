"""The daemon: listeners, connections, the backend, and shutdown in stages.

Shutdown (on SIGTERM or SIGINT): stop accepting; ask each connection to finish
the frames it has read and close; wait for them under ``shutdown_timeout_s``; abort
the rest; write a memory store to ``--state-file`` (``restarts``); close the backend.
A second signal skips the wait. SIGHUP re-reads ``--token-file`` (``reload``) and drops
no connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import stat
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

from backends import Backend, BackendError, backend_from_url, redacted_url
from backends.memory import MemoryBackend
from broker.config import Config, is_loopback, parse_host_port
from broker.errors import ConfigError, ListenError
from broker.ops.exporter import Exporter
from broker.ops.health import HealthServer
from broker.ops.instrumented import instrument
from broker.ops.metrics import Metrics
from broker.ops.systemd import Notifier

from .connection import Connection
from .context import Context
from .restarts import restore_store, save_store
from .routing import Router
from .tls import TlsHandshake
from .tokens import TokenTable

__all__ = ["Server"]

log = logging.getLogger("channels_broker.server")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_T = TypeVar("_T")
#: What to do about the usual reasons a listener cannot open, by errno.
_LISTEN_HINTS = {
    errno.EADDRINUSE: "another process listens there (another channels-broker? `ss -ltnp`)",
    errno.EADDRNOTAVAIL: "no network interface of this host has that address",
    errno.EACCES: "not allowed: ports below 1024 need root or CAP_NET_BIND_SERVICE, and a"
    " socket path a directory this user may write to",
    errno.ENOENT: "its directory does not exist",
}


class Server:
    """One channels-broker daemon."""

    def __init__(self, config: Config, backend: Backend | None = None) -> None:
        """Raise ``ConfigError`` if the token file cannot be read or is not valid."""
        self.config = config
        self.backend = backend if backend is not None else backend_from_url(config.backend_url)
        self.metrics = Metrics()
        self._memory = self.backend if isinstance(self.backend, MemoryBackend) else None
        if self._memory is not None:  # its URL takes no options
            self._memory.limit_memory(config.max_memory)
        if config.metrics_listen:  # off: no wrapper, for an overhead-free baseline
            self.backend = instrument(self.backend, self.metrics, config.backend_url)
        self.context = Context(config, self.backend, Router(self.backend), metrics=self.metrics)
        self.context.tokens = TokenTable.from_config(config)
        self.exporter = Exporter(self.metrics, self.context, self.readiness)
        self.notifier = Notifier.from_environment()
        self._listeners: list[asyncio.Server] = []
        self._loop_exceptions: Any = None  # the loop's handler before ours
        self._health: HealthServer | None = None
        self._stop = asyncio.Event()
        self._force = asyncio.Event()

    async def serve(self) -> None:
        """Run until a signal or ``request_shutdown``; then shut down cleanly."""
        loop = asyncio.get_running_loop()
        for sig in _SIGNALS:
            loop.add_signal_handler(sig, self.request_shutdown)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            await self.start()
            await self._stop.wait()
            await self.shutdown()
        finally:
            for sig in (*_SIGNALS, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    def request_shutdown(self) -> None:
        """Begin shutdown; a second call makes it immediate."""
        if self._stop.is_set():
            log.warning("second signal: closing connections now")
            self._force.set()
        self._stop.set()

    def reload(self) -> None:
        """Re-read ``--token-file`` (SIGHUP). Live connections keep the namespace they
        were admitted to; a token no longer in the file stops new HELLOs. An unreadable
        or invalid file leaves the tokens as they were."""
        path = self.config.token_file
        if not path:
            log.info("SIGHUP: no --token-file to re-read")
            return
        try:
            tokens = TokenTable.read(path)
        except ConfigError as exc:
            log.error("SIGHUP: keeping the tokens as they were: %s", exc)
            return
        self.context.tokens = tokens
        log.info("SIGHUP: %d tokens from %s", len(tokens), path)

    async def start(self) -> None:
        await self.backend.connect()
        self.context.incarnation = await restore_store(self._memory, self.config, self.metrics)
        loop = asyncio.get_running_loop()
        self.context.bounds.fit_file_limit()
        self._loop_exceptions = loop.get_exception_handler()
        loop.set_exception_handler(self.context.bounds.on_loop_exception)

        def factory() -> Connection:
            return Connection(self.context)

        await self._listen_tcp(loop, factory)
        for path in self.config.unix:
            opening = _open_unix(loop, factory, path)
            self._listeners.append(await _listening(opening, f"unix://{path}", "unix"))
            log.info("listening on unix://%s", path)
        if self.config.metrics_listen:
            await self._start_health(self.config.metrics_listen)
        log.info("serving with backend %s", redacted_url(self.config.backend_url))
        self.notifier.ready(self.exporter.summary)

    async def _listen_tcp(
        self, loop: asyncio.AbstractEventLoop, factory: Callable[[], Connection]
    ) -> None:
        """The TCP listeners; with TLS each connection starts as a ``TlsHandshake``."""
        config, tls = self.config, self.config.ssl_context()
        accept: Callable[[], asyncio.Protocol] = factory
        if tls is not None:
            bounds = self.context.bounds
            accept = partial(TlsHandshake, factory, tls, config.hello_timeout_s, bounds)
        scheme = "tls" if tls else "tcp"
        for host, port in config.listen_addresses:
            opening = loop.create_server(accept, host, port, reuse_address=True)
            listener = await _listening(opening, f"{host}:{port}", "listen")
            self._listeners.append(listener)
            log.info("listening on %s://%s:%d", scheme, host, port)
            if not is_loopback(host) and not config.is_authenticated:
                log.warning(
                    "%s:%d serves any client that reaches it: no token, no client certificate"
                    " (--allow-unauthenticated)",
                    host,
                    port,
                )

    async def _start_health(self, address: str) -> None:
        host, port = parse_host_port(address)
        access = self.status_scope if self.config.token or self.config.token_file else None
        self._health = HealthServer(host, port, self.readiness, status_access=access)
        self.exporter.attach(self._health)
        await _listening(self._health.start(), address, "metrics-listen")
        log.info("health and metrics on http://%s:%d", host, port)
        if access is None and not is_loopback(host):
            log.warning(
                "http://%s:%d serves /metrics, /healthz and /readyz to anyone who reaches it,"
                " and /status to loopback only: the daemon has no token",
                host,
                port,
            )

    def status_scope(self, token: str) -> frozenset[str] | None:
        """The namespaces ``/status`` shows the bearer of ``token``: those the token may
        use (``*``: all; ``--token`` is one such), from the tokens in force now (SIGHUP
        re-reads them); None (refused) for a token the daemon does not know."""
        tokens = self.context.tokens
        return None if tokens is None else tokens.namespaces_of(token)

    async def readiness(self) -> dict[str, Any]:
        """What ``/readyz`` reports."""
        try:
            backend_ready = await asyncio.wait_for(self.backend.is_ready(), 2.0)
        except (BackendError, TimeoutError):
            backend_ready = False
        listening = bool(self._listeners) and self.context.accepting
        return {
            "ready": listening and backend_ready,
            "listening": listening,
            "backend": backend_ready,
            "connections": len(self.context.connections),
        }

    async def shutdown(self) -> None:
        log.info("shutting down")
        self.notifier.stopping(f"stopping: {len(self.context.connections)} connections to finish")
        self.context.accepting = False
        for listener in self._listeners:
            listener.close()
        try:
            await self.backend.prepare_to_stop()
        except BackendError as exc:
            log.warning("could not prepare the backend to stop: %s", exc)
        connections = list(self.context.connections)
        for connection in connections:
            connection.shut_down()
        if connections:
            await self._wait_for(connections)
        for listener in self._listeners:
            await listener.wait_closed()
        for path in self.config.unix:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if self._health is not None:
            await self._health.close()
        self.exporter.detach()
        save_store(self._memory, self.config, self.context.incarnation)
        await self.backend.close()
        asyncio.get_running_loop().set_exception_handler(self._loop_exceptions)
        log.info("stopped")
        self.notifier.close()

    async def _wait_for(self, connections: list[Connection]) -> None:
        closed = asyncio.gather(*(connection.closed for connection in connections))
        forced = asyncio.ensure_future(self._force.wait())
        waiters: set[asyncio.Future[Any]] = {closed, forced}
        done, _ = await asyncio.wait(
            waiters,
            timeout=self.config.shutdown_timeout_s,
            return_when=asyncio.FIRST_COMPLETED,
        )
        forced.cancel()
        if closed not in done:
            left = [connection for connection in connections if not connection.closed.done()]
            log.warning("aborting %d connections that did not finish in time", len(left))
            for connection in left:
                connection.abort("shutdown deadline")
            await closed


async def _listening(opening: Awaitable[_T], address: str, option: str) -> _T:
    """What ``opening`` opens; ``ListenError`` naming ``address``, why, and what to do,
    if it cannot (``option`` gave the address)."""
    try:
        return await opening
    except OSError as exc:
        if isinstance(exc, socket.gaierror):
            reason = f"{exc.strerror}: the host name does not resolve (give an IP address)"
        else:
            # asyncio's message repeats the address: the system's own says it shorter.
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            hint = _LISTEN_HINTS.get(exc.errno or 0)
            reason = f"{reason}: {hint}" if hint else reason
        raise ListenError(f"cannot listen on {address}: {reason}", option) from exc


async def _open_unix(
    loop: asyncio.AbstractEventLoop, factory: Callable[[], Connection], path: str
) -> asyncio.Server:
    _remove_stale_socket(path)
    return await loop.create_unix_server(factory, path)


def _remove_stale_socket(path: str) -> None:
    """Remove the socket file a previous run left; refuse to remove anything else."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket; not removing it")
    os.unlink(path)
