"""The tokens a daemon accepts, and the namespace each one may use.

``--token`` is one token for any namespace (one site). ``--token-file`` holds one token
per line, then the namespace it may use (the ``prefix`` a layer names in HELLO), or
``*`` for any::

    # site A's Django processes, and site B's
    3c1f0e...  site-a
    9b27d4...  site-b
    # the operator's, for status and top
    77e0aa...  *

A ``#`` starts a comment (a token cannot start with one); blank lines are skipped; a token
on several lines may use each of their namespaces. The file is read at start and again on
SIGHUP; a connection keeps the namespace it was admitted to, so a removed token stops new
HELLOs only.

A namespace is checked once, at HELLO: every later request of the connection works in
the namespace of its session, so a token bound to ``site-a`` cannot send, receive, join,
discard or flush anywhere else. Tokens are kept as SHA-256 digests and compared with
``hmac.compare_digest`` against every entry, so the time taken says nothing about how
much of a guess was right; no log line carries a token.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterable

from broker.config import Config
from broker.errors import ConfigError
from protocol import MAX_NAME_LENGTH, ErrorCode, is_valid_group

__all__ = ["ANY_NAMESPACE", "TokenTable", "refusal"]

log = logging.getLogger("channels_broker.connection")

#: The namespace field that lets a token use any namespace.
ANY_NAMESPACE = "*"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenTable:
    """Tokens (as digests) and the namespaces each may use."""

    __slots__ = ("_entries", "source")

    def __init__(self, grants: Iterable[tuple[str, str]], source: str) -> None:
        """``grants``: (token, namespace or ``*``) pairs; ``source`` names them in logs."""
        namespaces: dict[bytes, set[str]] = {}
        for token, namespace in grants:
            namespaces.setdefault(_digest(token), set()).add(namespace)
        self._entries = [(digest, frozenset(names)) for digest, names in namespaces.items()]
        self.source = source

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def from_config(cls, config: Config) -> TokenTable | None:
        """The table ``config`` asks for; None if it sets no token (nothing is checked).

        Raises ``ConfigError`` if the token file cannot be read or is not valid.
        """
        if config.token_file:
            return cls.read(config.token_file)
        if config.token:
            return cls([(config.token, ANY_NAMESPACE)], "--token")
        return None

    @classmethod
    def read(cls, path: str) -> TokenTable:
        """The table in the file at ``path``; ``ConfigError`` if unreadable or invalid."""
        try:
            with open(path, encoding="utf-8") as file:
                text = file.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the token file {path}: {exc}") from exc
        return cls.parse(text, path)

    @classmethod
    def parse(cls, text: str, source: str) -> TokenTable:
        """The table written in ``text``; ``ConfigError`` naming the line (never the token)."""
        grants = []
        for number, line in enumerate(text.splitlines(), start=1):
            fields = line.split()
            comment = next((i for i, text in enumerate(fields) if text.startswith("#")), None)
            fields = fields[:comment]
            if not fields:
                continue
            if len(fields) != 2:
                raise ConfigError(f"{source}, line {number}: expected TOKEN NAMESPACE")
            token, namespace = fields
            if namespace != ANY_NAMESPACE and not is_valid_group(namespace):
                raise ConfigError(
                    f"{source}, line {number}: {namespace!r} is not a namespace (a layer's"
                    " prefix: letters, digits, '-', '_', '.') nor '*'"
                )
            grants.append((token, namespace))
        if not grants:
            raise ConfigError(f"{source} holds no token: no client could connect")
        return cls(grants, source)

    def namespaces_of(self, token: str) -> frozenset[str] | None:
        """The namespaces ``token`` may use (``*`` among them: any); None if unknown.

        Every entry is compared, whichever matches, in constant time each.
        """
        digest = _digest(token)
        found = None
        for entry, namespaces in self._entries:
            if hmac.compare_digest(digest, entry):
                found = namespaces
        return found


def refusal(
    tokens: TokenTable | None, token: str, namespace: str, peer: str
) -> tuple[ErrorCode, str] | None:
    """Why a HELLO with ``token`` may not use ``namespace`` (logged), or None if it may."""
    if tokens is None:
        return None
    namespaces = tokens.namespaces_of(token)
    if namespaces is None:
        log.warning("authentication failed from %s: a token not in %s", peer, tokens.source)
        return ErrorCode.AUTH_FAILED, "invalid token"
    if ANY_NAMESPACE in namespaces or namespace in namespaces:
        return None
    shown = repr(namespace[:MAX_NAME_LENGTH])  # not yet checked: any length, any character
    log.warning("refused %s: its token may not use namespace %s", peer, shown)
    return ErrorCode.FORBIDDEN, f"this token may not use namespace {shown} (--token-file)"
