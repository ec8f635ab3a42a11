"""What every connection of one daemon shares."""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass, field
from typing import Any

from backends import Backend
from broker.config import Config
from broker.ops.metrics import Metrics

from .bounds import Bounds
from .routing import Router
from .tokens import IgnoredTokens, TokenTable
from .windows import Senders

__all__ = ["Context"]


@dataclass(slots=True)
class Context:
    """The daemon's shared parts, handed to each new connection."""

    config: Config
    backend: Backend
    router: Router
    #: Live connections, for shutdown and gauges (typed loosely to avoid an import cycle).
    connections: set[Any] = field(default_factory=set)
    accepting: bool = True
    #: Counters of requests and errors (``broker.ops.metrics``), exported at scrape time.
    metrics: Metrics = field(default_factory=Metrics)
    #: The tokens HELLO may carry and their namespaces; None: no token is asked for.
    #: Replaced whole on SIGHUP (``Server.reload``).
    tokens: TokenTable | None = None
    #: The store's name as WELCOME gives it ("": a shared store); see ``restarts``.
    incarnation: str = ""
    #: The clients told that this daemon, having no tokens, ignores theirs.
    ignored_tokens: IgnoredTokens = field(default_factory=IgnoredTokens)
    #: Connection counts, and the counting and logging of every bound hit (``bounds``).
    bounds: Bounds = field(init=False)
    #: What the numbered SENDs of each client with an owned id came to (``windows``).
    senders: Senders = field(init=False)
    #: Per (namespace, client id), held while a run of its numbered GROUP_SENDs is handled
    #: and recorded (``group_sends``): kept while a connection of the client holds it.
    group_send_locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = field(
        default_factory=weakref.WeakValueDictionary
    )

    def __post_init__(self) -> None:
        self.bounds = Bounds(self.config, self.metrics)
        self.senders = Senders(self.config.max_connections)
