"""The layer's exceptions, and the Channels exception each daemon error code becomes."""

from __future__ import annotations

from channels.exceptions import ChannelFull

from protocol import Error, ErrorCode

__all__ = [
    "REFUSALS",
    "BrokerTLSError",
    "BrokerUnavailable",
    "LayerClosed",
    "MessageTooLarge",
    "OverLimit",
    "exception_for",
    "is_refusal",
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


class BrokerUnavailable(ConnectionError):
    """No daemon could be reached within the timeout, or the connection dropped mid-request."""


class BrokerTLSError(BrokerUnavailable):
    """TLS with the daemon failed for a reason that trying again does not change: its
    certificate is not trusted or names another host, it refused the layer's client
    certificate, or it does not speak TLS. Raised at once, not after ``connect_timeout``."""


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
        return MessageTooLarge(error.message)
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


def is_refusal(error: Error, at_hello: bool) -> bool:
    """True if ``error`` (connection-level) says retrying cannot help: the daemon refused
    the layer's token or version, or (``at_hello``, answering HELLO) its settings."""
    code = error.error_code
    return code in REFUSALS or (at_hello and code in _HELLO_REFUSALS)
