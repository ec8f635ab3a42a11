"""A daemon connection on a blocking socket, for sync code: no event loop, one request at
a time, in the thread that opened it.

Theory of operation. ``protocol`` is sans-IO, so this shell drives the same encoder,
``FrameDecoder`` and ``Handshake`` as the event-loop client, over a plain socket: write a
request, read until its answer. It says HELLO with its thread's client id
(``sync_session``): nothing is ever addressed to it, but the daemon keeps the seqs of its
numbered group sends, which are written without waiting for an answer and confirmed
later (``group_send``); every frame read on the way is looked at for their CONFIRMs.

A connection left idle between two calls may have been closed by the daemon (a restart,
a shutdown): ``is_usable`` looks, without blocking, before it is used again, so a call
after a restart connects afresh instead of failing. A process made by ``fork()`` never
writes to its parent's socket: ``is_usable`` is False there, and closing the child's
copy of the descriptor leaves the parent's connection as it was.
"""

from __future__ import annotations

import itertools
import os
import random
import secrets
import select
import socket
import ssl
import time
import weakref
from typing import TypeAlias

from protocol import (
    FANOUT_VERSION,
    MAX_PUSH_FRAME_BYTES,
    NUMBERED_GROUP_SEND_VERSION,
    SENDER_BYTES,
    Confirm,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    GroupAdd,
    GroupDiscard,
    GroupSend,
    Handshake,
    Ok,
    ProtocolError,
    Role,
    Send,
    SendMany,
    Welcome,
    encode_frame,
)

from .connecting import (
    RECONNECT_FIRST_DELAY_S,
    RECONNECT_MAX_DELAY_S,
    closed_before_welcome,
    rotated,
    tls_failure,
)
from .errors import BrokerTLSError, BrokerUnavailable, exception_for, is_refusal
from .outages import Outages
from .settings import Host, LayerSettings, host_url
from .sync_session import SyncSession
from .unreachable import unreachable

__all__ = ["BlockingConnection", "Request"]

#: The frames a blocking connection sends: each answered by OK or ERROR.
Request: TypeAlias = Send | SendMany | GroupSend | GroupAdd | GroupDiscard
#: Bytes asked per read, under glibc's mmap threshold (else an mmap, mremap, munmap each).
READ_BYTES = 64 * 1024


class _Refused(Exception):
    """HELLO was answered by an ERROR that no other host or retry would change."""

    def __init__(self, error: Error) -> None:
        super().__init__(error.message)
        self.error = error


class _ClosedBeforeWelcome(ConnectionResetError):
    """The daemon closed the connection without answering HELLO."""


