"""Log lines under systemd: each carries its syslog priority when stderr is the journal;
JSON lines carry their time as ISO 8601 with milliseconds and zone."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

_LOG_SOME = """
import logging
from broker.ops.logs import configure_logging
configure_logging(logging.DEBUG)
log = logging.getLogger("channels_broker.test")
log.info("one")
log.warning("two")
try:
    raise ValueError("three")
except ValueError:
    log.exception("four")
"""


def _log_to_file(path: Path, journal: bool) -> list[str]:
    with path.open("wb") as stderr:
        found = os.fstat(stderr.fileno())
        env = dict(os.environ)
        env.pop("JOURNAL_STREAM", None)
        if journal:
            env["JOURNAL_STREAM"] = f"{found.st_dev}:{found.st_ino}"
        subprocess.run([sys.executable, "-c", _LOG_SOME], stderr=stderr, env=env, check=True)
    return path.read_text().splitlines()


def test_log_lines_carry_their_syslog_priority_when_stderr_is_the_journal(
    tmp_path: Path,
) -> None:
    """journald reads ``<N>`` as the priority of each line (``journalctl -p``)."""
    lines = _log_to_file(tmp_path / "journal", journal=True)
    assert lines[0].startswith("<6>") and lines[0].endswith("one")
    assert lines[1].startswith("<4>") and lines[1].endswith("two")
    assert lines[2].startswith("<3>") and lines[2].endswith("four")
    assert all(line.startswith("<3>") for line in lines[3:]), "the traceback too"
    assert any("ValueError: three" in line for line in lines[3:])
    plain = _log_to_file(tmp_path / "file", journal=False)
    assert not any(line.startswith("<") for line in plain), "no prefix outside the journal"


def test_json_lines_carry_iso_8601_times_with_milliseconds_and_zone() -> None:
    """``--log-format json``: ``2026-12-06T10:34:49.123+00:00``, the moment it was logged."""
    script = (
        "import logging\n"
        "from broker.ops.logs import configure_logging\n"
        "configure_logging(logging.INFO, 'json')\n"
        "logging.getLogger('channels_broker.test').warning('hello')\n"
    )
    before = datetime.now(UTC)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    entry = json.loads(done.stderr)
    assert entry["message"] == "hello" and entry["level"] == "warning"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", entry["time"])
    logged = datetime.fromisoformat(entry["time"])
    assert before - timedelta(seconds=1) <= logged <= datetime.now(UTC)
