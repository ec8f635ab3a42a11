"""What the attack tests of the daemon's bounds share: raw sockets, a PING probe that
times the daemon for another client while an attack runs, and the daemon's RSS.

A bound is shown to hold against a real daemon process: the attack runs as the issue
describes it, and meanwhile another client's PING is answered within ``PING_BOUND_S``
and the daemon's resident memory stays under what the bounds allow.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from protocol import (
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
    Hello,
    Ping,
    Pong,
    Welcome,
    encode_frame,
)
from tests.broker.http_client import http_get

__all__ = [
    "IO_TIMEOUT_S",
    "PING_BOUND_S",
    "Flood",
    "PingProbe",
    "RawClient",
    "limit_hits",
    "pinging",
    "rss_bytes",
]

#: How long another client's PING may take while an attack runs (issue 14).
PING_BOUND_S = 0.050
#: Pause between two PINGs of the probe: a dozen a second samples a stall of 50 ms.
PING_EVERY_S = 0.02
#: How long an answer the test waits for may take (a failure, not a pause).
IO_TIMEOUT_S = 10.0


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` (VmRSS of /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def limit_hits(broker: Any) -> dict[str, float]:
    """channels_broker_limit_hits_total by limit, and accept errors and connections,
    from /metrics."""
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


class RawClient:
    """A socket to the daemon that sends only what the test writes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder(1 << 30)
        self.client_id = ""

    @classmethod
    async def open(
        cls, address: tuple[str, int], *, source: str | None = None, receive_buffer: int = 0
    ) -> RawClient:
        """Connect from ``source`` (an address of this host, e.g. 127.0.0.2), with a small
        ``receive_buffer`` if given (so the kernel holds little of what is not read)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        if source is not None:
            sock.bind((source, 0))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, address)
        reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer)

    async def hello(self, capacity: int = 100) -> Welcome:
        self.send(Hello(PROTOCOL_VERSION, "", "", "asgi", capacity, 60.0, 86400.0))
        welcome = await self.next_frame()
        assert isinstance(welcome, Welcome), welcome
        self.client_id = welcome.client_id
        return welcome

    def own(self, local: str = "x") -> str:
        """A process-specific channel of this client: what the daemon pushes to it."""
        return f"asgi.{self.client_id}!{local}"

    def send(self, frame: Frame) -> None:
        self.writer.write(encode_frame(frame))

    async def next_frame(self, timeout_s: float = IO_TIMEOUT_S) -> Frame:
        while (frame := self.decoder.next_frame()) is None:
            data = await asyncio.wait_for(self.reader.read(1 << 20), timeout_s)
            assert data, "the daemon closed the connection"
            self.decoder.receive_data(data)
        return frame

    async def frames_until_closed(self, timeout_s: float = IO_TIMEOUT_S) -> list[Frame]:
        """Every frame the daemon still sends, then its close (EOF or reset)."""
        async with asyncio.timeout(timeout_s):
            while True:
                try:
                    data = await self.reader.read(1 << 20)
                except ConnectionResetError:
                    break
                if not data:
                    break
                self.decoder.receive_data(data)
        frames = []
        while (frame := self.decoder.next_frame()) is not None:
            frames.append(frame)
        return frames

    def close(self) -> None:
        self.writer.close()


class Flood:
    """An attacker that writes one frame over and over from a thread of its own (a
    blocking socket: the test's loop, which times the probe, never copies its bytes),
    never reading. ``stop`` cuts the connection (a reset, as a killed client's)."""

    def __init__(self, address: tuple[str, int], *, receive_buffer: int = 4096) -> None:
        self.sock = socket.create_connection(address, timeout=IO_TIMEOUT_S)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sent = 0
        self._thread: threading.Thread | None = None

    def hello(self) -> str:
        """Say HELLO; return the client id the daemon gave (blocking, before the flood)."""
        self.sock.sendall(encode_frame(Hello(PROTOCOL_VERSION, "", "", "asgi", 100, 60.0, 86400.0)))
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
            self._thread.join(IO_TIMEOUT_S)
        self.sock.close()


class PingProbe:
    """Another client that PINGs the daemon all along and keeps the slowest answer.

    It runs in a thread with an event loop of its own, so that what the test does in
    its own loop meanwhile (reading a flood of answers) is not timed as the daemon's.
    """

    #: PINGs a probe makes at least, however short the attack.
    MIN_PINGS = 10

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.slowest_s = 0.0
        self.pings = 0
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self.enough = threading.Event()
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    def start(self) -> None:
        self._thread.start()
        assert self.ready.wait(IO_TIMEOUT_S), "the probe did not connect"

    def finish(self) -> None:
        """Stop once ``MIN_PINGS`` were made; raise what failed in the probe, if anything."""
        self.enough.wait(IO_TIMEOUT_S)
        self.stop.set()
        self._thread.join(IO_TIMEOUT_S)
        if self.error is not None:
            raise AssertionError(f"the PING probe failed: {self.error!r}") from self.error
        assert self.pings >= self.MIN_PINGS, f"the probe made only {self.pings} PINGs"

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # handed to the test by finish()
            self.error = exc
        finally:
            self.ready.set()
            self.enough.set()

    async def _run(self) -> None:
        client = await RawClient.open(self.address)
        await client.hello()
        self.ready.set()
        request_id = 0
        try:
            while not self.stop.is_set():
                request_id += 1
                started = time.perf_counter()
                client.send(Ping(request_id))
                pong = await client.next_frame()
                self.slowest_s = max(self.slowest_s, time.perf_counter() - started)
                assert pong == Pong(request_id), pong
                self.pings += 1
                if self.pings >= self.MIN_PINGS:
                    self.enough.set()
                await asyncio.sleep(PING_EVERY_S)
        finally:
            client.close()


@asynccontextmanager
async def pinging(address: tuple[str, int]) -> AsyncIterator[PingProbe]:
    """A ``PingProbe`` running for the block, and after it until it made ``MIN_PINGS``."""
    probe = PingProbe(address)
    await asyncio.to_thread(probe.start)
    try:
        yield probe
    finally:
        await asyncio.to_thread(probe.finish)