class BlockingConnection:
    """One socket to a daemon, past the handshake; used by one thread of one process."""

    __slots__ = (
        "__weakref__",
        "_poller",
        "_request_ids",
        "decoder",
        "max_message_bytes",
        "next_seq",
        "pid",
        "sender",
        "session",
        "sock",
    )

    def __init__(
        self, sock: socket.socket, decoder: FrameDecoder, welcome: Welcome, session: SyncSession
    ) -> None:
        self.sock = sock
        self.decoder = decoder
        self.max_message_bytes = welcome.max_message_bytes
        #: The thread's id, numbers and unconfirmed group sends: they outlive this socket.
        self.session = session
        session.numbers.numbers_groups = welcome.version >= NUMBERED_GROUP_SEND_VERSION
        session.numbers.dropping = False
        self.pid = os.getpid()
        self._request_ids = 0
        #: The ids of the messages sent here, as the event-loop client makes them
        #: (``protocol.with_message_id``): a process made by fork() opens its own.
        self.sender, self.next_seq = secrets.token_bytes(SENDER_BYTES), itertools.count(1).__next__
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)
        # A thread that ends drops its connection: the socket closes with it, unwarned.
        weakref.finalize(self, sock.close)

    @classmethod
    def open(
        cls, settings: LayerSettings, outages: Outages, session: SyncSession
    ) -> BlockingConnection:
        """A connection to the first of ``settings.hosts`` that answers. When none does,
        raises at once why (``unreachable``), as the layer's other calls do, unless the
        daemon was reachable within ``connect_timeout`` (``outages``: a restart): then it
        tries again, with backoff, until ``connect_timeout``. Raises at once what no
        retry changes: a TLS failure, or a refusal of the token or the settings."""
        started = time.monotonic()
        deadline = started + settings.connect_timeout_s
        failures: dict[Host, OSError] = {}
        delay = RECONNECT_FIRST_DELAY_S
        while True:
            for host in rotated(settings.hosts):
                timeout_s = _slice(settings, deadline)
                connection = cls._try(settings, host, timeout_s, failures, session, outages)
                if connection is not None:
                    outages.reached(host_url(host))
                    connection.resend()
                    return connection
            waited_s = time.monotonic() - started
            error = unreachable(settings.hosts, failures, _share_s(settings), waited_s)
            outages.unreachable(error)  # logged once per outage
            left_s = deadline - time.monotonic()
            if left_s <= 0 or not outages.is_restarting():
                raise error
            time.sleep(min(left_s, delay * random.uniform(0.5, 1.0)))
            delay = min(delay * 2, RECONNECT_MAX_DELAY_S)

    @classmethod
    def _try(
        cls,
        settings: LayerSettings,
        host: Host,
        timeout_s: float,
        failures: dict[Host, OSError],
        session: SyncSession,
        outages: Outages,
    ) -> BlockingConnection | None:
        """A connection to ``host``, or None with why in ``failures``."""
        sock: socket.socket | None = None
        try:
            sock = _dial(settings, host, timeout_s)
            decoder = FrameDecoder(MAX_PUSH_FRAME_BYTES)
            welcome = _greet(sock, settings, decoder, session, outages.version)
        except _Refused as refused:
            _close(sock)
            error = refused.error
            if (
                error.error_code is ErrorCode.UNSUPPORTED_VERSION
                and outages.version > FANOUT_VERSION
            ):
                outages.version = FANOUT_VERSION  # an older daemon: as the loops' clients
                return cls._try(settings, host, timeout_s, failures, session, outages)
            raise exception_for(error) from None
        except OSError as exc:
            _close(sock)
            hopeless = _hopeless(exc, host)
            if hopeless is not None:
                raise hopeless from exc
            failures[host] = exc
            return None
        sock.settimeout(None)  # an answer takes what the daemon takes, as on an event loop
        return cls(sock, decoder, welcome, session)

    def next_id(self) -> int:
        self._request_ids += 1
        return self._request_ids

    def is_usable(self) -> bool:
        """Ours (not inherited through ``fork()``) and not closed by the daemon since
        its last answer; reads, without blocking, what the daemon sent meanwhile."""
        if self.pid != os.getpid() or self.session.numbers.dropping:
            return False
        pending = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()
        if not pending and not self._poller.poll(0):
            return True
        self.sock.setblocking(False)
        try:
            data = self.sock.recv(READ_BYTES)
        except (BlockingIOError, ssl.SSLWantReadError):  # TLS records that carry no data
            return True
        except OSError:
            return False
        finally:
            self.sock.setblocking(True)
        if not data:
            return False
        self.decoder.receive_data(data)
        try:
            while (frame := self.decoder.next_frame()) is not None:
                if _is_farewell(frame):
                    return False
                self._take(frame)
        except ProtocolError:
            return False
        return True

    @property
    def numbers_group_sends(self) -> bool:
        numbers = self.session.numbers
        return numbers.numbers_groups and not numbers.dropping

    def group_send(self, group: str, payload: bytes) -> None:
        """Write a numbered GROUP_SEND, once fewer than the bound are unconfirmed (reading
        CONFIRMs until then); no answer is awaited. ``BrokerUnavailable`` if the
        connection fails (the group send stays unconfirmed: the next connection of this
        thread sends it again, and the daemon delivers it at most once)."""
        session = self.session
        try:
            while session.unconfirmed.is_full(len(payload)):
                self._take(self._next_frame())
            data = session.unconfirmed.number(session.numbers, group, payload)
            assert data is not None  # the caller saw ``numbers_group_sends``
            self.sock.sendall(data)
        except (OSError, ProtocolError) as exc:
            self.close()
            raise BrokerUnavailable(f"connection to the broker lost: {exc}") from exc
        except BaseException:
            self.close()  # interrupted mid-frame: out of step for good
            raise

    def settle(self, timeout_s: float) -> None:
        """Read until every group send is confirmed, or ``timeout_s`` has passed."""
        deadline = time.monotonic() + timeout_s
        try:
            while self.session.unconfirmed and (left_s := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left_s)
                self._take(self._next_frame())
        except (OSError, ProtocolError, BrokerUnavailable):
            pass  # what is left is sent again by this thread's next connection, if any

    def resend(self) -> None:
        """A new connection: the group sends the last one left unconfirmed, as requests
        with their seq, before anything new (their answers are read as they come)."""
        unconfirmed = self.session.unconfirmed
        if unconfirmed:
            numbered = self.session.numbers.numbers_groups
            frames = unconfirmed.resend(self.next_id, numbered)
            self.sock.sendall(b"".join(frame for _, frame in frames))

    def _take(self, frame: Frame) -> None:
        """A frame no caller waits for: a CONFIRM, or the answer to a group send sent
        again; a farewell is raised; anything else (Flushed) is for no caller of ours."""
        session = self.session
        if type(frame) is Confirm:
            session.unconfirmed.confirmed(frame, session.numbers)
        elif type(frame) is Error and frame.request_id == 0:
            raise exception_for(frame)
        elif type(frame) is Ok or type(frame) is Error:
            session.unconfirmed.answer(frame, session.numbers)

    def request(self, frame: Request) -> Ok | Error:
        """Write ``frame`` and return its answer. ``BrokerUnavailable`` if the connection
        fails on the way (the request may or may not have been carried out). The
        connection is closed then, or when anything interrupts the call, and an ERROR
        closing it is raised as its exception."""
        request_id = frame.request_id
        try:
            self.sock.sendall(encode_frame(frame))
            reply = self._answer(request_id)
        except (OSError, ProtocolError) as exc:
            self.close()
            raise BrokerUnavailable(f"connection to the broker lost: {exc}") from exc
        except BaseException:
            self.close()  # interrupted (a Celery time limit) mid-frame: out of step for good
            raise
        if isinstance(reply, Error) and reply.request_id != request_id:  # a farewell
            self.close()
            raise exception_for(reply)
        return reply

    def _answer(self, request_id: int) -> Ok | Error:
        """The answer to ``request_id``, or an ERROR that ends the connection."""
        while True:
            frame = self._next_frame()
            if isinstance(frame, Ok | Error) and frame.request_id == request_id:
                return frame
            if isinstance(frame, Error) and frame.request_id == 0:
                return frame  # a farewell: the daemon ends the connection
            self._take(frame)

    def _next_frame(self) -> Frame:
        decoder = self.decoder
        while (frame := decoder.next_frame()) is None:
            data = self.sock.recv(READ_BYTES)
            if not data:
                raise ConnectionResetError("the broker closed the connection")
            decoder.receive_data(data)
        return frame

    def close(self) -> None:
        """Close this process's descriptor (a fork's parent keeps its own connection)."""
        self.sock.close()


