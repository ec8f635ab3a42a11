"""WebSocket consumers: a user's notification feed and a chat room."""

from __future__ import annotations

from typing import Any

from channels.generic.websocket import AsyncJsonWebsocketConsumer

from .messaging import chat_group, notification_group

__all__ = ["ChatConsumer", "NotificationConsumer"]

#: Longest chat line accepted from a browser, in characters.
MAX_CHAT_TEXT = 500


class NotificationConsumer(AsyncJsonWebsocketConsumer):
    """Forwards ``task.notification`` events of the logged-in user to the page."""

    group: str | None = None

    async def connect(self) -> None:
        user = self.scope["user"]
        if not user.is_authenticated:
            await self.close()
            return
        self.group = notification_group(user.pk)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if self.group is not None:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def task_notification(self, event: dict[str, Any]) -> None:
        await self.send_json(event["data"])


class ChatConsumer(AsyncJsonWebsocketConsumer):
    """One chat room: what a browser sends goes to every page open on the room."""

    group: str | None = None

    async def connect(self) -> None:
        user = self.scope["user"]
        if not user.is_authenticated:
            await self.close()
            return
        self.group = chat_group(self.scope["url_route"]["kwargs"]["room"])
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if self.group is not None:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if not isinstance(content, dict) or self.group is None:
            return
        text = str(content.get("text", "")).strip()[:MAX_CHAT_TEXT]
        if text:
            await self.channel_layer.group_send(
                self.group,
                {"type": "chat.message", "user": self.scope["user"].username, "text": text},
            )

    async def chat_message(self, event: dict[str, Any]) -> None:
        await self.send_json({"user": event["user"], "text": event["text"]})
