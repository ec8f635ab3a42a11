"""Creates the demo users alice and bob (password: DEMO_PASSWORD)."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.hashers import make_password
from django.db import migrations

DEMO_USERS = ("alice", "bob")
#: Shown on the login page; this is a local demo, not a deployment.
DEMO_PASSWORD = "channels-demo"


def create_demo_users(apps: Any, schema_editor: Any) -> None:
    user_model = apps.get_model("auth", "User")
    for username in DEMO_USERS:
        user_model.objects.get_or_create(
            username=username, defaults={"password": make_password(DEMO_PASSWORD)}
        )


def delete_demo_users(apps: Any, schema_editor: Any) -> None:
    apps.get_model("auth", "User").objects.filter(username__in=DEMO_USERS).delete()


class Migration(migrations.Migration):
    dependencies = [("auth", "0012_alter_user_first_name_max_length")]

    operations = [migrations.RunPython(create_demo_users, delete_demo_users)]
