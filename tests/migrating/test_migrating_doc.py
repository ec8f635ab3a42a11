"""docs/migrating.md's change, made to a channels_redis site exactly as the doc writes it.

1. A copy of the example site gets the settings a site on channels_redis has
   (``channels_redis_settings.py``, tuple ``hosts`` and every key that carries over),
   and its consumers run through channels_redis on Redis: the "before" is a real site.
2. With only ``BACKEND`` switched, ``manage.py check`` fails with E001 and names the
   daemon's ``--backend`` URL, before any request.
3. With the doc's diff applied as written, ``manage.py check`` finds nothing, and the
   same consumers (``drive_site.py``: a page fed by ``manage.py notify`` in another
   process, a chat room of two pages) run through a daemon on the same Redis.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests import servers

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
DOC = ROOT / "docs" / "migrating.md"
EXAMPLE_DIR = ROOT / "deploy" / "examples" / "notifications"
OUR_BACKEND = '"broker.layer.BrokerChannelLayer"'
#: Django's start, a migration of SQLite, the driver's round trips: seconds, on a loaded machine.
PROCESS_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def backend_url() -> str:
    """The daemon serves the Redis the site used: the move the doc describes."""
    return servers.backend_url("redis://")


def doc_diff() -> str:
    """The one ```diff block of docs/migrating.md."""
    blocks = re.findall(r"^```diff\n(.*?)^```$", DOC.read_text(encoding="utf-8"), re.M | re.S)
    assert len(blocks) == 1, "docs/migrating.md must show the change as one diff block"
    return str(blocks[0])


def apply_diff(text: str, diff: str) -> str:
    """``text`` with each hunk of ``diff`` (``@@ ... @@`` headers, unified-diff lines)
    applied; a hunk whose old lines are not in ``text`` exactly once fails the test."""
    for hunk in re.split(r"^@@.*@@\n", diff, flags=re.M)[1:]:
        lines = hunk.splitlines()
        old = "\n".join(line[1:] for line in lines if line[:1] in (" ", "-"))
        new = "\n".join(line[1:] for line in lines if line[:1] in (" ", "+"))
        assert text.count(old) == 1, f"the doc's hunk does not apply to the settings:\n{old}"
        text = text.replace(old, new)
    return text


class SiteCopy:
    """The example site in a temporary directory, run as its own processes."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "site"
        shutil.copytree(
            EXAMPLE_DIR, self.dir, ignore=shutil.ignore_patterns("db.sqlite3", "__pycache__")
        )
        self.settings = self.dir / "notifications_site" / "settings.py"
        redis = urlsplit(servers.backend_url("redis://"))
        env = {key: value for key, value in os.environ.items() if key != "DJANGO_SETTINGS_MODULE"}
        env.update(
            NOTIFICATIONS_DB=str(workdir / "db.sqlite3"),
            REDIS_HOST=redis.hostname or "127.0.0.1",
            REDIS_PORT=str(redis.port or 6379),
            # Keys under the session's prefix, deleted when the session ends.
            CHANNEL_LAYER_PREFIX=servers.session_prefix,
            DJANGO_SETTINGS_MODULE="notifications_site.settings",
            PYTHONUNBUFFERED="1",
        )
        self.env = env

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *args],
            cwd=self.dir,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=PROCESS_TIMEOUT_S,
        )

    def must_run(self, *args: str) -> str:
        done = self.run(*args)
        assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}{done.stderr}"
        return done.stdout

    def drive(self) -> str:
        """Run the consumers (``drive_site.py``) with the settings as they are now."""
        return self.must_run(str(HERE / "drive_site.py"))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SiteCopy]:
    copy = SiteCopy(tmp_path_factory.mktemp("migrating"))
    copy.settings.write_text((HERE / "channels_redis_settings.py").read_text(encoding="utf-8"))
    copy.must_run("manage.py", "migrate", "--noinput")
    yield copy


def test_the_channels_redis_site_runs_its_consumers_on_redis(site: SiteCopy) -> None:
    site.settings.write_text((HERE / "channels_redis_settings.py").read_text(encoding="utf-8"))

    assert "every message arrived" in site.drive()


def test_switching_only_backend_fails_manage_py_check_with_the_daemon_url(
    site: SiteCopy,
) -> None:
    redis_settings = (HERE / "channels_redis_settings.py").read_text(encoding="utf-8")
    installed = apply_diff(redis_settings, doc_diff().split("@@ CHANNEL_LAYERS")[0])
    site.settings.write_text(
        installed.replace('"channels_redis.core.RedisChannelLayer"', OUR_BACKEND)
    )

    done = site.run("manage.py", "check")

    assert done.returncode == 1, done.stdout + done.stderr
    assert "(channels_broker.E001) hosts[0] is a Redis address" in done.stderr
    redis = urlsplit(servers.backend_url("redis://"))
    assert f"channels-broker serve --backend redis://{redis.hostname}:{redis.port}`" in (
        done.stderr
    )


def test_the_documented_change_runs_the_same_consumers_on_the_daemon(
    site: SiteCopy, own_broker: Any
) -> None:
    redis_settings = (HERE / "channels_redis_settings.py").read_text(encoding="utf-8")
    migrated = apply_diff(redis_settings, doc_diff())
    site.settings.write_text(migrated)
    site.env["CHANNELS_BROKER_URL"] = own_broker.url

    check = site.run("manage.py", "check")
    assert check.returncode == 0 and "no issues" in check.stdout, check.stdout + check.stderr
    assert OUR_BACKEND in migrated and "channels_redis.core" not in migrated
    assert "every message arrived" in site.drive()
