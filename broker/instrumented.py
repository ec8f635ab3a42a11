"""A backend wrapper that times every storage call and counts the messages it moved.

The daemon talks to storage through one object, so wrapping it sees every call of
every backend (memory, Redis, PostgreSQL) without a line of metrics code in any of
them: latency and errors per operation, and message counts from each call's result
(a ``send`` that returned False was rejected as full, a ``take`` returned what was
delivered). Calls a backend makes on itself are not seen, so nothing is counted twice.
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Callable, Sequence
from time import perf_counter
from typing import Any, Self
from urllib.parse import urlsplit

from backends import (
    Backend,
    BackendError,
    BackendStats,
    CapacityOf,
    GroupSendResult,
    Taken,
    WakeupCallback,
)

from .metrics import Metrics

__all__ = ["BACKEND_OPERATIONS", "InstrumentedBackend", "instrument"]

#: Storage calls timed, made up front so each series exists from the first scrape.
BACKEND_OPERATIONS = (
    "connect", "close", "is_ready", "send", "send_many", "take", "release",
    "channels_with_messages", "group_add", "group_discard", "group_send", "flush",
)  # fmt: skip


def instrument(backend: Backend, metrics: Metrics, url: str) -> Backend:
    """``backend`` wrapped so that ``metrics`` sees its calls; labelled by ``url``'s scheme."""
    metrics.backend_label = urlsplit(url).scheme or type(backend).__name__.lower()
    return InstrumentedBackend(backend, metrics)


class InstrumentedBackend(Backend):
    """Delegates to ``inner``, timing each storage call into ``metrics``."""

    def __init__(self, inner: Backend, metrics: Metrics) -> None:
        super().__init__()
        self.inner = inner
        self.metrics = metrics
        self.is_shared = inner.is_shared
        for operation in BACKEND_OPERATIONS:
            metrics.backend_histogram(operation)
        # Looked up once: a dict lookup per call is a cost we need not pay.
        self._send = metrics.backend_histogram("send")
        self._send_many = metrics.backend_histogram("send_many")
        self._take = metrics.backend_histogram("take")
        self._group_send = metrics.backend_histogram("group_send")

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
        return await self.inner.top_channels(limit)

    def _failed(self, operation: str) -> None:
        errors = self.metrics.backend_errors
        errors[operation] = errors.get(operation, 0) + 1

    # -- the calls whose results carry message counts ------------------------

    async def send(
        self, ns: str, channel: str, payload: bytes, *, capacity: int, expiry_s: float
    ) -> bool:
        started = perf_counter()
        try:
            accepted = await self.inner.send(
                ns, channel, payload, capacity=capacity, expiry_s=expiry_s
            )
        except Exception:
            self._failed("send")
            raise
        finally:
            self._send.observe(perf_counter() - started)
        if accepted:
            self.metrics.accepted["send"] += 1
        else:
            self.metrics.rejected["send"] += 1
        return accepted

    async def send_many(
        self,
        ns: str,
        items: Sequence[tuple[str, bytes]],
        *,
        capacity_of: CapacityOf,
        expiry_s: float,
    ) -> list[int]:
        started = perf_counter()
        try:
            refused = await self.inner.send_many(
                ns, items, capacity_of=capacity_of, expiry_s=expiry_s
            )
        except Exception:
            self._failed("send_many")
            raise
        finally:
            self._send_many.observe(perf_counter() - started)
        self.metrics.accepted["send_many"] += len(items) - len(refused)
        self.metrics.rejected["send_many"] += len(refused)
        return refused

    async def take(self, ns: str, channel: str, limit: int, *, hold: bool) -> list[Taken]:
        started = perf_counter()
        try:
            taken = await self.inner.take(ns, channel, limit, hold=hold)
        except Exception:
            self._failed("take")
            raise
        finally:
            self._take.observe(perf_counter() - started)
        # Held takes are pushes to a client's own channels; the others answer a RECEIVE.
        self.metrics.delivered["push" if hold else "pull"] += len(taken)
        return taken

    async def group_send(
        self, ns: str, group: str, payload: bytes, *, capacity_of: CapacityOf, expiry_s: float
    ) -> GroupSendResult:
        started = perf_counter()
        try:
            result = await self.inner.group_send(
                ns, group, payload, capacity_of=capacity_of, expiry_s=expiry_s
            )
        except Exception:
            self._failed("group_send")
            raise
        finally:
            self._group_send.observe(perf_counter() - started)
        metrics = self.metrics
        metrics.accepted["group_send"] += len(result.delivered)
        metrics.dropped += result.skipped
        metrics.fanout.observe(len(result.delivered) + result.skipped)
        return result

    # -- the others: timed only (see _timed) ---------------------------------

    async def connect(self) -> None:
        await self._timed("connect", self.inner.connect)

    async def close(self) -> None:
        await self._timed("close", self.inner.close)

    async def is_ready(self) -> bool:
        ready: bool = await self._timed("is_ready", self.inner.is_ready)
        return ready

    async def release(self, ns: str, channel: str, count: int) -> None:
        await self._timed("release", self.inner.release, ns, channel, count)

    async def channels_with_messages(self, ns: str, client_id: str) -> list[str]:
        names: list[str] = await self._timed(
            "channels_with_messages", self.inner.channels_with_messages, ns, client_id
        )
        return names

    async def group_add(self, ns: str, group: str, channel: str, *, group_expiry_s: float) -> None:
        await self._timed(
            "group_add", self.inner.group_add, ns, group, channel, group_expiry_s=group_expiry_s
        )

    async def group_discard(self, ns: str, group: str, channel: str) -> None:
        await self._timed("group_discard", self.inner.group_discard, ns, group, channel)

    async def flush(self, ns: str) -> None:
        await self._timed("flush", self.inner.flush, ns)

    async def _timed(
        self, operation: str, call: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        histogram = self.metrics.backend_histogram(operation)
        started = perf_counter()
        try:
            return await call(*args, **kwargs)
        except Exception:
            self._failed(operation)
            raise
        finally:
            histogram.observe(perf_counter() - started)


def _timed_delegate(name: str) -> Callable[..., Any]:
    async def method(self: InstrumentedBackend, *args: Any, **kwargs: Any) -> Any:
        return await self._timed(name, getattr(self.inner, name), *args, **kwargs)

    method.__name__ = name
    return method


def _delegate(name: str) -> Callable[..., Any]:
    def method(self: InstrumentedBackend, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.inner, name)(*args, **kwargs)

    method.__name__ = name
    return method


def _delegate_later_additions() -> None:
    """Pass through contract methods added after this wrapper was written.

    Without this a new method of ``Backend`` would either make the wrapper abstract
    (and every daemon with metrics fail to start) or, with a default body, silently
    answer with the base class's default instead of the real backend's.
    """
    for name, value in vars(Backend).items():
        if name.startswith("_") or name in vars(InstrumentedBackend):
            continue
        if inspect.iscoroutinefunction(value):
            setattr(InstrumentedBackend, name, _timed_delegate(name))
        elif inspect.isfunction(value):
            setattr(InstrumentedBackend, name, _delegate(name))
    abc.update_abstractmethods(InstrumentedBackend)


_delegate_later_additions()
