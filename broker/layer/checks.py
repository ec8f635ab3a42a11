"""``manage.py check`` for the ``CHANNEL_LAYERS`` entries that use this layer.

The layer refuses a CONFIG it cannot use when it is made, which in a Django site is the
first request or message that needs it. These checks run the same refusals
(``broker.layer.settings.config_problems``, ``encryption_for``) on every entry whose
``BACKEND`` is ``BrokerChannelLayer`` (or a subclass), so that ``manage.py check``,
``runserver`` and a deploy's check step show them first. They are registered by the
``broker.layer`` app (``INSTALLED_APPS``; see docs/migrating.md).

Ids: E001 a Redis address in ``hosts``, E002 channels_postgres's database keys, E003 a
channels_redis key with no meaning here, E004 an unknown key, E005 a bad value, E006
``symmetric_encryption_keys``, E007 a ``BACKEND`` of ours that does not import; W001 a
``hosts`` entry that looks like Redis's port or socket.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core import checks
from django.utils.module_loading import import_string

from .channel_layer import BrokerChannelLayer
from .encryption import encryption_for
from .settings import config_problems

__all__ = [
    "BACKEND_IMPORT",
    "ENCRYPTION_KEYS",
    "REDIS_LOOKALIKE",
    "channel_layer_messages",
    "check_channel_layers",
]

ENCRYPTION_KEYS = "channels_broker.E006"
BACKEND_IMPORT = "channels_broker.E007"
REDIS_LOOKALIKE = "channels_broker.W001"
#: Redis's own port: a daemon listening there is possible, a Redis left there is likelier.
REDIS_PORT = 6379
OUR_BACKEND = "broker.layer.BrokerChannelLayer"


def check_channel_layers(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """The check Django runs (registered by ``broker.layer.apps``)."""
    return channel_layer_messages(getattr(settings, "CHANNEL_LAYERS", {}))


def channel_layer_messages(layers: Mapping[str, Any]) -> list[checks.CheckMessage]:
    """Errors and warnings for each entry of ``layers`` (``CHANNEL_LAYERS``) that uses
    this layer: its CONFIG, and its TEST_CONFIG if it has one."""
    messages: list[checks.CheckMessage] = []
    for alias, entry in layers.items():
        if not isinstance(entry, Mapping):
            continue
        where = f"CHANNEL_LAYERS[{alias!r}]"
        backend_error = _backend_error(entry.get("BACKEND"), where)
        if backend_error is not None:
            messages.append(backend_error)
        if backend_error is not None or not _is_ours(entry.get("BACKEND")):
            continue
        for part in ("CONFIG", "TEST_CONFIG"):
            if part in entry or part == "CONFIG":
                messages += config_messages(entry.get(part, {}), f"{where}[{part!r}]")
    return messages


def _is_ours(backend: object) -> bool:
    if not isinstance(backend, str):
        return False
    try:
        found = import_string(backend)
    except ImportError:
        return False  # another layer's package, not installed here: not ours to judge
    return isinstance(found, type) and issubclass(found, BrokerChannelLayer)


def _backend_error(backend: object, where: str) -> checks.CheckMessage | None:
    """E007 for a ``BACKEND`` in our package that does not import (a typo), else None."""
    if not isinstance(backend, str) or not backend.startswith("broker."):
        return None
    try:
        import_string(backend)
    except ImportError as exc:
        return checks.Error(
            f"BACKEND {backend!r} cannot be imported: {exc}",
            hint=f'write "BACKEND": "{OUR_BACKEND}"',
            obj=where,
            id=BACKEND_IMPORT,
        )
    return None


def config_messages(config: object, where: str) -> list[checks.CheckMessage]:
    """The messages for one CONFIG of this layer; ``where`` names it (``obj``)."""
    messages: list[checks.CheckMessage] = [
        checks.Error(problem.message, hint=problem.hint, obj=where, id=problem.check_id)
        for problem in config_problems(config)
    ]
    if isinstance(config, Mapping):
        messages += _encryption_errors(config, where)
        messages += _redis_lookalikes(config.get("hosts"), where)
    return messages


def _encryption_errors(config: Mapping[str, Any], where: str) -> list[checks.CheckMessage]:
    keys = config.get("symmetric_encryption_keys")
    expiry = config.get("expiry", 60)
    try:
        encryption_for(keys, expiry if isinstance(expiry, int | float) else 60)
    except (TypeError, ValueError, ImportError) as exc:
        hint = "write a list of keys, as [SECRET_KEY]: the first encrypts, every key decrypts"
        return [
            checks.Error(str(exc), hint=f"{hint} (docs/security.md)", obj=where, id=ENCRYPTION_KEYS)
        ]
    return []


def _redis_lookalikes(hosts: object, where: str) -> list[checks.CheckMessage]:
    """W001 for daemon addresses that look like a Redis server's."""
    if not isinstance(hosts, list | tuple):
        return []
    warnings: list[checks.CheckMessage] = []
    for index, entry in enumerate(hosts):
        if not isinstance(entry, str):
            continue
        parts = urlsplit(entry)
        try:
            port = parts.port
        except ValueError:
            continue  # config_problems has said so
        if port == REDIS_PORT or (parts.scheme == "unix" and "redis" in parts.path):
            warnings.append(
                checks.Warning(
                    f"hosts[{index}], {entry!r}, looks like a Redis server's address",
                    hint="hosts lists channels-broker daemons (`channels-broker serve`"
                    " listens on port 7733 by default); Redis goes in the daemon's --backend",
                    obj=where,
                    id=REDIS_LOOKALIKE,
                )
            )
    return warnings
