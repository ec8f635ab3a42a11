"""Whether the daemon takes a client's HELLO: its version, token, prefix and id."""

from __future__ import annotations

import logging

from protocol import SUPPORTED_VERSIONS, ErrorCode, Hello, is_valid_group, proves

from . import tokens
from .context import Context

__all__ = ["hello_refusal"]

log = logging.getLogger("channels_broker.connection")


def hello_refusal(hello: Hello, ctx: Context, peer: str) -> tuple[ErrorCode, str] | None:
    """Why this HELLO is refused (the error to close with), or None."""
    if hello.version not in SUPPORTED_VERSIONS:
        log.warning("protocol error from %s: version %d", peer, hello.version)
        return ErrorCode.UNSUPPORTED_VERSION, f"protocol version {hello.version} unknown"
    denied = tokens.refusal(ctx.tokens, hello, peer, ctx.ignored_tokens)
    if denied is not None:
        return denied
    if not is_valid_group(hello.prefix):
        return ErrorCode.INVALID_NAME, f"invalid prefix {hello.prefix!r}"
    client_id = hello.client_id
    if client_id and not proves(hello.secret, client_id):
        # Not its secret: a HELLO may not take another client's id and messages.
        log.warning("refused %s: client id %.40r without its secret", peer, client_id)
        message = f"client id {client_id:.40} needs its secret (a layer older than the daemon?)"
        return ErrorCode.CLIENT_ID_TAKEN, message
    return None
