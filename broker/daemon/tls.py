"""TLS on the daemon's TCP listeners: the handshake before a connection starts.

asyncio's ``create_server(ssl=...)`` hides a failed handshake: a client without the
certificate ``--tls-client-ca`` asks for, with one another CA signed, or speaking plain
TCP to a TLS port vanishes without a line. So a TLS listener accepts plain sockets and
gives each to a ``TlsHandshake``, which runs ``loop.start_tls`` (bounded by the HELLO
deadline) and only then makes the daemon's ``Connection`` and gives it the TLS
transport: a refusal is logged with the peer and its reason and counted, and a socket
that never finishes its handshake costs no ``Connection``. A socket in its handshake
counts against ``--max-connections`` and ``--max-connections-per-peer`` as a connection
does (over a bound it is closed at once), so a flood of handshakes that never finish
cannot take the file descriptors the bounds keep for everyone.

The TLS transport may call this protocol between the end of the handshake and the
hand-over (bytes the client sent right after it, an end of stream, a loss scheduled
before ``set_protocol``): what comes before is kept and replayed, what comes after is
passed on.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import cast

from .bounds import Bounds

__all__ = ["TlsHandshake"]

log = logging.getLogger("channels_broker.server")


class TlsHandshake(asyncio.Protocol):
    """One accepted TCP socket until its TLS handshake ends; then its ``Connection``'s."""

    def __init__(
        self,
        make_connection: Callable[[], asyncio.Protocol],
        context: ssl.SSLContext,
        timeout_s: float,
        bounds: Bounds,
    ) -> None:
        self._make_connection = make_connection
        self._context = context
        self._timeout_s = timeout_s
        self._bounds = bounds
        self._connection: asyncio.Protocol | None = None
        self._early: list[bytes] = []  # read after the handshake, before the hand-over
        self._eof = False
        self._lost: tuple[Exception | None] | None = None
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        # uvloop's transports have asyncio.Transport's methods without subclassing it.
        transport = cast(asyncio.Transport, base)
        transport.pause_reading()  # the ClientHello is for start_tls, not for us
        peer = transport.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) else None
        if self._bounds.admit(host) is not None:  # counted and logged there
            transport.abort()
            return
        self._task = asyncio.get_running_loop().create_task(self._upgrade(transport, host))

    async def _upgrade(self, transport: asyncio.Transport, host: str | None) -> None:
        peer = _peer(transport)
        try:
            tls = await asyncio.get_running_loop().start_tls(
                transport,
                self,
                self._context,
                server_side=True,
                ssl_handshake_timeout=self._timeout_s,
            )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            self._refused(peer, exc)
            return
        finally:  # over, or cancelled: from here the Connection counts itself
            self._bounds.release(host)
        assert tls is not None
        self._connection = connection = self._make_connection()
        tls.set_protocol(connection)
        connection.connection_made(tls)
        if self._early:
            connection.data_received(b"".join(self._early))
        if self._eof:
            connection.eof_received()
        if self._lost is not None:
            connection.connection_lost(self._lost[0])

    def _refused(self, peer: str, exc: BaseException) -> None:
        if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLEOFError):
            self._bounds.metrics.tls_refused += 1
            log.warning("TLS handshake from %s refused: %s", peer, describe(exc))
        else:  # gone, or silent past the deadline: a port probe, a TCP health check
            reason = str(exc) or type(exc).__name__
            log.info("TLS handshake from %s did not finish: %s", peer, reason)

    # Calls of the TLS transport that reach us rather than the connection.

    def data_received(self, data: bytes) -> None:
        if self._connection is not None:
            self._connection.data_received(data)
        else:
            self._early.append(data)

    def eof_received(self) -> bool | None:
        if self._connection is not None:
            return self._connection.eof_received()
        self._eof = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._connection is not None:
            self._connection.connection_lost(exc)
        else:
            self._lost = (exc,)


def describe(exc: ssl.SSLError) -> str:
    """The reason of a failed handshake as OpenSSL names it, without Python's wrapping."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    return str(exc.reason or exc).replace("_", " ").lower()


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"
