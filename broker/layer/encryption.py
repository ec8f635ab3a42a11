"""End-to-end encryption of messages (``symmetric_encryption_keys``), with channels_redis's keys.

Theory of operation. The sending layer packs a message with msgpack, and this module
turns those bytes into a Fernet token (AES-128-CBC with HMAC-SHA256, from the
``cryptography`` package); the daemon and its backend forward and store the token as
they would any payload, and the receiving layer checks and decrypts it before
unpacking. So the daemon, Redis, PostgreSQL, their backups and anyone reading them see
ciphertext only, and cannot alter or forge a message without the receiver noticing.

Keys are taken exactly as channels_redis takes them, so a site moving over keeps its
keys: a list of str (UTF-8 encoded) or bytes of any length, each made into a Fernet key
as ``urlsafe_b64encode(sha256(key))``; the first key encrypts and every key decrypts
(``MultiFernet``), which is how keys are rotated. A token older than ``expiry`` + 10 s
is refused, as channels_redis refuses it: nothing of ours delivers a message that old,
so such a token is a replay (or the hosts' clocks disagree).

``cryptography`` is imported only when a layer is made with keys: ``import
broker.layer`` never loads it, and a layer without keys runs no code of this module
on a message's way (the layer tests ``self._encryption is not None``).
"""

from __future__ import annotations

import base64
import hashlib
import math
import time
from collections.abc import Iterable, Sequence

__all__ = ["Encryption", "UndecryptableMessage", "check_not_encrypted", "encryption_for"]

#: Added to ``expiry`` for the age a token may have, as channels_redis adds it: room for
#: the clocks of the sending and the receiving host to disagree by a few seconds.
TTL_MARGIN_S = 10
#: How every Fernet token starts: version byte 0x80 and a timestamp under 2**36 s (until
#: the year 4147), base64-encoded. A msgpack map, what a layer without keys sends,
#: starts with 0x80-0x8f, 0xde or 0xdf, never with "g".
FERNET_PREFIX = b"gAAAAA"
#: What a layer with keys says when the package is missing.
NEEDS_CRYPTOGRAPHY = (
    "symmetric_encryption_keys needs the cryptography package: "
    "pip install 'channels-broker[channels]' (or pip install cryptography)"
)


class UndecryptableMessage(ValueError):
    """``receive()`` got a message this layer cannot decrypt, or an encrypted one while it
    has no keys. The message is consumed: the next ``receive()`` gets the next one."""


class Encryption:
    """Fernet over packed messages: the first key encrypts, every key decrypts."""

    __slots__ = ("_fernets", "_invalid", "_multi", "_ttl_s")

    def __init__(self, keys: Sequence[bytes], expiry_s: float) -> None:
        """``keys``: the key material as given (not yet Fernet keys); at least one."""
        try:
            from cryptography.fernet import Fernet, InvalidToken, MultiFernet
        except ImportError as exc:
            raise ImportError(NEEDS_CRYPTOGRAPHY) from exc
        self._fernets = [Fernet(fernet_key(key)) for key in keys]
        self._multi = MultiFernet(self._fernets)
        # Kept, so that decrypt() catches it without an import per message.
        self._invalid: type[Exception] = InvalidToken
        self._ttl_s = math.ceil(expiry_s) + TTL_MARGIN_S

    def encrypt(self, payload: bytes) -> bytes:
        """``payload`` as a Fernet token under the first key."""
        token: bytes = self._multi.encrypt(payload)
        return token

    def decrypt(self, token: bytes, channel: str) -> bytes:
        """The payload of ``token``, a message received on ``channel``.

        Raises ``UndecryptableMessage``, saying why, if no key opens it, it was altered,
        it is not encrypted, or it is older than ``expiry`` + 10 s.
        """
        try:
            payload: bytes = self._multi.decrypt(token, ttl=self._ttl_s)
        except self._invalid as exc:
            raise UndecryptableMessage(self._why(token, channel)) from exc
        return payload

    def _why(self, token: bytes, channel: str) -> str:
        head = f"a message received on {channel!r} could not be decrypted"
        if not token.startswith(FERNET_PREFIX):
            return f"{head}: it is not encrypted (its sender has no symmetric_encryption_keys)"
        sent_at = self._timestamp(token)
        if sent_at is None:
            return (
                f"{head} with any of this layer's {len(self._fernets)} "
                "symmetric_encryption_keys: its sender has other keys, or it was altered"
            )
        age_s = time.time() - sent_at
        if age_s < 0:
            return f"{head}: its sender's clock is {-age_s:.0f} s ahead of this host's"
        return (
            f"{head}: it was encrypted {age_s:.0f} s ago, longer than expiry + "
            f"{TTL_MARGIN_S} s ({self._ttl_s} s) allows; it was replayed, or the clocks "
            "of the sending and the receiving host disagree"
        )

    def _timestamp(self, token: bytes) -> int | None:
        """When an authentic token was made (its signature checked), or None."""
        for fernet in self._fernets:
            try:
                sent_at: int = fernet.extract_timestamp(token)
            except self._invalid:
                continue
            return sent_at
        return None


def fernet_key(key: bytes) -> bytes:
    """The Fernet key channels_redis makes of ``key``: its SHA-256, base64-encoded."""
    return base64.urlsafe_b64encode(hashlib.sha256(key).digest())


def encryption_for(keys: Iterable[str | bytes] | None, expiry_s: float) -> Encryption | None:
    """The encryption for ``symmetric_encryption_keys``; None without keys (None or []).

    Raises ``TypeError`` for one key given bare (not in a list) or a key that is not str
    or bytes, ``ValueError`` for an empty key, ``ImportError`` without ``cryptography``.
    """
    if keys is None:
        return None
    if isinstance(keys, str | bytes | bytearray):
        # channels_redis refuses this too: iterating a str would make a key per character.
        raise TypeError("symmetric_encryption_keys must be a list of keys, as [key], not a key")
    try:
        given = list(keys)
    except TypeError:
        raise TypeError(
            f"symmetric_encryption_keys must be a list of keys, not {type(keys).__name__}"
        ) from None
    material = [_key_bytes(index, key) for index, key in enumerate(given)]
    return Encryption(material, expiry_s) if material else None


def _key_bytes(index: int, key: object) -> bytes:
    if isinstance(key, str):
        key = key.encode("utf-8")
    if not isinstance(key, bytes | bytearray):
        raise TypeError(
            f"symmetric_encryption_keys[{index}] must be str or bytes, not {type(key).__name__}"
        )
    if not key:
        # channels_redis would take it; an empty key is a key everyone knows, and most
        # often an unset environment variable.
        raise ValueError(f"symmetric_encryption_keys[{index}] is empty")
    return bytes(key)


def check_not_encrypted(payload: bytes, channel: str) -> None:
    """For a layer without keys whose message did not unpack: raise
    ``UndecryptableMessage`` if it is a Fernet token, so the error says what is wrong."""
    if payload.startswith(FERNET_PREFIX):
        raise UndecryptableMessage(
            f"a message received on {channel!r} is encrypted, and this layer has no "
            "symmetric_encryption_keys: give it the keys its senders have"
        )
