"""What the attack tests of the daemon's bounds share: clients that bind an address or
keep a small receive buffer, a flood from a thread, the daemon's RSS, and its limit
counters.

A bound is shown to hold against a real daemon process: the attack runs as issue 14
describes it, and meanwhile another client's PING is answered within the bound
(``tests.ping_probe``) and the daemon's resident memory stays under what the bounds allow.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from protocol import Frame, FrameDecoder, Welcome, encode_frame
from tests.broker.http_client import http_get
from tests.broker.raw_client import RawClient, hello
from tests.waits import DELIVERY_TIMEOUT_S

__all__ = ["Client", "Flood", "flags", "limit_hits", "rss_bytes"]


def flags(**options: object) -> tuple[str, ...]:
    """``serve`` flags for ``broker_factory(extra_args=...)``: ``max_pulls=10`` is
    ``--max-pulls 10``."""
    return tuple(
        arg
        for name, value in options.items()
        for arg in ("--" + name.replace("_", "-"), str(value))
    )


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` (VmRSS of /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def limit_hits(broker: Any) -> dict[str, float]:
    """channels_broker_limit_hits_total by limit, and ``accept-errors`` and
    ``connections``, from /metrics."""
    text = http_get(broker.metrics_port, "/metrics")[1].decode()
    hits: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "channels_broker_limit_hits_total":
                hits[sample.labels["limit"]] = sample.value
            elif sample.name == "channels_broker_accept_errors_total":
                hits["accept-errors"] = sample.value
            elif sample.name == "channels_broker_connections":
                hits["connections"] = sample.value
    return hits


class Client(RawClient):
    """A raw client that may connect from a given address, with a small receive buffer
    (so that the kernel holds little of what it does not read), and large frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Not RawClient's: its local port is a TCP socket's, and this one may be a unix one.
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder(1 << 30)
        self.client_id = ""

    @classmethod
    async def connect(
        cls, address: tuple[str, int], *, source: str | None = None, receive_buffer: int = 0
    ) -> Client:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        if source is not None:
            sock.bind((source, 0))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, address)
        reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer)

    async def hello(self) -> Welcome:
        await self.write(hello())
        welcome = await self.next_frame()
        assert isinstance(welcome, Welcome), welcome
        self.client_id = welcome.client_id
        return welcome

    def own(self, local: str = "x") -> str:
        """A process-specific channel of this client: what the daemon pushes to it."""
        return f"asgi.{self.client_id}!{local}"

    def send(self, frame: Frame) -> None:
        """Queue ``frame`` for writing (``writer.drain`` waits for it to go)."""
        self.writer.write(encode_frame(frame))


class Flood:
    """An attacker that writes one frame over and over from a thread of its own (a
    blocking socket: the test's loop never copies its bytes), never reading. ``stop``
    cuts the connection with a reset, as a killed client's."""

    def __init__(self, address: tuple[str, int], *, receive_buffer: int = 4096) -> None:
        self.sock = socket.create_connection(address, timeout=DELIVERY_TIMEOUT_S)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sent = 0
        self._thread: threading.Thread | None = None

    def hello(self) -> str:
        """Say HELLO; return the client id the daemon gave (before the flood)."""
        self.sock.sendall(hello())
        decoder = FrameDecoder()
        while (welcome := decoder.next_frame()) is None:
            decoder.receive_data(self.sock.recv(65536))
        assert isinstance(welcome, Welcome), welcome
        return welcome.client_id

    def start(self, frame: bytes, count: int) -> None:
        self.sock.settimeout(None)
        self._thread = threading.Thread(target=self._send, args=(frame, count), daemon=True)
        self._thread.start()

    def _send(self, frame: bytes, count: int) -> None:
        try:
            for _ in range(count):
                self.sock.sendall(frame)
                self.sent += 1
        except OSError:
            pass  # stopped

    def stop(self) -> None:
        linger = (1).to_bytes(4, "little") + (0).to_bytes(4, "little")
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        self.sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(DELIVERY_TIMEOUT_S)
        self.sock.close()
