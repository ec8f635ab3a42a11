"""A backend wrapper that times every storage call and counts the ones that failed.

The daemon talks to storage through one object, so wrapping it sees every call of a
shared backend (Redis, PostgreSQL) without a line of metrics code in any of them.
Only shared backends are wrapped: their calls are network round trips, next to
which the wrapper's microsecond is noise, and their latency is worth watching. A
``memory://`` call is a dictionary update of about a microsecond; timing it would
cost as much as the call and tell nothing. Messages are counted by the connection,
per protocol operation, whatever the backend.
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Callable
from time import perf_counter
from typing import Any, Self
from urllib.parse import urlsplit

from backends import Backend, BackendError, BackendStats, WakeupCallback

from .metrics import Metrics

__all__ = ["BACKEND_OPERATIONS", "InstrumentedBackend", "instrument"]

#: Every storage call of the contract (its coroutine methods, less the status query),
#: made up front so each series exists from the first scrape.
BACKEND_OPERATIONS = (
    tuple(
        name
        for name, value in vars(Backend).items()
        if not name.startswith("_")
        and inspect.iscoroutinefunction(value)
        and name != "top_channels"
    )
    + ("send_reserving", "send_reserved", "reserve_room", "release_room")
    + (  # ReservesRoom
        "seq_was_stored",  # RecordsSeqs
        "record_seq",
    )
)


def instrument(backend: Backend, metrics: Metrics, url: str) -> Backend:
    """``backend`` wrapped for ``metrics`` if it is shared, else ``backend`` itself.

    Either way ``metrics`` is labelled with ``url``'s scheme.
    """
    metrics.backend_label = urlsplit(url).scheme or type(backend).__name__.lower()
    if not backend.is_shared:
        return backend
    # The storage calls are filled in by _complete() at import, which mypy cannot see.
    return InstrumentedBackend(backend, metrics)  # type: ignore[abstract]


class InstrumentedBackend(Backend):
    """Delegates to ``inner``, timing each storage call into ``metrics``.

    The storage calls (every coroutine method of ``Backend``, see
    ``BACKEND_OPERATIONS``) are made below this class by ``_timed_call``, one per
    name, so a method added to the contract later is timed too, not left abstract.
    """

    def __init__(self, inner: Backend, metrics: Metrics) -> None:
        super().__init__()
        self.inner = inner
        self.metrics = metrics
        self.is_shared = inner.is_shared
        for operation in BACKEND_OPERATIONS:
            metrics.backend_histogram(operation)

    def __getattr__(self, name: str) -> Any:
        # A backend's own extras (not in the contract) stay reachable through the wrapper.
        if name == "inner":  # not set yet: do not recurse
            raise AttributeError(name)
        return getattr(self.inner, name)

    @classmethod
    def from_url(cls, url: str) -> Self:
        raise BackendError("InstrumentedBackend wraps a backend; it is not made from a URL")

    def set_wakeup(self, callback: WakeupCallback) -> None:
        self.inner.set_wakeup(callback)

    def watch(self, ns: str, key: str) -> None:
        self.inner.watch(ns, key)

    def unwatch(self, ns: str, key: str) -> None:
        self.inner.unwatch(ns, key)

    def stats(self) -> BackendStats:
        return self.inner.stats()

    async def top_channels(self, limit: int) -> list[tuple[str, str, int]] | None:
        # Asked on demand by `channels-broker status`, not a storage call worth timing.
        return await self.inner.top_channels(limit)


def _timed_call(operation: str) -> Callable[..., Any]:
    """A method calling ``inner.<operation>``, timed, its failures counted.

    Written out in one coroutine (not as a helper the method awaits): a coroutine
    layer costs about a microsecond, and this runs for every storage call.
    """

    async def call(self: InstrumentedBackend, *args: Any, **kwargs: Any) -> Any:
        started = perf_counter()
        try:
            return await getattr(self.inner, operation)(*args, **kwargs)
        except Exception:
            errors = self.metrics.backend_errors
            errors[operation] = errors.get(operation, 0) + 1
            raise
        finally:
            self.metrics.backend_calls[operation].observe(perf_counter() - started)

    call.__name__ = call.__qualname__ = operation
    return call


def _delegate(name: str) -> Callable[..., Any]:
    def method(self: InstrumentedBackend, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.inner, name)(*args, **kwargs)

    method.__name__ = method.__qualname__ = name
    return method


def _complete() -> None:
    """Give ``InstrumentedBackend`` every method of the contract it does not define."""
    for name, value in vars(Backend).items():
        if name.startswith("_") or name in vars(InstrumentedBackend):
            continue
        if inspect.iscoroutinefunction(value):
            setattr(InstrumentedBackend, name, _timed_call(name))
        elif inspect.isfunction(value):
            setattr(InstrumentedBackend, name, _delegate(name))
    for name in BACKEND_OPERATIONS:  # send windows' calls (``backends.ReservesRoom``) too
        if name not in vars(InstrumentedBackend):
            setattr(InstrumentedBackend, name, _timed_call(name))
    abc.update_abstractmethods(InstrumentedBackend)  # type: ignore[type-abstract]


_complete()
