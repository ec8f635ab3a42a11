"""``async_to_sync(layer.group_send)`` and ``async_to_sync(layer.send)`` from sync code
(Django views, Celery tasks) without connecting an event loop that lives for one call.

asgiref runs each such call on a new event loop in a new thread, made for that call
alone. Connecting that loop to the daemon (or adopting a parked connection) and
settling it as the loop closes cost more than the call. Nothing else runs on such a
loop, so the call may block it: it goes the way ``broker.layer.sync`` does, on a
blocking connection kept for the *calling* thread. That connection is found again on
the caller's next call through a context variable: asgiref copies the caller's context
into the loop and copies it back after, so what is set here reaches the next call.
One caller, one connection: its calls keep their order; a numbered group send is
written, not waited for, as ``broker.layer.sync`` writes it.
"""

from __future__ import annotations

import asyncio
import threading
import types
import weakref
from contextvars import ContextVar

from asgiref.sync import AsyncToSync

from .sync_calls import Layer, SyncLayer

__all__ = ["SHORT_LOOPS", "caller_calls"]

#: The loops ``async_to_sync`` made for one call each, while they run (asgiref 3.7+):
#: ``asyncio.get_running_loop() in SHORT_LOOPS`` on such a loop only, not a server's.
SHORT_LOOPS: dict[asyncio.AbstractEventLoop, object] = getattr(
    AsyncToSync, "loop_thread_executors", {}
)


class Caller:
    """One calling thread's blocking calls of one layer, and who uses them now."""

    __slots__ = ("busy", "calls")

    def __init__(self, layer: Layer) -> None:
        self.calls = SyncLayer(layer, caller=types.SimpleNamespace())
        self.busy = threading.Lock()

    def __enter__(self) -> SyncLayer:
        return self.calls

    def __exit__(self, *exc_info: object) -> None:
        self.busy.release()


#: Per calling context (so per calling thread), its ``Caller`` of each layer.
_callers: ContextVar[weakref.WeakKeyDictionary[Layer, Caller]] = ContextVar(
    "channels_broker_short_loop_callers"
)


def caller_calls(layer: Layer) -> Caller | None:
    """The calling thread's ``Caller`` of ``layer``, held until its ``with`` ends; None
    if another thread holds it now (a context copied to several threads): then the
    call goes the event loop's way."""
    callers = _callers.get(None)
    if callers is None:
        callers = weakref.WeakKeyDictionary()
        _callers.set(callers)
    caller = callers.get(layer)
    if caller is None:
        caller = callers[layer] = Caller(layer)
    return caller if caller.busy.acquire(blocking=False) else None