def _is_farewell(frame: Frame) -> bool:
    """An ERROR for the connection as a whole: the daemon closes it after this."""
    return type(frame) is Error and frame.request_id == 0


def _share_s(settings: LayerSettings) -> float:
    """How long one host may take: its share of ``connect_timeout``, so that one host
    that does not answer leaves time for the others."""
    return settings.connect_timeout_s / len(settings.hosts)


def _slice(settings: LayerSettings, deadline: float) -> float:
    return max(0.001, min(_share_s(settings), deadline - time.monotonic()))


def _dial(settings: LayerSettings, host: Host, timeout_s: float) -> socket.socket:
    """A socket connected to ``host``, TLS negotiated; raises ``OSError``."""
    scheme, address, port = host
    if scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout_s)
        try:
            sock.connect(address)
        except OSError:
            sock.close()
            raise
        return sock
    sock = socket.create_connection((address, port), timeout=timeout_s)
    # Nagle stays on: every write is answered (an OK, a run's CONFIRM), which brings its ACK,
    # so a burst of group sends leaves in a few segments, none held past an answer.
    tls = settings.tls_for(host)
    if tls is None:
        return sock
    try:
        return tls.wrap_socket(sock, server_hostname=address)
    except OSError:
        sock.close()
        raise


def _greet(
    sock: socket.socket,
    settings: LayerSettings,
    decoder: FrameDecoder,
    session: SyncSession,
    version: int,
) -> Welcome:
    """Say HELLO (in ``version``) and return the WELCOME; raises ``_Refused`` for a
    refusal, ``OSError`` (``BrokerUnavailable`` for a daemon that cannot serve now)
    otherwise."""
    identity = session.identity
    hello = settings.hello(identity.client_id, identity.secret, version=version)
    sock.sendall(encode_frame(hello))
    try:
        while (frame := decoder.next_frame()) is None:
            data = sock.recv(READ_BYTES)
            if not data:
                raise _ClosedBeforeWelcome("the broker closed the connection before WELCOME")
            decoder.receive_data(data)
        Handshake(Role.CLIENT).receive(frame)
    except ProtocolError as exc:  # another server listens there (HTTP: "a frame of 1.2 GB")
        raise BrokerUnavailable(f"not a channels-broker daemon ({exc})") from exc
    if type(frame) is Error:
        if is_refusal(frame, at_hello=True):
            raise _Refused(frame)
        raise BrokerUnavailable(frame.message)
    assert type(frame) is Welcome  # the handshake lets nothing else through
    return frame


def _hopeless(exc: OSError, host: Host) -> BrokerTLSError | None:
    """``exc`` as a TLS failure no retry fixes, or None."""
    where = host_url(host)
    if host[0] == "tls" and isinstance(exc, _ClosedBeforeWelcome):
        return closed_before_welcome(where)
    return tls_failure(exc, where)


def _close(sock: socket.socket | None) -> None:
    if sock is not None:
        sock.close()
