"""The well-behaved client of a fuzz run, in a process of its own.

``python -m tests.fuzz.pinger HOST PORT DAEMON_PID`` says HELLO, prints ``ready``, then
sends a PING every ``INTERVAL_S`` and times each PONG, until its stdin closes; then it
prints one JSON line: how many round trips, the slowest, and every one over ``SLOW_MS``
with when it began (seconds since ``ready``).

A process of its own, so that the fuzzer's work cannot delay it. The machine may still be
busy with other work (the suite shares its cores): each round trip is also told less the
time the daemon and the pinger spent runnable but waiting for a CPU (``schedstat``'s run
queue time, Linux), which is the machine's delay, not the daemon's. A daemon that holds its
event loop for one client's input spends that time running, so it stays in the count.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from typing import Any

from protocol import PROTOCOL_VERSION, FrameDecoder, Hello, Ping, Pong, Welcome, encode_frame

#: Pause between PINGs: a hundred probes a second of the daemon's event loop.
INTERVAL_S = 0.01
#: The bound of issue 14: another client's PING never takes longer.
SLOW_MS = 50.0
#: A PONG later than this counts as lost: the report says so.
LOST_S = 10.0
#: Slow round trips kept for the report (a long run may see many).
MAX_REPORTED = 1000


class Pinger:
    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=LOST_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = FrameDecoder()
        self.sock.sendall(encode_frame(Hello(PROTOCOL_VERSION, "", "", "pinger", 100, 60, 60)))
        welcome = self._next_frame()
        if not isinstance(welcome, Welcome):
            raise SystemExit(f"pinger: no WELCOME but {welcome!r}")

    def _next_frame(self) -> object:
        while (frame := self.decoder.next_frame()) is None:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the daemon closed the pinger's connection")
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


def run_queue_ms(pid: int | str) -> float:
    """Milliseconds the process's main thread has waited, runnable, for a CPU."""
    with open(f"/proc/{pid}/schedstat") as stat:
        return int(stat.read().split()[1]) / 1e6


def main() -> None:
    host, port, daemon = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    pinger = Pinger(host, port)
    stop = threading.Event()

    def until_stdin_closes() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=until_stdin_closes, daemon=True).start()
    print("ready", flush=True)
    began = time.monotonic()
    report: dict[str, Any] = {"count": 0, "max_ms": 0.0, "max_own_ms": 0.0, "slow": []}
    while not stop.is_set():
        at = time.monotonic() - began
        waited = run_queue_ms(daemon) + run_queue_ms("self")
        try:
            ms = pinger.round_trip(report["count"] + 1)
        except OSError as exc:  # a timeout (LOST_S) or a closed connection
            report["error"] = f"{type(exc).__name__}: {exc} at {at:.3f} s"
            break
        own_ms = ms - (run_queue_ms(daemon) + run_queue_ms("self") - waited)
        report["count"] += 1
        report["max_ms"] = max(report["max_ms"], ms)
        report["max_own_ms"] = max(report["max_own_ms"], own_ms)
        if ms > SLOW_MS and len(report["slow"]) < MAX_REPORTED:
            report["slow"].append(
                {"at_s": round(at, 3), "ms": round(ms, 1), "own_ms": round(own_ms, 1)}
            )
        stop.wait(INTERVAL_S)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
