"""Quiet daemon connections handed from a closing event loop to the next one.

``async_to_sync`` makes a loop per call; without this every call from sync code
would pay a TCP connect and a HELLO.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from typing import Any, Protocol

from .identity import Identity
from .window import SendWindow

__all__ = ["IdlePool", "ParkedConnection", "Parking", "park", "park_quietly"]


class Parking(Protocol):
    """What parking needs of a closing loop's client (``client.LoopClient``)."""

    conn: Any
    identity: Identity
    max_message_bytes: int
    window: SendWindow
    #: It gave out a channel name with its id: its pushes must not go to another loop.
    minted: bool

    @property
    def is_quiet(self) -> bool: ...

    def _flush(self) -> None: ...


class ParkedConnection:
    """A live daemon connection between two event loops of one process."""

    __slots__ = ("identity", "max_message_bytes", "pid", "sock", "unread", "window")

    def __init__(
        self,
        sock: socket.socket,
        identity: Identity,
        unread: bytes,
        max_message_bytes: int,
        window: tuple[int, int, bool],
    ) -> None:
        self.sock = sock
        #: The session's id and its secret: the next loop reconnects with them if need be.
        self.identity = identity
        self.unread = unread
        self.max_message_bytes = max_message_bytes
        #: The send window WELCOME agreed, the id's latest send number (the daemon
        #: took every one up to it): the next loop's numbers go on from there; and
        #: whether WELCOME agreed numbered group sends.
        self.window = window
        self.pid = os.getpid()

    def is_alive(self) -> bool:
        """Open and ours: not closed by the daemon, not inherited through fork()."""
        if self.pid != os.getpid():
            return False
        try:
            peeked = self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            peeked = b""
        if not peeked:
            self.sock.close()
        return bool(peeked)


class IdlePool:
    """Parked connections of one layer, shared by the threads that run loops."""

    #: Parked connections kept; more concurrent sync callers open their own.
    SIZE = 4

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parked: list[ParkedConnection] = []

    def put(self, parked: ParkedConnection) -> bool:
        with self._lock:
            if len(self._parked) >= self.SIZE:
                return False
            self._parked.append(parked)
            return True

    def take(self) -> ParkedConnection | None:
        with self._lock:
            return self._parked.pop() if self._parked else None

    def close_all(self) -> None:
        with self._lock:
            parked, self._parked = self._parked, []
        for connection in parked:
            connection.sock.close()


def park_quietly(client: Parking, pool: IdlePool) -> bool:
    """Keep a closing loop's connection for the next loop, if it is quiet; True if kept.

    Its send room goes back first: the next loop starts with none.
    """
    conn, window = client.conn, client.window
    if conn is None or conn.transport is None or client.minted or window.unsettled:
        return False
    if not client.is_quiet:
        return False
    window.give_back_all()
    client._flush()  # acknowledgements still owed, and the room given back
    parked = ParkedConnection(
        conn.transport.get_extra_info("socket"),
        client.identity,
        conn.decoder.unread(),
        client.max_message_bytes,
        (window.size, window.last_seq, window.numbers_groups),
    )
    if not park(conn.transport, parked, pool):
        return False
    client.conn = None
    return True


def park(transport: asyncio.Transport, parked: ParkedConnection, pool: IdlePool) -> bool:
    """Hand the socket of a quiet connection to ``pool``; True if it left the transport.

    The socket is duplicated, so the transport's abort leaves the connection (and its
    daemon session) open for the next loop. Nothing may wait to be written. A TLS
    connection is not parked: its session lives in the transport, not in the socket.
    """
    if transport.get_write_buffer_size() or transport.get_extra_info("ssl_object"):
        return False
    parked.sock = parked.sock.dup()
    if not pool.put(parked):
        parked.sock.close()
    transport.abort()
    return True
