"""The layer's exceptions, and the Channels exception each daemon error code becomes."""

from __future__ import annotations

from channels.exceptions import ChannelFull

from protocol import Error, ErrorCode

__all__ = [
    "BrokerTLSError",
    "BrokerUnavailable",
    "LayerClosed",
    "MessageTooLarge",
    "exception_for",
]


class MessageTooLarge(ValueError):
    """The serialized message is over the daemon's size limit; nothing was sent."""


class BrokerUnavailable(ConnectionError):
    """No daemon could be reached within the timeout, or the connection dropped mid-request."""


class BrokerTLSError(BrokerUnavailable):
    """TLS with the daemon failed for a reason that trying again does not change: its
    certificate is not trusted or names another host, it refused the layer's client
    certificate, or it does not speak TLS. Raised at once, not after ``connect_timeout``."""


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
    if code is ErrorCode.MESSAGE_TOO_LARGE:
        return MessageTooLarge(error.message)
    if code is ErrorCode.INVALID_NAME:
        return TypeError(error.message)
    if code in (ErrorCode.BACKEND_UNAVAILABLE, ErrorCode.SHUTTING_DOWN):
        return BrokerUnavailable(error.message)
    return RuntimeError(f"broker error {error.code}: {error.message}")
