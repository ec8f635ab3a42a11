"""The ASGI application: Django for HTTP, consumers for WebSockets (Daphne), the worker."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "notifications_site.settings")
# Set Django up before anything imports models (the consumers do, through auth).
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ChannelNameRouter, ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from notifications.messaging import WORKER_CHANNEL  # noqa: E402
from notifications.routing import websocket_urlpatterns  # noqa: E402
from notifications.workers import NotificationWorker  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
        ),
        # What `manage.py runworker notifications-worker` serves.
        "channel": ChannelNameRouter({WORKER_CHANNEL: NotificationWorker.as_asgi()}),
    }
)
