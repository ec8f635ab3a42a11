"""Logging to stderr, one line per event, as text or JSON (for journald and collectors).

Under systemd, when stderr is the journal's stream (``JOURNAL_STREAM`` names it), each
line starts with its syslog priority (``<4>`` for a warning), which journald strips and
keeps as the entry's priority, so ``journalctl -p warning`` shows what it should.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime

__all__ = ["configure_logging"]


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the traceback).

    The time is ISO 8601 in UTC with milliseconds and its offset
    (``2026-12-06T10:34:49.123+00:00``): collectors parse it as it is, and lines of
    daemons on hosts in different zones sort together.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class JournalPriority(logging.Formatter):
    """Another formatter's lines, each prefixed with the record's syslog priority."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


def _syslog_priority(levelno: int) -> int:
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def stderr_is_journal() -> bool:
    """True when stderr is the stream systemd connected to journald.

    systemd sets ``JOURNAL_STREAM=<device>:<inode>`` of that stream; a process whose
    stderr was redirected elsewhere since must not prefix its lines.
    """
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        found = os.fstat(sys.stderr.fileno())
        return (found.st_dev, found.st_ino) == (int(device), int(inode))
    except (ValueError, OSError):
        return False


def configure_logging(level: int, fmt: str = "text") -> None:
    """Send the daemon's logs to stderr at ``level``, replacing earlier handlers."""
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter()
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(JournalPriority(formatter) if stderr_is_journal() else formatter)
    root = logging.getLogger("channels_broker")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
