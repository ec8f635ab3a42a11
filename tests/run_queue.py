"""How long a local process waited for a CPU: what a busy machine adds to a timing.

A server's own clock (Redis SLOWLOG, a statement's duration) counts wall time: on a
machine whose CPUs other processes keep busy, a script or statement that needs 2 ms of
CPU can read hundreds of ms, because the server was runnable but not running. Linux
counts that wait per thread (``/proc/<pid>/task/<tid>/schedstat``, second field: ns
spent on a run queue). Taking a server's wait over a span from the wall time of a call
made in it leaves at most that call's own work: the call waited no longer than the
server did in all. What such a difference bounds does not depend on the machine's load,
and a call that does too much work in one go (a script over a whole group) still
exceeds it on any machine.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["waited_s"]


def waited_s(pid: int) -> float:
    """Seconds the main thread of local process ``pid`` has spent waiting on a run
    queue since it started; 0.0 where the kernel does not tell (then nothing is taken
    off, and a timing is judged by the wall clock alone)."""
    try:
        fields = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()
    except OSError:
        return 0.0
    return int(fields[1]) / 1e9 if len(fields) >= 2 else 0.0
