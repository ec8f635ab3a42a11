"""What the daemon keeps about a client after its HELLO."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from broker.config import Config
from protocol import Hello

from .capacity import Bounds, CapacityPolicy

__all__ = ["Session", "is_valid_client_id", "new_client_id"]

_client_id = re.compile(r"^[A-Za-z0-9]{8,32}$")


def new_client_id() -> str:
    """A fresh client id: 64 random bits, hex, so it fits channel names as is."""
    return secrets.token_hex(8)


def is_valid_client_id(value: str) -> bool:
    """True for an id a client may re-attach to (one a daemon could have minted)."""
    return _client_id.match(value) is not None


@dataclass(frozen=True, slots=True)
class Session:
    """A client's namespace, identity and sending policy."""

    ns: str
    client_id: str
    capacity_of: CapacityPolicy
    expiry_s: float
    group_expiry_s: float

    @classmethod
    def from_hello(cls, hello: Hello, client_id: str, config: Config) -> Session:
        """Raise ``capacity.Refused`` for a HELLO over the bounds ``config`` sets, or with
        a pattern the daemon cannot match."""
        bounds = Bounds.from_config(config)
        bounds.check(hello)
        return cls(
            ns=hello.prefix,
            client_id=client_id,
            capacity_of=CapacityPolicy.from_hello(hello, bounds),
            expiry_s=float(hello.expiry_s),
            group_expiry_s=float(hello.group_expiry_s),
        )
