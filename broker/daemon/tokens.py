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
from protocol import MAX_NAME_LENGTH, ErrorCode, Hello, family_of, is_valid_group

__all__ = ["ANY_NAMESPACE", "IgnoredTokens", "TokenTable", "refusal"]

log = logging.getLogger("channels_broker.connection")

#: The namespace field that lets a token use any namespace.
ANY_NAMESPACE = "*"
#: Clients ``IgnoredTokens`` remembers before it starts over: a site has a handful of
#: processes, and this bounds what a stream of new ones costs (a few hundred KB).
IGNORED_TOKENS_REMEMBERED = 10_000


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
            message = f"cannot read the token file {path}: {exc}"
            raise ConfigError(message, "token-file") from exc
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
                message = f"{source}, line {number}: expected TOKEN NAMESPACE"
                raise ConfigError(message, "token-file")
            token, namespace = fields
            if namespace != ANY_NAMESPACE and not is_valid_group(namespace):
                raise ConfigError(
                    f"{source}, line {number}: {namespace!r} is not a namespace (a layer's"
                    " prefix: letters, digits, '-', '_', '.') nor '*'",
                    "token-file",
                )
            grants.append((token, namespace))
        if not grants:
            message = f"{source} holds no token: no client could connect"
            raise ConfigError(message, "token-file")
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


class IgnoredTokens:
    """Clients that sent a token to a daemon that asks for none: each is logged once.

    A client is its id's family (one per layer instance: every event loop and reconnect
    of one Django process), or its peer's host for an id of another form. Past
    ``IGNORED_TOKENS_REMEMBERED`` the memory starts over (a client may be logged again).
    """

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def note(self, client_id: str, peer: str) -> None:
        """A HELLO from ``peer`` for ``client_id`` carried a token the daemon ignores."""
        client = family_of(client_id) or peer.rpartition(":")[0] or peer
        if client in self._seen:
            return
        if len(self._seen) >= IGNORED_TOKENS_REMEMBERED:
            self._seen.clear()
        self._seen.add(client)
        log.warning(
            "client %.40s from %s sent a token, but this daemon has none (--token,"
            " --token-file): its token is ignored and it is served; give the daemon the"
            " token, or take it out of the layer's CONFIG (said once per client process)",
            client_id,
            peer,
        )


def refusal(
    tokens: TokenTable | None, hello: Hello, peer: str, ignored: IgnoredTokens | None = None
) -> tuple[ErrorCode, str] | None:
    """Why ``hello`` may not use its namespace (logged), or None if it may.

    A daemon with no tokens serves any HELLO, and tells ``ignored`` of one that carries
    a token anyway (a client configured for another daemon, or a daemon that lost its
    token: either way someone believes the token protects something).
    """
    token, namespace = hello.token, hello.prefix
    if tokens is None:
        if token and ignored is not None:
            ignored.note(hello.client_id, peer)
        return None
    if not token:
        log.warning(
            "authentication failed from %s: no token (%s asks for one)", peer, tokens.source
        )
        return ErrorCode.AUTH_FAILED, (
            "missing token: this daemon asks for one (the layer's CONFIG 'token')"
        )
    namespaces = tokens.namespaces_of(token)
    if namespaces is None:
        log.warning("authentication failed from %s: a token not in %s", peer, tokens.source)
        return ErrorCode.AUTH_FAILED, "invalid token"
    if ANY_NAMESPACE in namespaces or namespace in namespaces:
        return None
    shown = repr(namespace[:MAX_NAME_LENGTH])  # not yet checked: any length, any character
    log.warning("refused %s: its token may not use namespace %s", peer, shown)
    return ErrorCode.FORBIDDEN, f"this token may not use namespace {shown} (--token-file)"
