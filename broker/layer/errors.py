"""The layer's exceptions, and the Channels exception each daemon error code becomes."""

from __future__ import annotations

from channels.exceptions import ChannelFull

from protocol import Error, ErrorCode

__all__ = [
    "REFUSALS",
    "BrokerCertificateNotTrusted",
    "BrokerConnectionRefused",
    "BrokerHostnameMismatch",
    "BrokerNameNotResolved",
    "BrokerTLSError",
    "BrokerTimeout",
    "BrokerUnavailable",
    "LayerClosed",
    "MessageTooLarge",
    "OverLimit",
    "UnserializableMessage",
    "exception_for",
    "is_refusal",
    "too_large",
]

#: Connection errors that retrying would only repeat: every call raises them from then on.
REFUSALS = frozenset(
    {
        ErrorCode.AUTH_FAILED,
        ErrorCode.UNSUPPORTED_VERSION,
        ErrorCode.FORBIDDEN,  # the token may not use this prefix
        ErrorCode.CLIENT_ID_TAKEN,  # our secret does not prove our id: no retry makes it
    }
)
#: The same when they answer HELLO: settings over the daemon's bounds, a
#: channel_capacity pattern it cannot match.
_HELLO_REFUSALS = frozenset({ErrorCode.OVER_LIMIT, ErrorCode.MALFORMED_FRAME})


class MessageTooLarge(ValueError):
    """The serialized message is over the daemon's size limit; nothing was sent."""


class UnserializableMessage(TypeError):
    """A value of the message is of a type a channel layer message cannot carry (a
    datetime, a model instance, a set...): the message names its key path and type."""


class BrokerUnavailable(ConnectionError):
    """No daemon could be reached, or the connection dropped mid-request. The subclasses
    say why, each with what to do; ``except BrokerUnavailable`` catches them all."""


class BrokerConnectionRefused(BrokerUnavailable):
    """Nothing listens at the address (connection refused, or no unix socket there).
    Raised at once, unless the daemon was reachable within ``connect_timeout`` (then it is
    restarting, and the call waits for it up to ``connect_timeout``)."""


class BrokerNameNotResolved(BrokerUnavailable):
    """The host name in ``hosts`` does not resolve to an address."""


class BrokerTimeout(BrokerUnavailable):
    """The daemon did not answer the connection within ``connect_timeout`` (a host that
    drops packets, a stopped or overloaded daemon)."""


class BrokerTLSError(BrokerUnavailable):
    """TLS with the daemon failed for a reason that trying again does not change: its
    certificate is not trusted or names another host, it refused the layer's client
    certificate, or it does not speak TLS. Raised at once, not after ``connect_timeout``."""


class BrokerCertificateNotTrusted(BrokerTLSError):
    """The daemon's certificate is not signed by a CA the layer's ``ssl_context`` trusts."""


class BrokerHostnameMismatch(BrokerTLSError):
    """The daemon's certificate names another host than the one written in ``hosts``."""


class OverLimit(ValueError):
    """The daemon refused a setting or a request over one of its bounds: the message
    names the bound and the daemon's flag that sets it."""


class LayerClosed(RuntimeError):
    """``close()`` ended the layer while this call was waiting."""


def exception_for(error: Error) -> Exception:
    """The exception Channels code expects for an ERROR answer."""
    code = error.error_code
    if code is ErrorCode.CHANNEL_FULL:
        full: Exception = ChannelFull(error.message)  # channels is untyped
        return full
    if code is ErrorCode.AUTH_FAILED:
        return PermissionError(f"the broker refused the token: {error.message}")
    if code in (ErrorCode.FORBIDDEN, ErrorCode.CLIENT_ID_TAKEN):
        return PermissionError(f"the broker refused: {error.message}")
    if code is ErrorCode.MESSAGE_TOO_LARGE:
        # "message of N bytes is over the limit of L", before the layer knew L (WELCOME)
        return MessageTooLarge(
            f"{error.message} bytes (the daemon's --max-message-bytes); nothing was sent."
            f" {_TOO_LARGE_HINT}"
        )
    if code is ErrorCode.OVER_LIMIT:
        return OverLimit(
            f"{error.message}. Ask for less in the layer's CONFIG (CHANNEL_LAYERS), or"
            " raise that bound on the daemon."
        )
    if code is ErrorCode.INVALID_NAME:
        return TypeError(error.message)
    if code in (ErrorCode.BACKEND_UNAVAILABLE, ErrorCode.SHUTTING_DOWN):
        return BrokerUnavailable(error.message)
    return RuntimeError(f"broker error {error.code}: {error.message}")


def too_large(size: int, daemon_limit: int, own_limit: int | None) -> MessageTooLarge:
    """The error of a message of ``size`` bytes over the daemon's limit, or over the
    application's own ``max_message_bytes`` (CONFIG) when that one is lower."""
    if own_limit is not None and own_limit < daemon_limit:
        return MessageTooLarge(
            f"message of {size} bytes is over the limit of {own_limit} bytes that"
            " max_message_bytes sets in the layer's CONFIG (the daemon allows"
            f" {daemon_limit}); nothing was sent. Send less (ids rather than objects), or"
            " raise max_message_bytes"
        )
    return MessageTooLarge(
        f"message of {size} bytes is over the daemon's limit of {daemon_limit} bytes"
        f" (channels-broker serve --max-message-bytes); nothing was sent. {_TOO_LARGE_HINT}"
    )


_TOO_LARGE_HINT = (
    "Send less (ids to load where the message is received, rather than whole objects), or"
    " raise the daemon's --max-message-bytes"
)


def is_refusal(error: Error, at_hello: bool) -> bool:
    """True if ``error`` (connection-level) says retrying cannot help: the daemon refused
    the layer's token or version, or (``at_hello``, answering HELLO) its settings."""
    code = error.error_code
    return code in REFUSALS or (at_hello and code in _HELLO_REFUSALS)
