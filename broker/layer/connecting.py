"""Reaching a daemon: its hosts from a random one, backoff between rounds, TLS, how long
each caller waits, and taking over a connection a closed event loop parked (``parking``).

A receive waits for the daemon however long it is away (a worker must outlive an
outage), reconnecting with backoff. A send, a group_send and every other call cannot
wait long (a view would hang): when a round of hosts fails they raise at once why
(``unreachable``), unless the daemon was reachable within ``connect_timeout``
(``Outages.is_restarting``: a restart, as systemd or a container does it): then they
wait for it up to ``connect_timeout``. A TLS failure that no retry can fix (a
certificate not trusted, a hostname mismatch, a client certificate refused, a daemon
without TLS) ends every wait at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import ssl
from collections.abc import Callable
from typing import TypeVar

from protocol import Handshake, State

from .errors import (
    BrokerCertificateNotTrusted,
    BrokerHostnameMismatch,
    BrokerTLSError,
    BrokerUnavailable,
    LayerClosed,
)
from .outages import Outages
from .parking import ParkedConnection
from .settings import Host, LayerSettings, host_url
from .unreachable import unreachable

__all__ = [
    "RECONNECT_FIRST_DELAY_S",
    "RECONNECT_MAX_DELAY_S",
    "Dialer",
    "adopt",
    "closed_before_welcome",
    "rotated",
    "tls_failure",
    "tls_refusal",
]

log = logging.getLogger("channels_broker.layer")

#: Reconnect backoff: first delay, cap, in seconds; each pause is jittered (half to all
#: of the delay), so the processes of a site that lost their daemon do not all come back
#: in the same instant. While a call waits for a restarting daemon, pauses are no longer
#: than the first: it goes through as soon as the daemon is back, not up to 2 s after
#: (past its connect_timeout, if the daemon came back late in it).
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

_P = TypeVar("_P", bound=asyncio.BaseProtocol)


class Dialer:
    """How one event loop's client reaches a daemon, and why it did not.

    One connect (``connect``, a task of the client's) goes round the hosts until one
    answers, with backoff between rounds; callers wait for it in ``wait``: receives
    never give up, other calls give up at once on a daemon that is down, or after
    ``connect_timeout`` on one that is restarting. The connect goes on after they gave
    up (until its loop closes), so the next call may find the daemon back.
    """

    def __init__(
        self,
        settings: LayerSettings,
        loop: asyncio.AbstractEventLoop,
        outages: Outages | None = None,
    ) -> None:
        self.settings = settings
        self.loop = loop
        #: The layer's, shared by its loops: is the daemon restarting, or down?
        self.outages = outages or Outages(settings.connect_timeout_s, RECONNECT_MAX_DELAY_S)
        #: Each host's latest failure, for the error of a connect that found no daemon.
        self.failures: dict[Host, OSError] = {}
        #: Resolved when the round of hosts under way fails; then replaced.
        self._round: asyncio.Future[None] = loop.create_future()
        #: Set to cut the pause between two rounds short.
        self._hurry = asyncio.Event()
        #: Calls that cannot wait long (``wait``, not patient) waiting for a connection.
        self._impatient = 0

    async def connect(self, factory: Callable[[], _P]) -> _P:
        """A connection to the first host that answers; tries again, with backoff, until
        cancelled. Raises ``BrokerTLSError`` if no host answered and one failed TLS for a
        reason no retry fixes."""
        delay = RECONNECT_FIRST_DELAY_S
        while True:
            conn = await self._round_of_hosts(factory)
            if conn is not None:
                return conn
            self._end_round()
            pause = min(delay, RECONNECT_FIRST_DELAY_S) if self._impatient else delay
            await self._pause(pause * random.uniform(0.5, 1.0))
            delay = min(delay * 2, RECONNECT_MAX_DELAY_S)

    async def _round_of_hosts(self, factory: Callable[[], _P]) -> _P | None:
        hopeless: BrokerTLSError | None = None
        timeout_s = self.settings.connect_timeout_s
        for host in rotated(self.settings.hosts):
            try:
                conn = await asyncio.wait_for(
                    _open(self.settings, self.loop, host, factory), timeout_s
                )
                _still_open(conn, host)
            except OSError as exc:  # TimeoutError too: no answer within connect_timeout
                log.debug("cannot connect to %s: %s", host_url(host), exc)
                self.failures[host] = exc
                hopeless = hopeless or tls_failure(exc, host_url(host))
            else:
                self.failures.clear()
                self.outages.reached(host_url(host))
                return conn
        if hopeless is not None:
            raise hopeless
        return None

    def _end_round(self) -> None:
        self.outages.unreachable(self.unreachable())  # logged once per outage
        ended, self._round = self._round, self.loop.create_future()
        ended.set_result(None)

    async def _pause(self, delay_s: float) -> None:
        self._hurry.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._hurry.wait(), delay_s)

    async def wait(self, connecting: asyncio.Task[_P], patient: bool = False) -> _P:
        """The connection ``connecting`` makes. ``patient`` (a receive) waits however long
        it takes. Else (a call that cannot wait long) a round of hosts starts at once, and
        if it fails, the unreachable error is raised, unless the daemon is restarting
        (``Outages.is_restarting``): then the call waits for it until ``connect_timeout``.
        ``connecting`` goes on after, as long as anyone needs it."""
        if patient:
            return await self._wait_patiently(connecting)
        started = self.loop.time()
        deadline = started + self.settings.connect_timeout_s
        self._hurry.set()  # a fresh round now, not after the backoff pause
        self._impatient += 1  # and the next ones soon: a restarting daemon is found at once
        try:
            while not connecting.done():
                round_ = self._round
                timeout_s = max(deadline - self.loop.time(), 0)
                await asyncio.wait(
                    (connecting, round_), timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
                )
                if connecting.done():
                    break
                if not round_.done() or not self.outages.is_restarting():
                    raise self.unreachable(self.loop.time() - started)
        finally:
            self._impatient -= 1
        return _result(connecting)

    async def _wait_patiently(self, connecting: asyncio.Task[_P]) -> _P:
        await asyncio.wait((connecting,))
        return _result(connecting)

    def unreachable(self, waited_s: float = 0.0) -> BrokerUnavailable:
        """Why no host answered: each host and what it met, with what to do."""
        return unreachable(
            self.settings.hosts, self.failures, self.settings.connect_timeout_s, waited_s
        )


def _result(connecting: asyncio.Task[_P]) -> _P:
    if connecting.cancelled():  # by close(), while we waited
        raise LayerClosed("the layer was closed on this event loop")
    return connecting.result()


async def _open(
    settings: LayerSettings,
    loop: asyncio.AbstractEventLoop,
    host: Host,
    factory: Callable[[], _P],
) -> _P:
    scheme, address, port = host
    try:
        if scheme == "unix":
            _, conn = await loop.create_unix_connection(factory, address)
            return conn
        tls = settings.tls_for(host)
        _, conn = await loop.create_connection(factory, address, port, ssl=tls)
    except ConnectionResetError as exc:
        # Reset before the connect returned: the listener closed with this connection
        # in its queue (a daemon stopping or killed; on a loaded machine the loop looks
        # at the connect only after the kernel reset it). Nothing listens there now.
        raise ConnectionRefusedError(
            errno.ECONNREFUSED, f"{host_url(host)} reset the connection as it was made"
        ) from exc
    return conn


def _still_open(conn: asyncio.BaseProtocol, host: Host) -> None:
    """Raise if ``conn`` closed as soon as it opened. Checked where its client takes it,
    with no await between: its ``connection_lost`` came before the client knew it, so
    nothing else will tell (``wait_for`` runs ``_open`` as a task of its own, and a loop
    pass between its end and the client meant a dead connection kept, and calls waiting
    on it for ever)."""
    transport = getattr(conn, "transport", None)
    if transport is not None and transport.is_closing():
        refused = tls_refusal(None, transport)
        if refused is not None:
            raise refused
        handshake: Handshake | None = getattr(conn, "handshake", None)
        if handshake is not None and handshake.state is State.AWAIT_WELCOME:
            # Closed with not a frame said (a daemon refusing says why): reset as it was
            # made, by a listener closing with it in its queue, as ``_open`` meets it too.
            raise ConnectionRefusedError(
                errno.ECONNREFUSED, f"{host_url(host)} reset the connection as it was made"
            )
        raise ConnectionResetError(f"{host_url(host)} closed the connection")


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
        return closed_before_welcome(where)
    return None


def closed_before_welcome(where: str) -> BrokerTLSError:
    """A TLS connection the daemon closed, with no TLS error, before answering HELLO:
    refused for its client certificate (asyncio's TLS server closes without its alert)."""
    return BrokerTLSError(
        f"TLS to {where} refused by the daemon before HELLO: it requires a client"
        " certificate (none given, or one its --tls-client-ca did not sign); "
        + _CLIENT_CERTIFICATE_HINT
    )


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
            return BrokerHostnameMismatch(
                f"TLS to {where} failed: hostname mismatch ({exc.verify_message}): the"
                " daemon's certificate must name the host written in `hosts`"
            )
        return BrokerCertificateNotTrusted(
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
