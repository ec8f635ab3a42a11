"""Fixtures of the browser test: a broker, the example site under Daphne, headless Chromium.

The example project in ``deploy/examples/notifications`` runs as a real deployment
would: ``manage.py migrate`` on a fresh SQLite file, Daphne as a subprocess on a free
port, the broker daemon (``own_broker`` from ``tests/conftest.py``) on another, and
Debian's Chromium driven through Playwright's Python API. Nothing is downloaded: the
Playwright package brings its own driver, and the browser is ``/usr/bin/chromium``
(``make test`` installs it). Outside CI a missing browser skips the test; with
``CI=true`` it fails, so CI never passes without having run it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from backends import BACKENDS
from tests import servers
from tests.ports import free_port
from tests.waits import POLL_S

EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "notifications"
CHROMIUM = "/usr/bin/chromium"
#: What the brief of the test asks of Chromium here: root needs --no-sandbox, the
#: network is closed except localhost, and nothing may phone home or update itself.
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: The first Chromium launch on a cold machine can take several seconds.
BROWSER_LAUNCH_TIMEOUT_S = 60.0
#: Daphne imports Django and Twisted and opens the port; a second or two, usually.
SITE_READY_TIMEOUT_S = 30.0


def _e2e_backend_params() -> list[str]:
    """Memory, and Redis once this build has it (``tests/servers.py`` finds or starts one)."""
    return ["memory://", "redis://"] if "redis" in BACKENDS else ["memory://"]


def _missing(reason: str) -> NoReturn:
    """Skip for a missing tool, except under CI, where the test must run."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: the browser test may not be skipped)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(
    scope="session",
    params=[pytest.param(url, id=url.split(":", 1)[0]) for url in _e2e_backend_params()],
)
def backend_url(request: pytest.FixtureRequest) -> str:
    """The browser test's backends, overriding ``tests/conftest.py``'s list here.

    ``own_broker`` then serves each in turn. A Redis URL carries the session's key
    prefix, so the groups of other runs sharing that Redis never meet ours.
    """
    url: str = servers.backend_url(request.param)
    return url


def _wait_until(ready: Callable[[], bool], timeout_s: float, failure: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail(failure, pytrace=False)
        time.sleep(POLL_S)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Debian Chromium, one for the module; each test opens its own contexts."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install -e '.[test]')")
    if not os.access(CHROMIUM, os.X_OK):
        _missing(f"{CHROMIUM} is missing (make test installs Debian's chromium)")
    with tempfile.TemporaryDirectory(prefix="e2e-chromium-") as downloads, sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            timeout=BROWSER_LAUNCH_TIMEOUT_S * 1000,
            downloads_path=downloads,
        )
        try:
            yield browser
        finally:
            browser.close()


class Site:
    """The example project served by Daphne, talking to one broker daemon."""

    def __init__(self, broker_url: str, workdir: Path) -> None:
        self.port = free_port()
        self.log_path = workdir / "daphne.log"
        self.env = {
            key: value for key, value in os.environ.items() if key != "DJANGO_SETTINGS_MODULE"
        }
        self.env.update(
            CHANNELS_BROKER_URL=broker_url,
            NOTIFICATIONS_DB=str(workdir / "db.sqlite3"),
            DJANGO_DEBUG="0",
            PYTHONUNBUFFERED="1",
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def manage(self, *args: str, check: bool = True) -> str:
        """Run ``manage.py ARGS`` as its own process (as a cron job or worker would).

        Returns its output; with ``check``, a non-zero exit fails the test.
        """
        done = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=EXAMPLE_DIR,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and done.returncode != 0:
            pytest.fail(f"manage.py {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
        return done.stdout

    def start(self) -> None:
        self.manage("migrate", "--noinput")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(self.port),
                 "notifications_site.asgi:application"],
                cwd=EXAMPLE_DIR,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )  # fmt: skip
        _wait_until(self._answers, SITE_READY_TIMEOUT_S, f"Daphne did not serve\n{self.log_tail()}")

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"Daphne exited with {self.process.returncode}\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"{self.url}/login/", timeout=2.0) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- daphne log ({self.log_path}) ---\n{tail}\n--- end ---"


@pytest.fixture
def site(own_broker: Any, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Site]:
    """The example site on a fresh database, served by Daphne, using ``own_broker``."""
    site = Site(own_broker.url, tmp_path)
    try:
        site.start()
        yield site
    finally:
        site.stop()
        report = getattr(request.node, "report_call", None)
        if report is None or report.failed:
            print(site.log_tail())  # the daemon's log comes with own_broker's teardown
