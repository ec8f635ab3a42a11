"""The bench's errors, and the one-line form in which a failure is reported."""

from __future__ import annotations

from broker.errors import BrokerError

__all__ = ["BenchError", "NotApplicable", "Unverified", "describe"]


class BenchError(BrokerError):
    """A scenario did not finish or did not verify; the message says what was seen."""


class Unverified(BenchError):
    """The scenario finished and measured ``values``, but the deliveries were wrong."""

    def __init__(self, problem: str, values: list[float]) -> None:
        super().__init__(problem)
        self.values = values


class NotApplicable(BenchError):
    """The scenario does not apply to this target (the message says why): no value, no error."""


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
