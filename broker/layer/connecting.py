"""Reaching a daemon: its hosts from a random one, backoff between rounds, TLS, why no
host answered, and taking over a connection a closed event loop parked (see ``parking``).

A host that refuses the connection or does not answer is tried again, with backoff,
until the caller's ``connect_timeout``: a daemon that restarts or starts beside its
clients (systemd, a container) is back within it, and the layer rides through. A TLS
failure that no retry can fix (a certificate not trusted, a hostname mismatch, a
client certificate refused, a daemon without TLS) ends the wait at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Callable
from typing import TypeVar

from protocol import Handshake, State

from .errors import BrokerTLSError, BrokerUnavailable
from .parking import ParkedConnection
from .settings import Host, LayerSettings, host_url

__all__ = [
    "RECONNECT_FIRST_DELAY_S",
    "RECONNECT_MAX_DELAY_S",
    "Dialer",
    "adopt",
    "rotated",
    "tls_failure",
    "tls_refusal",
]

log = logging.getLogger("channels_broker.layer")

#: Reconnect backoff: first delay, cap, in seconds; each attempt is jittered, so the
#: processes of a site that lost their daemon do not all come back in the same instant.
RECONNECT_FIRST_DELAY_S = 0.05
RECONNECT_MAX_DELAY_S = 2.0

#: OpenSSL's verify results that mean the certificate names another host.
_NAME_MISMATCHES = (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
#: TLS alerts of a daemon that refused the layer's client certificate (or its absence).
_CLIENT_CERTIFICATE_REFUSALS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "it requires a client certificate",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "the handshake failed (a client certificate required?)",
    "TLSV1_ALERT_UNKNOWN_CA": "it does not trust the CA of the layer's client certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "it refused the layer's client certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "it refused the layer's client certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the layer's client certificate has expired",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "the layer's client certificate is revoked",
}
_CLIENT_CERTIFICATE_HINT = (
    "give the layer an ssl_context with load_cert_chain(cert, key), a certificate"
    " signed by the daemon's --tls-client-ca"
)

_P = TypeVar("_P", bound=asyncio.Protocol)


class Dialer:
    """How one event loop's client reaches a daemon, and why it did not."""

    def __init__(self, settings: LayerSettings, loop: asyncio.AbstractEventLoop) -> None:
        self.settings = settings
        self.loop = loop
        #: Each host's latest failure, for the error of a connect that timed out.
        self.failures: dict[Host, OSError] = {}

    async def connect(self, factory: Callable[[], _P]) -> _P:
        """A connection to the first host that answers; tries again, with backoff,
        until cancelled (the caller bounds the wait). Raises ``BrokerTLSError`` if no
        host answered and one failed TLS for a reason no retry fixes."""
        delay = RECONNECT_FIRST_DELAY_S
        while True:
            hopeless: BrokerTLSError | None = None
            for host in rotated(self.settings.hosts):
                try:
                    conn = await _open(self.settings, self.loop, host, factory)
                except OSError as exc:
                    log.debug("cannot connect to %s: %s", host_url(host), exc)
                    self.failures[host] = exc
                    hopeless = hopeless or tls_failure(exc, host_url(host))
                else:
                    self.failures.clear()
                    return conn
            if hopeless is not None:
                raise hopeless
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, RECONNECT_MAX_DELAY_S)

    async def wait(self, connecting: asyncio.Future[_P]) -> _P:
        """The connection ``connecting`` makes, if it comes within ``connect_timeout``
        (``connecting`` goes on after a timeout, for the next caller); else
        ``BrokerUnavailable`` naming each host and why it did not answer."""
        try:
            timeout = self.settings.connect_timeout_s
            return await asyncio.wait_for(asyncio.shield(connecting), timeout)
        except TimeoutError:
            raise self.unreachable() from None

    def unreachable(self) -> BrokerUnavailable:
        """The error of a connect that found no daemon within ``connect_timeout``: each
        host and why (a refused connection says so: no daemon listens there)."""
        reasons = [_why(host_url(host), self.failures.get(host)) for host in self.settings.hosts]
        timeout = self.settings.connect_timeout_s
        return BrokerUnavailable(f"no broker reachable within {timeout:g} s: {'; '.join(reasons)}")


