"""The yardstick: a plain asyncio echo server in a process of its own and a client that
sends a message-sized payload and awaits it back, one at a time.

It is the least any request over loopback costs on this machine, with this Python: a
layer whose ``send`` waits for the daemon's reply cannot beat one of its round trips
per message. The bench reports it beside the table, once per event loop it runs our
daemon on, the echo server on that loop (a uvloop server answers about a quarter
sooner than asyncio's own: measured against an asyncio server, a daemon on uvloop was
held to a yardstick it had a head start on); the client runs as the layers do, on
asyncio's loop in the bench's process. The regression guard (tests/bench) divides our
numbers by it, measured in the same run, so that a loaded machine slows both alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import multiprocessing
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection

from .harness import percentile

__all__ = ["Echo", "echo_round_trips", "echo_server", "round_trips"]

#: About what one of our SEND frames carries for a chat-sized message.
PAYLOAD = b"x" * 160
START_TIMEOUT_S = 15.0


@dataclass(frozen=True, slots=True)
class Echo:
    """What the yardstick measured: round trip p50 and round trips a second."""

    p50_us: float
    per_s: float


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        while True:
            writer.write(await reader.readexactly(len(PAYLOAD)))
            await writer.drain()
    writer.close()


async def serve_echo(pipe: Connection) -> None:
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    pipe.send(server.sockets[0].getsockname()[1])
    # Runs until the bench ends the process: the pipe closing is its only signal.
    await asyncio.get_running_loop().run_in_executor(None, wait_closed, pipe)


def wait_closed(pipe: Connection) -> None:
    with contextlib.suppress(EOFError, OSError):
        pipe.recv()


def run_echo_server(pipe: Connection, loop: str = "asyncio") -> None:
    if loop == "uvloop":
        factory = importlib.import_module("uvloop").new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(serve_echo(pipe))
    else:
        asyncio.run(serve_echo(pipe))


@contextlib.contextmanager
def echo_server(loop: str = "asyncio") -> Iterator[tuple[int, int]]:
    """An echo server in a process of its own, on ``loop`` (``asyncio``'s own, or
    ``uvloop``, as ``serve --loop`` says); yields its port and its pid."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=run_echo_server, args=(theirs, loop), daemon=True)
    process.start()
    theirs.close()
    try:
        if not ours.poll(START_TIMEOUT_S):
            raise TimeoutError(f"echo server not started after {START_TIMEOUT_S:.0f} s")
        assert process.pid is not None  # started
        yield int(ours.recv()), process.pid
    finally:
        ours.close()
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join()


async def round_trips(port: int, count: int) -> Echo:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        times_ns = []
        started = time.perf_counter()
        for _ in range(count):
            sent_ns = time.perf_counter_ns()
            writer.write(PAYLOAD)
            await reader.readexactly(len(PAYLOAD))
            times_ns.append(time.perf_counter_ns() - sent_ns)
        elapsed_s = time.perf_counter() - started
    finally:
        writer.close()
        await writer.wait_closed()
    return Echo(percentile(sorted(times_ns), 0.5) / 1000, count / elapsed_s)


def echo_round_trips(port: int, count: int) -> Echo:
    """``count`` round trips to the echo server on ``port``, one after the other."""
    return asyncio.run(round_trips(port, count))
