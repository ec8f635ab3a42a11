"""Client ids a client can prove it owns, with no registry: the id is a hash of a secret.

Theory of operation. A layer mints a secret for each of its event loops' clients and
derives the client id from it (``client_id_for``); HELLO carries both, and any daemon
checks the one against the other (``proves``) before it lets the connection own the id.
So a HELLO naming someone else's id is refused without a lookup, on one daemon or on
several sharing one storage, and a reconnect (which has the secret) takes over as before.

The secret has two halves. The first, the *family key*, is shared by every loop client
of one layer instance (one process): the id's first half is its hash, so ids of one
process share a prefix, the *family*. The second half is the loop client's own. A
connection may pull (RECEIVE) a process-specific channel of any id of its family:
Channels lets any event loop of a process read a channel another loop of it made. Both
halves are 64-bit hashes: forging an id, or a family, is a 2**64 preimage search.
"""

from __future__ import annotations

import hashlib

__all__ = ["CLIENT_ID_LENGTH", "SECRET_BYTES", "client_id_for", "family_of", "proves"]

#: Family key (16 bytes) then the loop client's own key (16 bytes).
SECRET_BYTES = 32
_HALF = SECRET_BYTES // 2
#: Hex digits of a proven client id: 16 of family, 16 of the client's own.
CLIENT_ID_LENGTH = 32
#: Hex digits of each half: 64 bits.
_DIGITS = CLIENT_ID_LENGTH // 2


def client_id_for(secret: bytes) -> str:
    """The client id ``secret`` proves: family hash, then the whole secret's hash (hex)."""
    family = hashlib.sha256(b"family:" + secret[:_HALF]).hexdigest()[:_DIGITS]
    return family + hashlib.sha256(b"client:" + secret).hexdigest()[:_DIGITS]


def proves(secret: bytes, client_id: str) -> bool:
    """True if ``secret`` is the one ``client_id`` was derived from."""
    # A wrong length is refused before any hashing (a HELLO may carry megabytes).
    return len(secret) == SECRET_BYTES and client_id_for(secret) == client_id


def family_of(client_id: str) -> str:
    """The family of a proven id (its first half); "" for ids of any other length."""
    return client_id[:_DIGITS] if len(client_id) == CLIENT_ID_LENGTH else ""
