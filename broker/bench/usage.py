"""What a server process costs, read from ``/proc`` (Linux): CPU seconds and resident
memory of our daemon, or of the redis-server or nats-server a reference talks to."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

__all__ = ["cpu_ns", "cpu_seconds", "pid_listening_on", "rss_bytes"]

#: The kind of CPU clock of a process that counts its threads' run time (Linux).
CPUCLOCK_SCHED = 2
#: /proc/net/tcp's state column for a listening socket.
TCP_LISTEN = "0A"


def cpu_ns(pid: int) -> int | None:
    """CPU time of every thread of ``pid`` so far, in nanoseconds; None if not readable.

    Linux's clock of another process (what ``clock_getcpuclockid`` returns, which Python
    lacks: the pid, inverted, shifted by 3, with CPUCLOCK_SCHED): exact to the
    nanosecond, where ``/proc/PID/stat`` counts 10 ms ticks."""
    try:
        return time.clock_gettime_ns((~pid << 3) | CPUCLOCK_SCHED)
    except OSError:
        return None


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of ``pid`` so far; None if it cannot be read."""
    if (exact := cpu_ns(pid)) is not None:
        return exact / 1e9
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name, which is in parentheses and may hold spaces.
    fields = stat.rpartition(")")[2].split()
    user_ticks, system_ticks = int(fields[11]), int(fields[12])
    return (user_ticks + system_ticks) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int | None:
    """Resident memory of ``pid`` now; None if it cannot be read."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                columns = line.split()
                local_port = int(columns[1].rpartition(":")[2], 16)
                if local_port == port and columns[3] == TCP_LISTEN:
                    inodes.add(columns[9])
    return inodes


def pid_listening_on(port: int) -> int | None:
    """The process listening on TCP ``port`` of this machine, if this user may see it."""
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not wanted:
        return None
    for process in Path("/proc").iterdir():
        if not process.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (process / "fd").iterdir():
                if os.readlink(fd) in wanted:
                    return int(process.name)
    return None
