"""Backend URLs shown to people (logs, /status, error messages): passwords hidden."""

from __future__ import annotations

from urllib.parse import unquote_plus

__all__ = ["redacted_url"]

#: What stands for a hidden password in a URL shown to people.
_MASK = "***"
#: A query parameter whose name holds one of these is a secret (``password`` for
#: asyncpg, ``sslpassword`` for libpq, ``sentinel_password`` for Redis Sentinel).
_SECRET_WORDS = ("password", "secret", "token")


def redacted_url(url: str) -> str:
    """``url`` with every password hidden, for logs and /status.

    Hides the password of the userinfo (``user:***@host``) and the value of each query
    parameter named like a secret (``?sentinel_password=***``); the rest stays as written.
    The URL is cut as ``urllib.parse.urlsplit`` cuts it, as the backends parse it, but
    by hand, so that no URL, however malformed, makes it fail.
    """
    rest, hash_mark, fragment = url.partition("#")
    rest, question_mark, query = rest.partition("?")
    scheme, slashes, location = rest.partition("//")
    if slashes:
        netloc, slash, path = location.partition("/")
        userinfo, at, hosts = netloc.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        if at and colon:
            rest = f"{scheme}//{user}:{_MASK}@{hosts}{slash}{path}"
    if question_mark:
        query = "&".join(_redacted_parameter(item) for item in query.split("&"))
    return rest + question_mark + query + hash_mark + fragment


def _redacted_parameter(item: str) -> str:
    name, equals, _value = item.partition("=")
    words = unquote_plus(name).lower()
    if equals and any(word in words for word in _SECRET_WORDS):
        return f"{name}={_MASK}"
    return item
