"""A TCP proxy in front of a daemon (or a storage server) whose connections a test can
cut or stall, mid-stream.

``cut()`` aborts every connection it carries, both ways at once: what a network fault
does. Bytes read from one side and not yet written to the other are lost with it, as
are those still in the kernel's buffers. The proxy keeps listening, so a layer that
reconnects gets a new connection through it. ``stall()`` holds every byte, both ways,
until ``resume()``: what a congested or partitioned network does, connections left
open; ``stall_replies()`` holds only what comes back from upstream (requests arrive and
are carried out, their answers wait); ``stall_replies_after(marker)`` does that from the
moment a request carrying ``marker`` went up (that request is carried out, its answer
waits), and sets ``stalled``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

__all__ = ["CutProxy"]


class CutProxy:
    """Forwards ``127.0.0.1:<port>`` to ``upstream``; ``cut()`` drops what it carries."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self.connections = 0  # made through it so far
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._carriers: set[asyncio.Task[None]] = set()
        self._upward = asyncio.Event()  # bytes toward upstream may flow
        self._downward = asyncio.Event()  # bytes from upstream may flow
        #: Bytes whose passage upward stalls what comes down (``stall_replies_after``).
        self._marker = b""
        #: Set once a request carrying the marker went up, and replies are held.
        self.stalled = asyncio.Event()
        self.resume()

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._carry, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        """Abort every connection now (the layer sees a reset, the daemon too)."""
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def stall(self) -> None:
        """Hold what either side sends (it goes on once ``resume`` is called)."""
        self._upward.clear()
        self._downward.clear()

    def stall_replies(self) -> None:
        """Hold what upstream sends (until ``resume``); requests still reach it."""
        self._downward.clear()

    def stall_replies_after(self, marker: bytes) -> None:
        """Hold what upstream sends (until ``resume``) once a request carrying ``marker``
        has gone up: that request is carried out, its answer waits."""
        self.stalled.clear()
        self._marker = marker

    def resume(self) -> None:
        self._marker = b""
        self._upward.set()
        self._downward.set()

    async def close(self) -> None:
        """Stop listening and cut what it carries; return once every connection ended."""
        if self._server is not None:
            self._server.close()
        self.resume()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._carriers, return_exceptions=True)

    async def _carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        carrier = asyncio.current_task()
        assert carrier is not None
        self._carriers.add(carrier)
        try:
            await self._carry_on(reader, writer)
        finally:
            writer.transport.abort()
            self._carriers.discard(carrier)

    async def _carry_on(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            return
        self.connections += 1
        self._writers |= {writer, up_writer}
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer, self._upward, self._watch)),
            asyncio.create_task(self._pipe(up_reader, writer, self._downward)),
        ]
        self._tasks.update(pipes)
        await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        for writer_ in (writer, up_writer):
            writer_.transport.abort()
            self._writers.discard(writer_)
        for pipe in pipes:
            pipe.cancel()
            self._tasks.discard(pipe)

    def _watch(self, data: bytes) -> None:
        """``data`` went up: hold the replies from now on if it carries the marker."""
        if self._marker and self._marker in data:
            self._downward.clear()  # before the reply can come: it is read in a later pass
            self.stalled.set()

    @staticmethod
    async def _pipe(
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        flowing: asyncio.Event,
        sent: Callable[[bytes], None] = lambda _data: None,
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                await flowing.wait()
                writer.write(data)
                sent(data)
                await writer.drain()
