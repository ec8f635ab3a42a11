"""The example site on the broker, driven in headless Chromium: notifications, chat, restart."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

#: How long a page may take to show what was sent to it.
SHOW_TIMEOUT_S = 10.0
#: How long the site may take to work again after the broker restarts (the layer's
#: backoff is capped at 2 s; a few rounds and Daphne's own reconnect fit well within).
RECONNECT_DEADLINE_S = 20.0
PASSWORD = "channels-demo"
NOTIFICATIONS = "#notifications li"
MESSAGES = "#messages li"


def log_in(browser: Any, site: Any, username: str) -> Any:
    """A fresh browser context (its own cookies) logged in as ``username``."""
    context = browser.new_context(viewport={"width": 900, "height": 600})
    context.set_default_timeout(SHOW_TIMEOUT_S * 1000)
    page = context.new_page()
    page.goto(f"{site.url}/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("#login-submit")
    page.wait_for_url(f"{site.url}/")
    assert page.text_content("#username") == username
    wait_connected(page)
    return page


def open_page(context_page: Any, url: str) -> Any:
    """Another tab of the same user (same context, same session)."""
    page = context_page.context.new_page()
    page.goto(url)
    wait_connected(page)
    return page


def wait_connected(page: Any) -> None:
    page.wait_for_selector("#status.connected")


def texts(page: Any, selector: str) -> list[str]:
    found: list[str] = page.eval_on_selector_all(selector, "els => els.map(e => e.dataset.text)")
    return found


def wait_for_texts(page: Any, selector: str, expected: list[str]) -> None:
    """Wait until the page lists exactly ``expected``, in that order."""
    page.wait_for_function(
        "([selector, n]) => document.querySelectorAll(selector).length >= n",
        arg=[selector, len(expected)],
    )
    assert texts(page, selector) == expected


def notify_from_view(page: Any, to: str, text: str) -> str:
    """Use the page's form, which posts to the sync view; return its result line."""
    page.select_option("#notify-to", to)
    page.fill("#notify-text", text)
    page.evaluate("document.getElementById('notify-result').textContent = ''")
    page.click("#notify-send")
    page.wait_for_function(
        "['sent', 'failed'].some(w => document.getElementById('notify-result')"
        ".textContent.startsWith(w))",
        timeout=(RECONNECT_DEADLINE_S + 10) * 1000,
    )
    result: str = page.text_content("#notify-result")
    return result


def chat(page: Any, text: str) -> None:
    page.fill("#chat-text", text)
    page.click("#chat-send")


def retry_until_shown(
    trigger: Callable[[str], Any], page: Any, selector: str, stem: str
) -> list[str]:
    """Trigger ``stem-1``, ``stem-2``... until the page shows one of them; return those sent.

    After a restart, what was sent before the layer reconnected may be lost (memory
    backend), so the test retries, and fails only when nothing arrives by the deadline.
    """
    deadline = time.monotonic() + RECONNECT_DEADLINE_S
    sent: list[str] = []
    while time.monotonic() < deadline:
        text = f"{stem}-{len(sent) + 1}"
        sent.append(text)
        trigger(text)
        try:
            page.wait_for_function(
                "([selector, stem]) => [...document.querySelectorAll(selector)]"
                ".some(e => e.dataset.text.startsWith(stem))",
                arg=[selector, stem],
                timeout=1000,
            )
            return sent
        except Exception as exc:  # playwright's TimeoutError: try again
            if "Timeout" not in type(exc).__name__:
                raise
    pytest.fail(f"nothing of {sent} reached the page within {RECONNECT_DEADLINE_S} s")


