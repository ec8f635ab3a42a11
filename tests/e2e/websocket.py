"""A WebSocket client as small as a test needs (RFC 6455): text frames in and out, pings
answered, over asyncio streams; no browser, no package. What it talks to is real: Daphne
serving the example site's consumers."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
from typing import Any

__all__ = ["WebSocket"]

_TEXT, _CLOSE, _PING, _PONG = 0x1, 0x8, 0x9, 0xA


class WebSocket:
    """One client connection; ``messages`` gets each text frame the server sends."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.messages: asyncio.Queue[str] = asyncio.Queue()
        #: Done when the server closes the connection: its close code (None: no frame).
        self.closed: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._reading = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, host: str, port: int, path: str, headers: dict[str, str]) -> WebSocket:
        """Open ``ws://host:port/path`` with extra ``headers`` (Cookie, Origin)."""
        reader, writer = await asyncio.open_connection(host, port)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {host}:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        answer = await reader.readuntil(b"\r\n\r\n")
        if not answer.startswith(b"HTTP/1.1 101"):
            writer.close()
            raise ConnectionError(f"the server refused the WebSocket: {answer!r}")
        return cls(reader, writer)

    async def receive_json(self, timeout_s: float) -> Any:
        """The next text frame, decoded; ``TimeoutError`` if none comes in ``timeout_s``."""
        return json.loads(await asyncio.wait_for(self.messages.get(), timeout_s))

    async def close(self) -> None:
        if not self._writer.is_closing():
            self._send(_CLOSE, struct.pack("!H", 1000))
            self._writer.close()
        self._reading.cancel()
        await asyncio.gather(self._reading, return_exceptions=True)

    async def _read(self) -> None:
        try:
            while True:
                opcode, payload = await self._frame()
                if opcode == _TEXT:
                    self.messages.put_nowait(payload.decode())
                elif opcode == _PING:  # Daphne pings every 20 s, and closes if unanswered
                    self._send(_PONG, payload)
                elif opcode == _CLOSE:
                    code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                    self.closed.set_result(code)
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            if not self.closed.done():
                self.closed.set_result(None)

    async def _frame(self) -> tuple[int, bytes]:
        """One whole frame from the server (Daphne does not fragment what we read)."""
        first, second = await self._reader.readexactly(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self._reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self._reader.readexactly(8))
        return first & 0x0F, await self._reader.readexactly(length)

    def _send(self, opcode: int, payload: bytes) -> None:
        """A final frame, masked as a client's must be."""
        mask = os.urandom(4)
        length = len(payload)
        if length < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
        elif length < 1 << 16:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
        masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
        self._writer.write(header + mask + masked)
