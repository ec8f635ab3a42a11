"""A fuzz run against a live daemon: many connections at once, a good client beside them.

``run`` sends ``FrameFuzzer`` scripts over ``concurrency`` connections at a time (each
connection writes its HELLO and body in one go, reads everything the daemon sends, waits
for the PONG that ends the body, writes its tail and half-closes, then reads until the
daemon closes), while ``tests.ping_probe`` PINGs from a process of its own. Random ones
until ``inputs`` inputs or ``duration_s``, whichever comes first, then the heavy ones; it
reports what it saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from protocol import PROTOCOL_VERSION, Flush, FrameDecoder, Hello, Ok, encode_frame
from tests.fuzz.frames import PREFIXES, FrameFuzzer, Script
from tests.ping_probe import PingReport

__all__ = ["Outcome", "flush_prefixes", "rss_kib", "run"]

REPO_ROOT = Path(__file__).resolve().parents[2]
#: A connection that has neither answered its body nor closed by then is reported as stuck.
SCRIPT_TIMEOUT_S = 15.0
#: Connections open at once: enough that the daemon always has work queued.
CONCURRENCY = 24
#: Anomalies kept for the report (a long run may see many of one kind).
MAX_REPORTED = 100


@dataclass
class Outcome:
    """What a run did and saw."""

    inputs: int = 0
    connections: int = 0
    #: Connections whose body the daemon answered (their PONG came).
    answered: int = 0
    elapsed_s: float = 0.0
    #: Connections that could not connect, or got neither their PONG nor a close in time:
    #: the script's label and what happened (the first ``MAX_REPORTED``).
    stuck: list[str] = field(default_factory=list)
    #: What the PING probe saw meanwhile.
    ping: PingReport = field(default_factory=PingReport)


def rss_kib(pid: int) -> int:
    """Resident memory of a process, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def _scripts(fuzzer: FrameFuzzer) -> Iterator[Script]:
    while True:
        yield fuzzer.script()


async def _read_until(reader: asyncio.StreamReader, sentinel: bytes) -> bool:
    """Read and drop what the daemon sends until ``sentinel`` (True) or EOF (False)."""
    keep = len(sentinel) - 1
    window = b""
    while True:
        data = await reader.read(262144)
        if not data:
            return False
        if sentinel:
            window = window[-keep:] + data if keep else data
            if sentinel in window:
                return True


async def _write(writer: asyncio.StreamWriter, data: bytes, byte_split: bool) -> None:
    if not byte_split:
        writer.write(data)
        await writer.drain()
        return
    for index in range(len(data)):
        writer.write(data[index : index + 1])
        await writer.drain()


async def _play(address: tuple[str, int], script: Script) -> bool:
    """One connection: HELLO and body, wait for the PONG, tail and EOF, read until closed.
    True if the daemon answered the body (its PONG came)."""
    reader, writer = await asyncio.open_connection(*address)
    answered = asyncio.ensure_future(_read_until(reader, script.sentinel))
    got_pong = False
    try:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await _write(writer, script.hello + script.body, script.byte_split)
        if script.sentinel:
            got_pong = await answered
            if not got_pong:
                return False  # closed before the PONG: a refused HELLO, or a taken id
        await _write(writer, script.tail, script.byte_split)
        writer.write_eof()
        await (_read_until(reader, b"") if script.sentinel else answered)
    except OSError:
        pass  # the daemon closed first (reset): a refused HELLO, or a tail it read early
    finally:
        writer.transport.abort()
        answered.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await answered
    return got_pong


async def _worker(
    address: tuple[str, int], scripts: Iterator[Script], outcome: Outcome, until: float, cap: int
) -> None:
    for script in scripts:
        if outcome.inputs >= cap or time.monotonic() >= until:
            return
        outcome.inputs += script.inputs
        outcome.connections += 1
        try:
            async with asyncio.timeout(SCRIPT_TIMEOUT_S):
                answered = await _play(address, script)
        except TimeoutError:
            anomaly = f"{script.label}: no PONG and no close in {SCRIPT_TIMEOUT_S} s"
        except OSError as exc:  # from connect: nothing was sent
            anomaly = f"{script.label}: connect failed: {type(exc).__name__}: {exc}"
        else:
            outcome.answered += answered
            continue
        if len(outcome.stuck) < MAX_REPORTED:
            outcome.stuck.append(anomaly)


async def run(
    address: tuple[str, int],
    fuzzer: FrameFuzzer,
    *,
    inputs: int,
    duration_s: float = float("inf"),
    heavy: bool = True,
    concurrency: int = CONCURRENCY,
) -> Outcome:
    """Send random scripts until ``inputs`` inputs or ``duration_s``, then (``heavy``) the
    heavy ones, all at once: the run ends with them, so that what they leave behind is
    what the daemon holds after the run. The connections are closed when it returns."""
    outcome = Outcome()
    started = time.monotonic()
    scripts = _scripts(fuzzer)
    until = started + duration_s
    await asyncio.gather(
        *(_worker(address, scripts, outcome, until, inputs) for _ in range(concurrency))
    )
    if heavy:
        last = fuzzer.heavy()
        await asyncio.gather(
            *(_worker(address, iter([script]), outcome, float("inf"), 2**62) for script in last)
        )
    outcome.elapsed_s = time.monotonic() - started
    return outcome


async def flush_prefixes(address: tuple[str, int]) -> None:
    """Empty every namespace a fuzz HELLO may use, so what stays in the daemon is its own."""
    for prefix in PREFIXES:
        reader, writer = await asyncio.open_connection(*address)
        try:
            hello = Hello(PROTOCOL_VERSION, "", "", prefix, 100, 60, 60)
            writer.write(encode_frame(hello) + encode_frame(Flush(1)))
            decoder = FrameDecoder()
            while True:
                data = await reader.read(65536)
                assert data, f"the daemon closed before flushing {prefix!r}"
                decoder.receive_data(data)
                answers = iter(decoder.next_frame, None)
                if any(isinstance(answer, Ok) and answer.request_id == 1 for answer in answers):
                    break
        finally:
            writer.close()