async def _open(
    settings: LayerSettings,
    loop: asyncio.AbstractEventLoop,
    host: Host,
    factory: Callable[[], _P],
) -> _P:
    scheme, address, port = host
    if scheme == "unix":
        _, conn = await loop.create_unix_connection(factory, address)
    else:
        tls = settings.tls_for(host)
        transport, conn = await loop.create_connection(factory, address, port, ssl=tls)
        if transport.is_closing():  # closed as soon as it opened: conn will not hear of it
            refused = tls_refusal(None, transport)
            raise refused or ConnectionResetError(f"{host_url(host)} closed the connection")
    return conn


def tls_refusal(
    exc: Exception | None,
    transport: asyncio.BaseTransport | None,
    handshake: Handshake | None = None,
) -> BrokerTLSError | None:
    """Why the daemon ended a TLS connection for good, or None if it was a mere loss.

    A connection the daemon closed with no TLS error before answering HELLO
    (``handshake`` still awaits WELCOME, or there is none yet) was refused for its
    client certificate: asyncio's TLS server closes without sending its alert. (A
    daemon that refuses a client for any other reason says so in an ERROR frame.)
    """
    tls = None if transport is None else transport.get_extra_info("ssl_object")
    if tls is None:
        return None
    where = tls.server_hostname or "the daemon"  # the host as `hosts` names it
    if isinstance(exc, ssl.SSLError):
        return tls_failure(exc, where)
    if handshake is None or handshake.state is State.AWAIT_WELCOME:
        return BrokerTLSError(
            f"TLS to {where} refused by the daemon before HELLO: it requires a client"
            " certificate (none given, or one its --tls-client-ca did not sign); "
            + _CLIENT_CERTIFICATE_HINT
        )
    return None


def tls_failure(exc: BaseException | None, where: str) -> BrokerTLSError | None:
    """``exc`` as the TLS failure it is, if trying again cannot fix it; else None.

    Covers the handshake's own errors and the alert a daemon sends after it, when it
    refuses the client certificate (TLS 1.3 sends that alert after the client's last
    handshake message, so the layer sees it when reading its first answer).
    """
    if isinstance(exc, BrokerTLSError):
        return exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code in _NAME_MISMATCHES:
            return BrokerTLSError(
                f"TLS to {where} failed: hostname mismatch ({exc.verify_message}): the"
                " daemon's certificate must name the host written in `hosts`"
            )
        return BrokerTLSError(
            f"TLS to {where} failed: the daemon's certificate is not trusted"
            f" ({exc.verify_message}): give the layer an ssl_context that trusts the CA"
            " that signed it, as ssl.create_default_context(cafile=...)"
        )
    reason = exc.reason if isinstance(exc, ssl.SSLError) else None
    if reason in _CLIENT_CERTIFICATE_REFUSALS:
        refusal = _CLIENT_CERTIFICATE_REFUSALS[reason]
        return BrokerTLSError(
            f"TLS to {where} refused by the daemon: {refusal}; {_CLIENT_CERTIFICATE_HINT}"
        )
    if reason == "WRONG_VERSION_NUMBER":
        return BrokerTLSError(
            f"TLS to {where} failed: the daemon does not speak TLS there (no --tls-cert?"
            " then write tcp:// in `hosts`)"
        )
    return None


def _why(where: str, exc: OSError | None) -> str:
    if exc is None:
        return f"no answer from {where}"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused at {where}: is `channels-broker serve` running?"
    if isinstance(exc, FileNotFoundError):
        return f"no socket at {where}: is `channels-broker serve` running?"
    return f"{where}: {exc.strerror or exc}"


async def adopt(
    parked: ParkedConnection, loop: asyncio.AbstractEventLoop, factory: Callable[[], _P]
) -> _P:
    """Take over the socket of a parked connection: no connect, no HELLO."""
    _, conn = await loop.create_connection(factory, sock=parked.sock)
    return conn


def rotated(hosts: tuple[Host, ...]) -> list[Host]:
    """Hosts starting at a random one, so clients spread over several daemons."""
    start = random.randrange(len(hosts))
    return [*hosts[start:], *hosts[:start]]
