"""The daemon under test, started as a ``channels-broker serve`` subprocess on free ports.

A subprocess, not an import: the bench measures the daemon as a site runs it, in a
process of its own, and never loads ``broker.daemon`` or the backends itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .errors import BenchError
from .layers import CAPACITY, Note

__all__ = ["Daemon", "daemon"]

DAEMON_START_TIMEOUT_S = 15.0
DAEMON_STOP_TIMEOUT_S = 10.0
#: The memory scenario holds 10,000,000 memberships over a few connections and about
#: 1 GiB of waiting messages: over a site's defaults, which bound clients, not the bench.
MEMORY_SCENARIO_ARGS = ("--max-memberships", "100000000", "--max-memory", str(64 * 2**30))
#: The directory holding the ``broker`` package, so the daemon runs the code this bench runs.
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def free_ports(count: int) -> list[int]:
    # All bound at once so that two calls cannot hand out the same port.
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def log_text(log: IO[bytes], max_lines: int = 8) -> str:
    log.seek(0)
    lines = log.read().decode(errors="replace").strip().splitlines()
    return " | ".join(lines[:max_lines]) + (" | ..." if len(lines) > max_lines else "")


def wait_listening(process: subprocess.Popen[bytes], port: int, log: IO[bytes]) -> None:
    deadline = time.monotonic() + DAEMON_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"daemon exited with {process.returncode}: {log_text(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        # Another process offers no event to wait on but its port, so poll it briefly.
        time.sleep(0.05)
    raise BenchError(f"daemon not listening on port {port} after {DAEMON_START_TIMEOUT_S:.0f} s")


def stop_daemon(process: subprocess.Popen[bytes], note: Note) -> None:
    if process.poll() is not None:
        note(f"daemon had exited by itself with code {process.returncode}")
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(DAEMON_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        note(f"daemon still running {DAEMON_STOP_TIMEOUT_S:.0f} s after SIGTERM; killed")
        return
    if process.returncode != 0:
        note(f"daemon exited with code {process.returncode} after SIGTERM")


@dataclass(frozen=True, slots=True)
class Daemon:
    """A running daemon: where layers reach it, and its process (for CPU and RSS)."""

    address: str
    pid: int


def serve_command(backend_url: str, loop: str, port: int, metrics_port: int) -> list[str]:
    command = [sys.executable, "-m", "broker", "serve", "--listen", f"127.0.0.1:{port}"]
    command += ["--backend", backend_url, "--metrics-listen", f"127.0.0.1:{metrics_port}"]
    # The layers ask for CAPACITY, over a site's --max-capacity: the bench measures
    # speed, never back-pressure.
    command += ["--log-level", "warning", "--max-capacity", str(CAPACITY), "--loop", loop]
    return command + list(MEMORY_SCENARIO_ARGS)


@contextlib.contextmanager
def daemon(backend_url: str, loop: str, note: Note) -> Iterator[Daemon]:
    """A ``channels-broker serve`` subprocess on free ports, on event loop ``loop``."""
    port, metrics_port = free_ports(2)
    command = serve_command(backend_url, loop, port, metrics_port)
    path = os.pathsep.join(filter(None, [str(SOURCE_ROOT), os.environ.get("PYTHONPATH")]))
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": path}
        )
        try:
            wait_listening(process, port, log)
        except BaseException:
            process.kill()  # its log is in the error already
            process.wait()
            raise
        try:
            yield Daemon(f"tcp://127.0.0.1:{port}", process.pid)
        finally:
            stop_daemon(process, note)
            if text := log_text(log):
                note(f"daemon ({backend_url}) logged: {text}")
