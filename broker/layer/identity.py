"""The client ids a layer's event loops use, each with the secret that proves it.

See ``protocol.identity``: the id is derived from the secret, the daemon checks the one
against the other at every HELLO, so nobody else can take the id (and the messages
waiting for it). The first half of every secret is the layer instance's family key, so
any event loop of this process may pull a channel another one made.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field

from protocol import SECRET_BYTES, client_id_for

__all__ = ["Family", "Identity"]

_HALF = SECRET_BYTES // 2


@dataclass(frozen=True, slots=True)
class Identity:
    """A client id and its secret: what HELLO carries, kept for every reconnect."""

    client_id: str
    secret: bytes = field(repr=False)


class Family:
    """The family key of one layer instance, shared by the clients of all its loops.

    A process made by ``fork()`` gets a key of its own, so worker processes forked
    from one parent cannot pull each other's channels.
    """

    __slots__ = ("_key",)

    def __init__(self) -> None:
        self._key = (os.getpid(), secrets.token_bytes(_HALF))

    def mint(self) -> Identity:
        """A new identity of this family (thread-safe: loops run in several threads)."""
        pid, key = self._key
        if pid != os.getpid():
            self._key = pid, key = os.getpid(), secrets.token_bytes(_HALF)
        secret = key + secrets.token_bytes(_HALF)
        return Identity(client_id_for(secret), secret)
