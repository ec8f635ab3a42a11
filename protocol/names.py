"""Channel and group names: what is valid, and which process a name belongs to."""

from __future__ import annotations

import re

__all__ = [
    "MAX_NAME_LENGTH",
    "client_id_of",
    "is_process_specific",
    "is_valid_channel",
    "is_valid_group",
]

#: Channels' own limit: names must be shorter than 100 characters.
MAX_NAME_LENGTH = 100

_channel_name = re.compile(r"^[a-zA-Z\d\-_.]+(\![\d\w\-_.]*)?$")
_group_name = re.compile(r"^[a-zA-Z\d\-_.]+$")


def is_valid_channel(name: object) -> bool:
    """True if ``name`` is a channel name Channels accepts."""
    return (
        type(name) is str and len(name) < MAX_NAME_LENGTH and _channel_name.match(name) is not None
    )


def is_valid_group(name: object) -> bool:
    """True if ``name`` is a group name Channels accepts."""
    return type(name) is str and len(name) < MAX_NAME_LENGTH and _group_name.match(name) is not None


def is_process_specific(channel: str) -> bool:
    """True for ``prefix.client!local`` names, which belong to one client connection."""
    return "!" in channel


def client_id_of(channel: str) -> str:
    """The client id in a process-specific name: between the last '.' before '!' and '!'.

    ``"specific.ab12!x"`` -> ``"ab12"``; ``"ab12!x"`` -> ``"ab12"``.
    """
    # Asked several times per member of every group send: remembered (a dict lookup
    # costs a third of the slicing), within a bound.
    client_id = _client_ids.get(channel)
    if client_id is None:
        head = channel[: channel.index("!")]
        client_id = head[head.rfind(".") + 1 :]
        if len(_client_ids) >= CLIENT_ID_CACHE_SIZE:
            _client_ids.clear()
        _client_ids[channel] = client_id
    return client_id


#: Channel names whose client id ``client_id_of`` remembers.
CLIENT_ID_CACHE_SIZE = 65536
_client_ids: dict[str, str] = {}
