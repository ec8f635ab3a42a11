"""Sending to a user's open pages from plain sync code (views, commands, background jobs)."""

from __future__ import annotations

from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from broker.layer import sync

__all__ = [
    "WORKER_CHANNEL",
    "chat_group",
    "notification_group",
    "queue_notification",
    "send_message",
]

#: The channel ``manage.py runworker notifications-worker`` reads (see ``workers``).
WORKER_CHANNEL = "notifications-worker"


def notification_group(user_id: int) -> str:
    """The group every open notifications page of one user joins."""
    return f"notification-{user_id}"


def chat_group(room: str) -> str:
    """The group every page open on one chat room joins."""
    return f"chat-{room}"


def send_message(user: Any, data: dict[str, Any]) -> None:
    """Show ``data`` on every notifications page ``user`` has open right now.

    Plain sync code: call it from a view, a management command or a Celery task.
    ``broker.layer.sync`` sends on a connection of this thread's, with no event loop
    (``async_to_sync(get_channel_layer().group_send)(...)`` works too, several times
    slower). Raises ``broker.layer.BrokerUnavailable`` if no broker answers in time.
    """
    sync.group_send(notification_group(user.pk), {"type": "task.notification", "data": data})


def queue_notification(user: Any, data: dict[str, Any]) -> None:
    """Have the background worker notify ``user`` (``manage.py runworker notifications-worker``).

    The job waits on the worker's channel (up to the layer's ``expiry``) if no worker
    reads it yet, or while the broker restarts under the worker.
    """
    async_to_sync(get_channel_layer().send)(
        WORKER_CHANNEL, {"type": "notify.user", "user_id": user.pk, "data": data}
    )
