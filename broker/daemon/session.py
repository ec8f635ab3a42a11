"""What the daemon keeps about a client after its HELLO."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from broker.config import Config
from protocol import FANOUT_VERSION, Hello, client_id_of, family_of

from .capacity import Bounds, CapacityPolicy

__all__ = ["Session", "new_client_id"]


def new_client_id() -> str:
    """A fresh client id for a HELLO that names none: 64 random bits, hex, so it fits
    channel names as is. Half as long as a proven id, so it is in no family."""
    return secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class Session:
    """A client's namespace, identity and sending policy."""

    ns: str
    client_id: str
    #: The ids whose process-specific channels it may pull: ``protocol.identity``.
    family: str
    capacity_of: CapacityPolicy
    expiry_s: float
    group_expiry_s: float
    #: Its layer takes group fan-outs in PUSH (``protocol.FANOUT_VERSION``).
    takes_fanouts: bool = False
    #: It acknowledges each DELIVER's lease (HELLO): storage that can keeps a pulled
    #: message leased until then (``backends.LeasesToConsumers``).
    acks_deliveries: bool = False

    @classmethod
    def from_hello(cls, hello: Hello, client_id: str, config: Config) -> Session:
        """Raise ``capacity.Refused`` for a HELLO over the bounds ``config`` sets, or with
        a pattern the daemon cannot match."""
        bounds = Bounds.from_config(config)
        bounds.check(hello)
        return cls(
            ns=hello.prefix,
            client_id=client_id,
            family=family_of(client_id),
            capacity_of=CapacityPolicy.from_hello(hello, bounds),
            expiry_s=float(hello.expiry_s),
            group_expiry_s=float(hello.group_expiry_s),
            takes_fanouts=hello.version >= FANOUT_VERSION,
            acks_deliveries=hello.acks_deliveries,
        )

    def may_pull(self, channel: str) -> bool:
        """True if this client may RECEIVE ``channel``: a normal one, or a process-specific
        one of its own id or of its family (another event loop of its process)."""
        if "!" not in channel:
            return True
        owner = client_id_of(channel)
        return owner == self.client_id or (bool(self.family) and family_of(owner) == self.family)
