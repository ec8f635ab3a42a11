"""A bare protocol connection to a daemon, for the frames and bytes no layer sends."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import msgpack

from protocol import PROTOCOL_VERSION, Frame, FrameDecoder, Hello, encode_frame
from tests.waits import DELIVERY_TIMEOUT_S

__all__ = ["RawClient", "hello", "raw_frame"]


def hello(version: int = PROTOCOL_VERSION, token: str = "", capacity: int = 100) -> bytes:
    """A HELLO as a layer sends it (expiry 60 s, group expiry 86400 s), encoded."""
    return encode_frame(Hello(version, token, "", "asgi", capacity, 60.0, 86400.0))


def raw_frame(items: list[Any]) -> bytes:
    """A length-prefixed msgpack array, valid or not as a frame."""
    body: bytes = msgpack.packb(items, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


class RawClient:
    """A socket to the daemon that speaks only what the test writes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder()
        self.local_port: int = writer.get_extra_info("sockname")[1]

    @classmethod
    async def open(cls, address: tuple[str, int]) -> RawClient:
        reader, writer = await asyncio.open_connection(*address)
        return cls(reader, writer)

    async def write(self, data: bytes, *, close_after: bool = False) -> None:
        """Send ``data``; with ``close_after``, half-close as a client that gives up would."""
        self.writer.write(data)
        if close_after:
            self.writer.write_eof()
        await self.writer.drain()

    async def next_frame(self, timeout_s: float = DELIVERY_TIMEOUT_S) -> Frame:
        """The next frame from the daemon; fails if it closes or is silent for ``timeout_s``."""
        while (frame := self.decoder.next_frame()) is None:
            data = await asyncio.wait_for(self.reader.read(65536), timeout_s)
            assert data, "the daemon closed the connection before answering"
            self.decoder.receive_data(data)
        return frame

    async def frames_until_closed(self) -> list[Frame]:
        """Every frame the daemon still sends, then its close (EOF or reset)."""
        async with asyncio.timeout(DELIVERY_TIMEOUT_S):
            while True:
                try:
                    data = await self.reader.read(65536)
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
