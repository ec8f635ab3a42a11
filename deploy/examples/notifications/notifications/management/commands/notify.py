"""``manage.py notify [--via-worker] USERNAME TEXT``: notify a user's open pages, as a
background job would; with ``--via-worker``, through the worker (``runworker``)."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from broker.layer import BrokerUnavailable

from ...messaging import queue_notification, send_message


class Command(BaseCommand):
    help = "Send a notification to every page USERNAME has open."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("text")
        parser.add_argument(
            "--via-worker",
            action="store_true",
            help="queue it for `manage.py runworker notifications-worker` instead",
        )

    def handle(
        self, *args: Any, username: str, text: str, via_worker: bool, **options: Any
    ) -> None:
        try:
            user = get_user_model().objects.get(username=username)
        except get_user_model().DoesNotExist:
            raise CommandError(f"no user {username!r}") from None
        data = {"text": text, "source": "command", "sender": "manage.py"}
        try:
            (queue_notification if via_worker else send_message)(user, data)
        except BrokerUnavailable as exc:
            raise CommandError(f"broker unavailable: {exc}") from exc
        self.stdout.write(f"{'queued for' if via_worker else 'notified'} {username}")
