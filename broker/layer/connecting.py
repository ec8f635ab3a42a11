"""Reaching a daemon: its hosts from a random one, backoff between rounds, TLS, and taking
over a connection a closed event loop parked (see ``parking``)."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import TypeVar

from .parking import ParkedConnection
from .settings import Host, LayerSettings

__all__ = ["RECONNECT_FIRST_DELAY_S", "RECONNECT_MAX_DELAY_S", "adopt", "connect_any", "rotated"]

log = logging.getLogger("channels_broker.layer")

#: Reconnect backoff: first delay, cap, in seconds; each attempt is jittered, so the
#: processes of a site that lost their daemon do not all come back in the same instant.
RECONNECT_FIRST_DELAY_S = 0.05
RECONNECT_MAX_DELAY_S = 2.0

_P = TypeVar("_P", bound=asyncio.Protocol)


async def connect_any(
    settings: LayerSettings, loop: asyncio.AbstractEventLoop, factory: Callable[[], _P]
) -> _P:
    """A connection to the first host that answers; tries again, with backoff, until
    cancelled (the caller bounds the wait)."""
    delay = RECONNECT_FIRST_DELAY_S
    while True:
        for host in rotated(settings.hosts):
            try:
                return await _open(settings, loop, host, factory)
            except OSError as exc:
                log.debug("cannot connect to %s: %s", host, exc)
        await asyncio.sleep(delay * random.uniform(0.5, 1.5))
        delay = min(delay * 2, RECONNECT_MAX_DELAY_S)


async def _open(
    settings: LayerSettings,
    loop: asyncio.AbstractEventLoop,
    host: Host,
    factory: Callable[[], _P],
) -> _P:
    scheme, address, port = host
    if scheme == "unix":
        _, conn = await loop.create_unix_connection(factory, address)
    else:
        tls = settings.tls_for(host)
        _, conn = await loop.create_connection(factory, address, port, ssl=tls)
    return conn


async def adopt(
    parked: ParkedConnection, loop: asyncio.AbstractEventLoop, factory: Callable[[], _P]
) -> _P:
    """Take over the socket of a parked connection: no connect, no HELLO."""
    _, conn = await loop.create_connection(factory, sock=parked.sock)
    return conn


def rotated(hosts: tuple[Host, ...]) -> list[Host]:
    """Hosts starting at a random one, so clients spread over several daemons."""
    start = random.randrange(len(hosts))
    return [*hosts[start:], *hosts[:start]]
