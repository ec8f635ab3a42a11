"""The big room: one group of many channels spread over several receiving processes,
a few group_sends a little apart, every delivery timed from send to receive.

It is what a site's one big chat room or live page does: its consumers sit in several
Daphne processes, each holding many members. The sender is this process; the
receivers are processes of their own (``room_receiver``), so no measured process shares
an event loop with another, and the server's CPU and memory are read from ``/proc``.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from .errors import BenchError, NotApplicable, Unverified
from .harness import BODY, Row, percentile, warm_up
from .layers import LayerSpec, Opened, Settings, close_layer
from .progress import progress
from .room_receiver import ROOM_GROUP, Received, receive_room
from .usage import cpu_seconds, rss_bytes

__all__ = ["ROOM_ROWS", "big_room"]

#: Seconds between two group_sends: a busy room, not a flood.
SEND_INTERVAL_S = 0.05
#: Filling the room: channels_redis adds about 1,000 members a second per process.
JOIN_TIMEOUT_S = 120.0
#: From the first send; channels_redis has taken 10 s for the last of 200,000 deliveries.
DELIVERY_TIMEOUT_S = 60.0

ROOM_ROWS = (
    Row("big room p50 latency", "ms", False),
    Row("big room p99 latency", "ms", False),
    Row("big room max latency", "ms", False),
    Row("big room", "deliveries/s", True),
    Row("big room server CPU per group_send", "ms", False),
    Row("big room server RSS after", "MiB", False),
)


def start_receivers(spec: LayerSpec, settings: Settings) -> list[tuple[BaseProcess, Connection]]:
    context = multiprocessing.get_context("spawn")  # no copy of this process' loops or sockets
    shares = [
        settings.room_channels // settings.room_processes
        + (1 if i < settings.room_channels % settings.room_processes else 0)
        for i in range(settings.room_processes)
    ]
    started: list[tuple[BaseProcess, Connection]] = []
    for share in shares:
        ours, theirs = context.Pipe()
        args = (spec.path, spec.kwargs, share, settings.room_sends, DELIVERY_TIMEOUT_S, theirs)
        process = context.Process(target=receive_room, args=args, daemon=True)
        process.start()
        theirs.close()
        started.append((process, ours))
    return started


def collect(pipes: Sequence[Connection], timeout_s: float, what: str) -> list[Any]:
    """One object from each pipe, in order, within ``timeout_s`` in all."""
    deadline, answers = time.monotonic() + timeout_s, dict[Connection, Any]()
    while len(answers) < len(pipes):
        waiting = [p for p in pipes if p not in answers]
        ready = wait(waiting, max(0.0, deadline - time.monotonic()))
        if not ready:
            raise BenchError(f"{len(pipes) - len(answers)} receiving processes not {what}")
        for pipe in waiting:
            if pipe not in ready:
                continue
            try:
                answers[pipe] = pipe.recv()
            except EOFError as exc:
                raise BenchError(f"a receiving process died before it was {what}") from exc
    return [answers[pipe] for pipe in pipes]


async def send_room(spec: LayerSpec, sends: int) -> float:
    """``sends`` group_sends ``SEND_INTERVAL_S`` apart (from the first, so a slow one does not
    push the others back); returns when the first started (``time.monotonic()``)."""
    layer = spec()
    try:
        await warm_up([layer])
        started = time.monotonic()
        for k in range(sends):
            await asyncio.sleep(max(0.0, started + k * SEND_INTERVAL_S - time.monotonic()))
            await layer.group_send(
                ROOM_GROUP, {"type": "bench.room", "k": k, "t": time.monotonic(), "text": BODY}
            )
    finally:
        await close_layer(layer)
    return started


def summarize(
    received: Sequence[Received], started: float, cpu_s: float, rss: float
) -> list[float]:
    latencies = sorted(latency for share in received for latency in share.latencies_s)
    expected = sum(share.expected for share in received)
    if not latencies:
        raise BenchError(f"none of {expected} deliveries arrived")
    last = max(share.last_at for share in received)
    values = [percentile(latencies, 0.5) * 1000, percentile(latencies, 0.99) * 1000]
    values += [latencies[-1] * 1000, len(latencies) / (last - started), cpu_s, rss]
    problems = [share.error for share in received if share.error]
    duplicates = sum(share.duplicates for share in received)
    if len(latencies) < expected:
        problems.append(f"{len(latencies)} of {expected} deliveries arrived")
    if duplicates:
        problems.append(f"{duplicates} delivered twice")
    if problems:
        raise Unverified("; ".join(problems), values)
    return values


def big_room(opened: Opened, settings: Settings) -> list[float]:
    spec = opened.factory
    if not isinstance(spec, LayerSpec):
        raise NotApplicable("this layer cannot be built in another process")
    receivers = start_receivers(spec, settings)
    pipes = [pipe for _, pipe in receivers]
    try:
        collect(pipes, JOIN_TIMEOUT_S, "ready")
        pid = opened.server_pid
        cpu_before = cpu_seconds(pid) if pid else None
        started = asyncio.run(send_room(spec, settings.room_sends))
        received = collect(pipes, DELIVERY_TIMEOUT_S + 10, "done")
        cpu_after = cpu_seconds(pid) if pid else None
        rss = rss_bytes(pid) if pid else None
    finally:
        for process, pipe in receivers:
            process.join(5)
            if process.is_alive():
                process.kill()
                progress("  big room: a receiving process did not end; killed")
            pipe.close()
    cpu_s = (
        (cpu_after - cpu_before)
        if cpu_after is not None and cpu_before is not None
        else float("nan")
    )
    per_send_ms = cpu_s * 1000 / settings.room_sends
    return summarize(received, started, per_send_ms, (rss or float("nan")) / 2**20)
