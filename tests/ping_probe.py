"""Another client of a daemon, PINGing it from a process of its own while a test attacks
or fuzzes the daemon: issue 14's measure that no client stalls the others.

``PingProbe`` (or ``pinging``, around a block) starts ``python -m tests.ping_probe HOST
PORT DAEMON_PID``, which says HELLO, prints ``ready``, then sends a PING every
``INTERVAL_S`` (``MIN_PINGS`` at least) and times each PONG until its stdin closes; then it
prints one JSON line, the ``PingReport``.

A process, not a task or a thread of the test: the test's own work during an attack
(encoding 100,000 frames, reading as many answers) holds its loop and its GIL, and a
probe inside it would time that as the daemon's. The machine may still be busy with
other work (the suite shares its cores): each round trip is also told less the time the
daemon and the probe spent runnable but waiting for a CPU (``schedstat``'s run queue
time, Linux), which is the machine's delay, not the daemon's. A daemon that holds its
event loop for one client spends that time running, so it stays in the count.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from protocol import PROTOCOL_VERSION, FrameDecoder, Hello, Ping, Pong, Welcome, encode_frame

__all__ = ["PING_BOUND_MS", "PING_BOUND_S", "PingProbe", "PingReport", "pinging"]

#: The bound of issue 14: another client's PING never takes longer (less the machine's
#: own delay), whatever one client does.
PING_BOUND_MS = 50.0
PING_BOUND_S = PING_BOUND_MS / 1000
#: Pause between PINGs: a hundred probes a second of the daemon's event loop.
INTERVAL_S = 0.01
#: PINGs made at least, however soon stdin closes: a short attack is sampled too.
MIN_PINGS = 10
#: A PONG later than this counts as lost: the report says so.
LOST_S = 10.0
#: Slow round trips kept for the report (a long run may see many).
MAX_REPORTED = 1000
_REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class PingReport:
    """What the probe saw: round trips in milliseconds, wall-clock and ``own`` (less the
    time the daemon and the probe waited for a CPU)."""

    count: int = 0
    max_ms: float = 0.0
    max_own_ms: float = 0.0
    #: Round trips over ``PING_BOUND_MS`` (wall-clock): when (seconds since ``ready``),
    #: how long, and how long less the machine's delay.
    slow: list[dict[str, float]] = field(default_factory=list)
    #: Why the probe stopped early: a lost PONG or a closed connection.
    error: str | None = None

    @property
    def slowest_s(self) -> float:
        """The slowest round trip the daemon is answerable for, in seconds."""
        return self.max_own_ms / 1000

    def over_bound(self) -> list[dict[str, float]]:
        """The round trips over ``PING_BOUND_MS`` less the machine's delay."""
        return [entry for entry in self.slow if entry["own_ms"] > PING_BOUND_MS]


class PingProbe:
    """The probe's process, seen from the test."""

    def __init__(self, address: tuple[str, int], daemon_pid: int) -> None:
        host, port = address
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.ping_probe", host, str(port), str(daemon_pid)],
            cwd=_REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.report = PingReport()

    def wait_ready(self) -> None:
        """Return once the probe is past its HELLO."""
        assert self.process.stdout is not None
        ready = self.process.stdout.readline().strip()
        assert ready == "ready", f"the PING probe did not start: {ready!r}"

    def stop(self) -> PingReport:
        """Close the probe's stdin and read its report; fail if it failed."""
        out, _ = self.process.communicate(timeout=LOST_S + 20)
        assert self.process.returncode == 0, f"the PING probe failed: {out!r}"
        self.report = PingReport(**json.loads(out.strip().splitlines()[-1]))
        return self.report

    @property
    def slowest_s(self) -> float:
        return self.report.slowest_s

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@asynccontextmanager
async def pinging(broker: Any) -> AsyncIterator[PingProbe]:
    """A ``PingProbe`` on the daemon ``broker`` (a ``BrokerProcess``) for the block; after
    it, ``probe.report`` holds what it saw. Fails if the probe lost a PONG."""
    probe = PingProbe(broker.address, broker.process.pid)
    try:
        await asyncio.to_thread(probe.wait_ready)
        yield probe
        report = await asyncio.to_thread(probe.stop)
        assert report.error is None, report.error
        assert report.count >= MIN_PINGS, f"the probe made only {report.count} PINGs"
    finally:
        probe.kill()


# -- the probe's own process -------------------------------------------------------------


class _Pinger:
    """A blocking connection that PINGs and times each PONG."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=LOST_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = FrameDecoder()
        self.sock.sendall(encode_frame(Hello(PROTOCOL_VERSION, "", "", "pinger", 100, 60, 60)))
        welcome = self._next_frame()
        if not isinstance(welcome, Welcome):
            raise SystemExit(f"ping probe: no WELCOME but {welcome!r}")

    def _next_frame(self) -> object:
        while (frame := self.decoder.next_frame()) is None:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the daemon closed the probe's connection")
            self.decoder.receive_data(data)
        return frame

    def round_trip(self, request_id: int) -> float:
        """Milliseconds from PING to its PONG."""
        started = time.perf_counter()
        self.sock.sendall(encode_frame(Ping(request_id)))
        while True:
            frame = self._next_frame()
            if isinstance(frame, Pong) and frame.request_id == request_id:
                return (time.perf_counter() - started) * 1000


def _run_queue_ms(pid: int | str) -> float:
    """Milliseconds the process's main thread has waited, runnable, for a CPU."""
    with open(f"/proc/{pid}/schedstat") as stat:
        return int(stat.read().split()[1]) / 1e6


def _probe(pinger: _Pinger, daemon: int, stop: threading.Event) -> PingReport:
    report = PingReport()
    began = time.monotonic()
    while not stop.is_set() or report.count < MIN_PINGS:
        at = time.monotonic() - began
        waited = _run_queue_ms(daemon) + _run_queue_ms("self")
        try:
            ms = pinger.round_trip(report.count + 1)
        except OSError as exc:  # a timeout (LOST_S) or a closed connection
            report.error = f"{type(exc).__name__}: {exc} at {at:.3f} s"
            break
        own_ms = ms - (_run_queue_ms(daemon) + _run_queue_ms("self") - waited)
        report.count += 1
        report.max_ms = max(report.max_ms, ms)
        report.max_own_ms = max(report.max_own_ms, own_ms)
        if ms > PING_BOUND_MS and len(report.slow) < MAX_REPORTED:
            report.slow.append(
                {"at_s": round(at, 3), "ms": round(ms, 1), "own_ms": round(own_ms, 1)}
            )
        stop.wait(INTERVAL_S)
    return report


def main() -> None:
    host, port, daemon = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    pinger = _Pinger(host, port)
    stop = threading.Event()

    def until_stdin_closes() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=until_stdin_closes, daemon=True).start()
    print("ready", flush=True)
    print(json.dumps(asdict(_probe(pinger, daemon, stop))), flush=True)


if __name__ == "__main__":
    main()
