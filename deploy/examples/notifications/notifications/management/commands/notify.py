"""``manage.py notify USERNAME TEXT``: notify a user's open pages, as a background job would."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from broker.layer import BrokerUnavailable

from ...messaging import send_message


class Command(BaseCommand):
    help = "Send a notification to every page USERNAME has open."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("text")

    def handle(self, *args: Any, username: str, text: str, **options: Any) -> None:
        try:
            user = get_user_model().objects.get(username=username)
        except get_user_model().DoesNotExist:
            raise CommandError(f"no user {username!r}") from None
        try:
            send_message(user, {"text": text, "source": "command", "sender": "manage.py"})
        except BrokerUnavailable as exc:
            raise CommandError(f"broker unavailable: {exc}") from exc
        self.stdout.write(f"notified {username}")
