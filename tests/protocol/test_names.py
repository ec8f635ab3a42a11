"""Channel and group names: Channels' rules, and whose connection a name belongs to."""

from __future__ import annotations

import pytest

from protocol import (
    MAX_NAME_LENGTH,
    client_id_of,
    is_process_specific,
    is_valid_channel,
    is_valid_group,
)

# The contract's bad names: refused as channels and as groups.
BAD_NAMES = [
    "¯\\_(ツ)_/¯",
    "chat" * 100,
    "=+135!",
    "a" * 100,
    "specific.ab12!x!y",
    "",
    "chat room",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_contract_bad_names_are_invalid_channels(name: str) -> None:
    assert not is_valid_channel(name)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_contract_bad_names_are_invalid_groups(name: str) -> None:
    assert not is_valid_group(name)


@pytest.mark.parametrize("name", [b"chat", None, 1, ["chat"]])
def test_a_name_that_is_not_str_is_invalid(name: object) -> None:
    assert not is_valid_channel(name)
    assert not is_valid_group(name)


def test_99_characters_is_the_longest_valid_name() -> None:
    assert MAX_NAME_LENGTH == 100
    assert is_valid_channel("a" * 99)
    assert is_valid_group("a" * 99)
    assert is_valid_channel("specific." + "a" * 80 + "!" + "b" * 9)
    assert not is_valid_channel("specific." + "a" * 80 + "!" + "b" * 10)


@pytest.mark.parametrize(
    "name",
    ["chat", "Chat-Room_1.2", "specific.ab12!x", "specific.ab12!", "site.ab12!Zz-9_.q"],
)
def test_channel_names_channels_accepts_are_valid(name: str) -> None:
    assert is_valid_channel(name)


@pytest.mark.parametrize("name", ["room", "Room-1_a.b"])
def test_group_names_channels_accepts_are_valid(name: str) -> None:
    assert is_valid_group(name)


@pytest.mark.parametrize("name", ["specific.ab12!x", "!x", "room!"])
def test_a_group_name_may_not_hold_a_bang(name: str) -> None:
    assert not is_valid_group(name)


def test_only_names_with_a_bang_are_process_specific() -> None:
    assert is_process_specific("specific.ab12!x")
    assert is_process_specific("specific.ab12!")
    assert not is_process_specific("specific.ab12")


@pytest.mark.parametrize(
    ("channel", "client_id"),
    [
        ("specific.ab12!x", "ab12"),
        ("ab12!x", "ab12"),
        ("specific.ab12!", "ab12"),
        ("my.site.ab12!x", "ab12"),
        ("specific.ab12!x.y.z", "ab12"),
    ],
)
def test_client_id_of_is_between_the_last_dot_before_the_bang_and_the_bang(
    channel: str, client_id: str
) -> None:
    assert client_id_of(channel) == client_id
