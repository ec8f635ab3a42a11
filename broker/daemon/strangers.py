"""Peers that do not speak the broker's protocol at all: an HTTP client (a browser, curl,
a probe pointed at the wrong port) or a TLS client on a plain TCP listener.

Their first four bytes read as a frame length of over a gigabyte (``GET `` is
1,195,725,856), which the decoder refuses before HELLO. Rather than log that number,
the daemon recognises them there, says in words what spoke and where it should go
(one line a minute per kind at most, with a count of the others), answers an HTTP
client in HTTP, and closes.
"""

from __future__ import annotations

from broker.config import Config

__all__ = ["STRANGER_LOG_INTERVAL_S", "http_answer", "kind_of", "what_to_say"]

#: The first four bytes of every HTTP/1 request method, and of HTTP/2's preface.
_HTTP_STARTS = frozenset(
    {b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"OPTI", b"PATC", b"CONN", b"TRAC", b"PRI "}
)
#: A TLS record of type handshake (22), protocol major version 3: a ClientHello.
_TLS_START = b"\x16\x03"
#: Seconds between two log lines about one kind of stranger: a scanner or a health
#: check every few seconds must not fill the log.
STRANGER_LOG_INTERVAL_S = 60.0


def kind_of(first_bytes: bytes) -> str | None:
    """``"HTTP"`` or ``"TLS"`` for what a connection's first bytes open, else None."""
    if first_bytes[:4] in _HTTP_STARTS:
        return "HTTP"
    if first_bytes.startswith(_TLS_START) and len(first_bytes) >= 4:
        return "TLS"
    return None


def _metrics_where(config: Config) -> str:
    if config.metrics_listen is None:
        return "this daemon serves no metrics (--metrics-listen off)"
    return f"metrics are on http://{config.metrics_listen}/metrics (and /healthz, /readyz)"


def what_to_say(kind: str, peer: str, config: Config) -> str:
    """The log line for a ``kind`` client from ``peer`` on a broker port."""
    if kind == "HTTP":
        return (
            f"an HTTP client ({peer}) spoke to the broker port, which speaks the channel"
            f" layer's protocol only; {_metrics_where(config)}"
        )
    return (
        f"a TLS client ({peer}) spoke to a plain TCP broker port: give the daemon"
        " --tls-cert and --tls-key, or list it as tcp:// (not tls://) in the layer's hosts"
    )


def http_answer(config: Config) -> bytes:
    """A whole HTTP 400 response saying what this port is, for a client to show."""
    body = (
        "This is a channels-broker port: it speaks the channel layer's protocol, not"
        f" HTTP.\n{_metrics_where(config).capitalize()}.\n"
    ).encode()
    head = (
        "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return head + body
