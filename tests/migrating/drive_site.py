"""Drives the example site's consumers through whatever channel layer its settings name.

Run by tests/migrating/test_migrating_doc.py as its own process, in a copy of the site
(the working directory) with the settings under test: a notifications page gets what
``manage.py notify`` (another process, as a background job) sends, and two chat pages
get what one of them says. Pages are ``channels.testing.WebsocketCommunicator``s on the
site's own routes and consumers, logged in as the demo users. Exits 0 once every message
arrived, and fails (a traceback, exit 1) when one does not within ``TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from typing import Any

sys.path.insert(0, os.getcwd())  # the site's packages, as manage.py would find them

import django

django.setup()

from channels.routing import URLRouter  # noqa: E402
from channels.testing import WebsocketCommunicator  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402
from notifications.routing import websocket_urlpatterns  # noqa: E402

#: How long a page waits for a message: far above a loaded machine's delivery time.
TIMEOUT_S = 10


async def open_page(path: str, username: str) -> WebsocketCommunicator:
    """A WebSocket on ``path`` logged in as ``username``, accepted by its consumer."""
    communicator = WebsocketCommunicator(URLRouter(websocket_urlpatterns), path)
    communicator.scope["user"] = await get_user_model().objects.aget(username=username)
    connected, _ = await communicator.connect(TIMEOUT_S)
    assert connected, f"{path} refused {username}"
    return communicator


async def next_with_text(page: WebsocketCommunicator, text: str) -> dict[str, Any]:
    """The next message on ``page`` carrying ``text``; others (from other test runs on the
    same Redis) are passed over."""
    while True:
        message: dict[str, Any] = await page.receive_json_from(TIMEOUT_S)
        if message.get("text") == text:
            return message


async def notify(username: str, text: str) -> None:
    """``manage.py notify``: plain sync code in its own process, as a background job."""
    command = await asyncio.create_subprocess_exec(
        sys.executable, "manage.py", "notify", username, text
    )
    assert await command.wait() == 0, "manage.py notify failed"


async def main() -> None:
    text = f"report-{uuid.uuid4().hex[:8]}"
    feed = await open_page("/ws/notifications/", "alice")
    await notify("alice", text)
    print("notification:", await next_with_text(feed, text))

    room = f"room-{uuid.uuid4().hex[:8]}"
    alice = await open_page(f"/ws/chat/{room}/", "alice")
    bob = await open_page(f"/ws/chat/{room}/", "bob")
    await alice.send_json_to({"text": text})
    for page in (alice, bob):
        print("chat:", await next_with_text(page, text))

    for page in (feed, alice, bob):
        await page.disconnect()
    print("every message arrived")


if __name__ == "__main__":
    asyncio.run(main())
