"""What in a message cannot be sent, where it is, and what to send instead.

A message carries dict, list (tuples arrive as lists), str, bytes, int (64 bits), float,
bool and None, as msgpack packs them. msgpack's own error names the type but not where
it sits (``can not serialize 'datetime.datetime' object``); this finds the first value
it could not pack, by key path (``message["when"]``, ``message["items"][2]``), and says
what to do with that type. It runs only after packing failed, so a message that packs
costs nothing more.
"""

from __future__ import annotations

import datetime
import decimal
import json
import uuid
from typing import Any

from .errors import UnserializableMessage

__all__ = ["unserializable"]

#: msgpack's integers: signed 64 bits, or unsigned 64 bits.
_INT_RANGE = range(-(2**63), 2**64)
_ALLOWED = "dict, list, str, bytes, int, float, bool and None"
_SIMPLE = (str, bytes, bytearray, float, bool, type(None))


def unserializable(message: dict[str, Any], cause: Exception) -> UnserializableMessage:
    """The error for ``message``, which msgpack refused with ``cause``."""
    found = _first_unpackable(message, "message")
    if found is None:  # nothing we can point at: msgpack's own words, at least
        return UnserializableMessage(f"the message cannot be serialized: {cause}")
    path, value, as_key = found
    module = type(value).__module__
    kind = (
        type(value).__qualname__ if module == "builtins" else f"{module}.{type(value).__qualname__}"
    )
    if isinstance(value, int):
        return UnserializableMessage(
            f"{path} is an int of more than 64 bits ({value}): send it as a str"
        )
    where = f"{path} has a key of type {kind}" if as_key else f"{path} is a {kind}"
    return UnserializableMessage(
        f"{where}, which a channel layer message cannot carry (only {_ALLOWED}): {_advice(value)}"
    )


def _first_unpackable(value: Any, path: str) -> tuple[str, Any, bool] | None:
    """(path, value, is a dict key) of the first value msgpack cannot pack, or None."""
    if isinstance(value, _SIMPLE):
        return None
    if isinstance(value, int):
        return None if value in _INT_RANGE else (path, value, False)
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            if (found := _first_unpackable(item, f"{path}[{index}]")) is not None:
                return found
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if (found := _first_unpackable(key, path)) is not None:
                return path, found[1], True
            if (found := _first_unpackable(item, f"{path}[{_subscript(key)}]")) is not None:
                return found
        return None
    return path, value, False


def _subscript(key: Any) -> str:
    """``key`` as Python code would write it, with double quotes as JSON and the docs do."""
    return json.dumps(key) if isinstance(key, str) else repr(key)


def _advice(value: Any) -> str:
    if isinstance(value, datetime.date | datetime.time):
        return "convert it to an ISO 8601 str (value.isoformat()) and parse it where received"
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return "convert it to a str (str(value))"
    if isinstance(value, set | frozenset):
        return "convert it to a list (sorted(value), or list(value))"
    if hasattr(value, "_meta") and hasattr(value, "pk"):  # a Django model instance
        return "send its id (value.pk) and load the object where the message is received"
    return (
        "convert it to one of those types; for an object, send its id, or a dict of the"
        " fields the receiver needs"
    )