def screenshot(page: Any, directory: Path, name: str) -> Path:
    path = directory / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def assert_not_blank(path: Path) -> None:
    """The PNG shows a page: many colours, and no single colour covers nearly all of it."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20) or []
        pixels = rgb.width * rgb.height
    assert len(colours) >= 16, f"{path} has only {len(colours)} colours"
    most = max(count for count, _ in colours)
    assert most < 0.97 * pixels, f"{path} is {most / pixels:.0%} one colour"


def test_each_user_sees_own_notifications_and_chat_survives_broker_restart(
    browser: Any, site: Any, own_broker: Any, tmp_path: Path
) -> None:
    """The example site, two users, two tabs each.

    1. alice and bob log in; their notification pages open a WebSocket each.
    2. Notifications from the sync view (the page's form) and from the management
       command reach the addressed user's page, in order, and never the other's.
    3. Two chat pages in one room exchange messages both ways.
    4. The broker restarts; without reloading, the pages work again once the
       consumers' layer has reconnected: notifications and chat both ways.
    5. Screenshots of every page are real pictures, not blank.
    """
    shots = tmp_path / "screenshots"
    shots.mkdir()
    room = f"room-{uuid.uuid4().hex[:8]}"
    alice = log_in(browser, site, "alice")
    bob = log_in(browser, site, "bob")

    # 2. From the view and from the command, to oneself and to the other user.
    assert notify_from_view(alice, "alice", "for alice 1 (view)") == "sent"
    assert notify_from_view(bob, "bob", "for bob 1 (view)") == "sent"
    assert notify_from_view(alice, "bob", "for bob 2 (view, from alice)") == "sent"
    assert "notified alice" in site.manage("notify", "alice", "for alice 2 (command)")
    assert "notified bob" in site.manage("notify", "bob", "for bob 3 (command)")
    assert notify_from_view(bob, "alice", "for alice 3 (view, from bob)") == "sent"
    wait_for_texts(
        alice,
        NOTIFICATIONS,
        ["for alice 1 (view)", "for alice 2 (command)", "for alice 3 (view, from bob)"],
    )
    wait_for_texts(
        bob,
        NOTIFICATIONS,
        ["for bob 1 (view)", "for bob 2 (view, from alice)", "for bob 3 (command)"],
    )

    # 3. Chat both ways.
    alice_chat = open_page(alice, f"{site.url}/chat/{room}/")
    bob_chat = open_page(bob, f"{site.url}/chat/{room}/")
    chat(alice_chat, "hello bob")
    wait_for_texts(bob_chat, MESSAGES, ["hello bob"])
    chat(bob_chat, "hello alice")
    wait_for_texts(alice_chat, MESSAGES, ["hello bob", "hello alice"])
    wait_for_texts(bob_chat, MESSAGES, ["hello bob", "hello alice"])
    for name, page in [("alice", alice), ("bob", bob), ("alice-chat", alice_chat)]:
        assert_not_blank(screenshot(page, shots, name))

    # 4. Restart the broker under the open pages.
    own_broker.restart()
    alice_after = retry_until_shown(
        lambda text: notify_from_view(alice, "alice", text), alice, NOTIFICATIONS, "alice after"
    )
    bob_after = retry_until_shown(
        lambda text: site.manage("notify", "bob", text, check=False),
        bob,
        NOTIFICATIONS,
        "bob after",
    )
    retry_until_shown(lambda text: chat(alice_chat, text), bob_chat, MESSAGES, "alice again")
    retry_until_shown(lambda text: chat(bob_chat, text), alice_chat, MESSAGES, "bob again")
    # Reconnected: from now on nothing is lost and order holds.
    alice_seen = texts(alice, NOTIFICATIONS)
    bob_seen = texts(bob, NOTIFICATIONS)
    assert notify_from_view(bob, "alice", "for alice, last (view)") == "sent"
    site.manage("notify", "bob", "for bob, last (command)")
    wait_for_texts(alice, NOTIFICATIONS, [*alice_seen, "for alice, last (view)"])
    wait_for_texts(bob, NOTIFICATIONS, [*bob_seen, "for bob, last (command)"])
    assert all(text.startswith("for alice") or text in alice_after for text in alice_seen)
    assert all(text.startswith("for bob") or text in bob_after for text in bob_seen)

    # 5. Pictures of every page after the restart, too.
    for name, page in [("alice-after", alice), ("bob-after", bob), ("bob-chat", bob_chat)]:
        assert_not_blank(screenshot(page, shots, name))
    for page in (alice, bob):
        page.context.close()
