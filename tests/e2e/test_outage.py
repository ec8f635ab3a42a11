"""The example site's worker and an open page outlive a 15 s broker outage.

Real processes throughout: the broker daemon, Daphne serving the site, ``manage.py
runworker notifications-worker``, ``manage.py notify`` for each message, and a
WebSocket client (``tests.e2e.websocket``) standing in for the browser, logged in as
alice over HTTP. No Chromium, so nothing here is ever skipped.

The outage lasts 15 s because that is the point (longer than ``connect_timeout``, 5 s,
and than several reconnect rounds); the test checks what should happen meanwhile
instead of sleeping through it, and waits on events everywhere else.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.broker.http_client import http_get
from tests.e2e.conftest import EXAMPLE_DIR, SITE_READY_TIMEOUT_S
from tests.e2e.websocket import WebSocket
from tests.waits import DELIVERY_TIMEOUT_S, POLL_S, RECONNECT_TIMEOUT_S

#: What the issue asks the worker and the page to outlive.
OUTAGE_S = 15.0
#: The layer's default connect_timeout, which the example's CONFIG keeps: for that long
#: after losing the daemon, a view's call waits for a restart; after it, it fails at once.
CONNECT_TIMEOUT_S = 5.0
#: How fast the view answers 503 once the daemon has been away that long: HTTP through
#: Daphne and a thread, not a wait for the daemon.
VIEW_FAILS_WITHIN_S = 1.0
PASSWORD = "channels-demo"
#: The layer's log lines: an outage begins, and ends.
DOWN, BACK = "no broker reachable", "the broker is reachable again"


@pytest.fixture(scope="session")
def backend_url() -> str:
    """The memory backend only: a restart forgets every group, so the page's consumer
    must join its group again by itself (a durable backend would keep it for it)."""
    return "memory://"


class Session:
    """alice, logged in over HTTP: her cookies, for the WebSocket and the view."""

    def __init__(self, site_url: str) -> None:
        self.site_url = site_url
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def log_in(self, username: str) -> None:
        with self.opener.open(f"{self.site_url}/login/", timeout=DELIVERY_TIMEOUT_S) as page:
            found = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.read().decode())
        assert found, "the login page has a CSRF token"
        form = {"username": username, "password": PASSWORD, "csrfmiddlewaretoken": found[1]}
        self.opener.open(
            f"{self.site_url}/login/", urllib.parse.urlencode(form).encode(), DELIVERY_TIMEOUT_S
        ).close()
        assert "sessionid" in self.cookies(), "logged in"

    def cookies(self) -> dict[str, str]:
        return {cookie.name: cookie.value for cookie in self.jar if cookie.value is not None}

    def notify(self, to: str, text: str) -> tuple[int, dict[str, Any]]:
        """POST /notify/, the sync view: its status and JSON answer."""
        request = urllib.request.Request(
            f"{self.site_url}/notify/",
            data=urllib.parse.urlencode({"to": to, "text": text}).encode(),
            headers={"X-CSRFToken": self.cookies()["csrftoken"]},
        )
        try:
            with self.opener.open(request, timeout=RECONNECT_TIMEOUT_S) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read())


@pytest.fixture
def worker(site: Any, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``manage.py runworker notifications-worker``, its output in ``worker.log``."""
    with (tmp_path / "worker.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "runworker", "notifications-worker"],
            cwd=EXAMPLE_DIR,
            env=site.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def log_lines(path: Path, text: str) -> list[str]:
    return [line for line in path.read_text(errors="replace").splitlines() if text in line]


async def wait_for_line(path: Path, text: str, timeout_s: float = RECONNECT_TIMEOUT_S) -> None:
    """Until a line of the log at ``path`` holds ``text`` (a log file gives no event)."""
    deadline = time.monotonic() + timeout_s
    while not log_lines(path, text):
        assert time.monotonic() < deadline, f"no {text!r} in {path} within {timeout_s} s"
        await asyncio.sleep(POLL_S)


async def wait_for_membership(broker: Any) -> None:
    """Until the daemon holds a group membership again: the page's consumer rejoined."""
    deadline = time.monotonic() + RECONNECT_TIMEOUT_S
    while True:
        _, body = await asyncio.to_thread(http_get, broker.metrics_port, "/status")
        waiting = json.loads(body)["waiting"]
        if waiting is not None and waiting["memberships"] >= 1:
            return
        assert time.monotonic() < deadline, "the consumer did not join its group again"
        await asyncio.sleep(POLL_S)


def manage(site: Any, *args: str) -> str:
    return str(site.manage(*args))


async def next_texts(page: WebSocket, count: int) -> list[str]:
    return [(await page.receive_json(DELIVERY_TIMEOUT_S))["text"] for _ in range(count)]


async def test_worker_and_open_page_outlive_a_15_s_broker_outage(
    site: Any, own_broker: Any, worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    """1. alice's notifications page is open (a WebSocket to NotificationConsumer in
       Daphne) and the worker runs: a job queued for the worker reaches the page.
    2. The broker is killed and stays away 15 s. Meanwhile both processes log the outage
       (once), and go on; once it has been away longer than connect_timeout, the sync
       view answers 503 at once, naming the refused connection and the command to run.
    3. The broker starts again, empty. A notification from ``manage.py notify``, one
       queued through the worker and one from the view, all sent after the restart,
       reach the page; the page never closed and the worker never exited.
    4. Each process logged the outage's end once, and no other outage.
    """
    session = Session(site.url)
    await asyncio.to_thread(session.log_in, "alice")
    cookie = "; ".join(f"{name}={value}" for name, value in session.cookies().items())
    page = await WebSocket.connect(
        "127.0.0.1", site.port, "/ws/notifications/", {"Cookie": cookie, "Origin": site.url}
    )
    try:
        await asyncio.to_thread(manage, site, "notify", "--via-worker", "alice", "before")
        assert await next_texts(page, 1) == ["before"]  # the worker is up, and connected

        await outage(site, own_broker, session, tmp_path / "worker.log")

        await wait_for_membership(own_broker)
        await asyncio.to_thread(manage, site, "notify", "alice", "after, direct")
        await asyncio.to_thread(manage, site, "notify", "--via-worker", "alice", "after, worker")
        assert await asyncio.to_thread(session.notify, "alice", "after, view") == (
            200,
            {"ok": True},
        )
        assert sorted(await next_texts(page, 3)) == [
            "after, direct",
            "after, view",
            "after, worker",
        ]
        assert not page.closed.done(), "the page's WebSocket closed"
        assert worker.poll() is None, "the worker exited"
    finally:
        await page.close()
    for log in (site.log_path, tmp_path / "worker.log"):
        assert len(log_lines(log, DOWN)) == 1, f"{log}: the outage logged once"
        assert len(log_lines(log, BACK)) == 1, f"{log}: its end logged once"


async def outage(site: Any, broker: Any, session: Session, worker_log: Path) -> None:
    """Step 2: the broker away for ``OUTAGE_S``, and what must hold meanwhile."""
    await asyncio.to_thread(broker.kill)
    killed_at = time.monotonic()
    for log in (site.log_path, worker_log):
        await wait_for_line(log, DOWN)
    # A restart is over by connect_timeout: after it the view does not wait any more.
    await asyncio.sleep(max(0.0, killed_at + CONNECT_TIMEOUT_S + 0.5 - time.monotonic()))
    started = time.monotonic()
    status, answer = await asyncio.to_thread(session.notify, "alice", "during")
    assert time.monotonic() - started < VIEW_FAILS_WITHIN_S
    assert status == 503
    assert "connection refused at" in answer["error"]
    assert f"channels-broker serve --listen 127.0.0.1:{broker.port}" in answer["error"]
    await asyncio.sleep(max(0.0, killed_at + OUTAGE_S - time.monotonic()))  # the outage itself
    assert not log_lines(site.log_path, BACK) and not log_lines(worker_log, BACK)
    await asyncio.to_thread(broker.start)
    for log in (site.log_path, worker_log):
        await wait_for_line(log, BACK, SITE_READY_TIMEOUT_S)
