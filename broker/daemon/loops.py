"""The event loop the daemon runs on: asyncio's own, or uvloop's (``--loop``)."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any

from broker.errors import ConfigError

__all__ = ["loop_name", "run_on_loop"]


def loop_name(choice: str, has_tls: bool = False) -> str:
    """``asyncio`` or ``uvloop`` for a ``--loop`` value; ``auto`` is uvloop when importable
    and the TCP listeners speak plain TCP.

    TLS listeners need asyncio's loop: uvloop starts reading a socket as soon as its
    protocol is made, whatever that protocol asked, so the ClientHello would reach the
    daemon instead of the TLS handshake (``daemon/tls.py``). Raises ``ConfigError`` for
    ``uvloop`` with TLS, or when it is not installed: a daemon asked for uvloop must not
    start quietly on another loop."""
    is_installed = importlib.util.find_spec("uvloop") is not None
    if choice == "uvloop" and not is_installed:
        raise ConfigError(
            "--loop uvloop: uvloop is not installed (pip install 'channels-broker[uvloop]'),"
            " or give --loop asyncio"
        )
    if choice == "uvloop" and has_tls:
        raise ConfigError("--loop uvloop cannot serve TLS (--tls-cert): give --loop asyncio")
    if choice == "auto":
        return "uvloop" if is_installed and not has_tls else "asyncio"
    return choice


def _factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if name != "uvloop":
        return None  # asyncio.Runner's default: a new loop of the default policy
    import uvloop

    new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return new_loop


def run_on_loop(name: str, main: Coroutine[Any, Any, None]) -> None:
    """``asyncio.run(main)`` on a new loop of kind ``name`` (see ``loop_name``)."""
    with asyncio.Runner(loop_factory=_factory(name)) as runner:
        runner.run(main)
