"""WebSocket routes."""

from __future__ import annotations

from django.urls import path, re_path

from .consumers import ChatConsumer, NotificationConsumer

websocket_urlpatterns = [
    path("ws/notifications/", NotificationConsumer.as_asgi()),
    # Room names become group names, so they keep to the characters groups allow.
    re_path(r"^ws/chat/(?P<room>[-a-zA-Z0-9_.]{1,50})/$", ChatConsumer.as_asgi()),
]
