"""A CONFIG the layer cannot use: each problem, and the error that names them all."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from django.core.exceptions import ImproperlyConfigured

__all__ = [
    "BAD_VALUE",
    "FOREIGN_KEY",
    "POSTGRES_DATABASE",
    "REDIS_ADDRESS",
    "UNKNOWN_KEY",
    "LayerConfigError",
    "Problem",
]

#: The ids ``manage.py check`` shows (``broker.layer.checks``), one per kind of mistake.
REDIS_ADDRESS = "channels_broker.E001"  # a Redis server where the daemon belongs
POSTGRES_DATABASE = "channels_broker.E002"  # channels_postgres's database keys
FOREIGN_KEY = "channels_broker.E003"  # a channels_redis key with no meaning here
UNKNOWN_KEY = "channels_broker.E004"
BAD_VALUE = "channels_broker.E005"


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a CONFIG: ``key`` as written (``hosts[0]``), what is wrong
    with it, what to write instead, and its ``manage.py check`` id."""

    key: str
    message: str
    hint: str
    check_id: str

    def __str__(self) -> str:
        return f"{self.message}: {self.hint}"


class LayerConfigError(ImproperlyConfigured, ValueError):  # type: ignore[misc]
    """``CHANNEL_LAYERS`` CONFIG that ``BrokerChannelLayer`` cannot use, raised when the
    layer is made: ``problems`` holds each mistake with what to write instead.

    An ``ImproperlyConfigured``, as Django reports settings mistakes, and a ``ValueError``,
    as the layer refused a bad ``hosts`` entry before.
    """

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        lines = [f"- {problem}" for problem in self.problems]
        super().__init__(
            "broker.layer.BrokerChannelLayer cannot use this CONFIG "
            "(docs/migrating.md says what each key means here):\n" + "\n".join(lines)
        )
