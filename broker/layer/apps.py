"""The ``broker.layer`` Django app: put it in ``INSTALLED_APPS`` for ``manage.py check``
to validate the ``CHANNEL_LAYERS`` entries that use this layer (``broker.layer.checks``).
The layer works without it; only the checks need it."""

from __future__ import annotations

from django.apps import AppConfig
from django.core import checks

from .checks import check_channel_layers

__all__ = ["BrokerLayerConfig"]


class BrokerLayerConfig(AppConfig):  # type: ignore[misc]
    """Registers the checks; no models, no migrations."""

    name = "broker.layer"
    #: "layer", Django's default from the name, says too little among a site's apps.
    label = "channels_broker"
    verbose_name = "channels-broker layer"

    def ready(self) -> None:
        checks.register(check_channel_layers)
