"""A background worker: ``manage.py runworker notifications-worker`` runs it.

Views and commands queue a job on its channel (``queue_notification``) and return at
once; the worker does the job, here a notification to every page the user has open.
The job carries the user's id, not the user: a message holds plain values only.
"""

from __future__ import annotations

from typing import Any

from channels.consumer import AsyncConsumer

from .messaging import notification_group

__all__ = ["NotificationWorker"]


class NotificationWorker(AsyncConsumer):
    """Handles ``notify.user`` jobs: ``{"user_id": ..., "data": {...}}``."""

    async def notify_user(self, job: dict[str, Any]) -> None:
        data = {**job["data"], "source": "worker"}
        await self.channel_layer.group_send(
            notification_group(job["user_id"]), {"type": "task.notification", "data": data}
        )
