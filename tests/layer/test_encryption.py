"""End-to-end encryption (``symmetric_encryption_keys``) through a real daemon, on every
backend: layers with the same keys talk, storage holds only ciphertext, keys rotate, and
a layer with other keys (or none) gets a clear error and can go on receiving."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest

from broker.layer import MessageTooLarge, UndecryptableMessage
from tests.layer.storage import storage_holds
from tests.waits import assert_nothing_within, receive

KEYS = ["a key this site has used for years"]
NEW_KEY = b"\x00the new key, as bytes\xff"
OTHER_KEYS = ["someone else's key"]

KINDS = ["normal", "specific"]


async def channel_of(kind: str, owner: Any, unique: Callable[[str], str]) -> str:
    if kind == "specific":
        name: str = await owner.new_channel()
        return name
    return unique("secret")


def secret() -> str:
    """Text no test but this one writes: found in storage only if it was stored readable."""
    return f"plaintext-{uuid.uuid4().hex}"


@pytest.mark.parametrize("kind", KINDS)
async def test_layers_with_the_same_keys_exchange_messages(
    make_layer: Any, unique: Callable[[str], str], kind: str
) -> None:
    """A send and a group_send between two layers with the same keys arrive whole."""
    receiver = make_layer(symmetric_encryption_keys=KEYS)
    sender = make_layer(symmetric_encryption_keys=list(KEYS))
    channel = await channel_of(kind, receiver, unique)
    group = unique("group")
    await receiver.group_add(group, channel)
    message = {"type": "chat.message", "text": secret(), "raw": b"\x00\xff", "n": [1, 2.5]}
    await sender.send(channel, message)
    await sender.group_send(group, {**message, "n": 2})
    assert await receive(receiver, channel) == message
    assert await receive(receiver, channel) == {**message, "n": 2}


@pytest.mark.backends("shared")
async def test_storage_holds_no_plaintext_of_an_encrypted_message(
    make_layer: Any, unique: Callable[[str], str], backend_url: str
) -> None:
    """1. A layer with keys sends one secret and group_sends another to a channel nobody
       reads yet, so both wait in Redis or PostgreSQL; a layer without keys does the same.
    2. Read raw, storage holds neither encrypted secret, and both plain ones (so the
       reader would have found them).
    3. Each layer then receives its own messages.
    """
    encrypted = make_layer(symmetric_encryption_keys=KEYS)
    plain = make_layer()
    sent: dict[Any, list[str]] = {encrypted: [], plain: []}
    for layer in (encrypted, plain):
        channel, group = unique("stored"), unique("group")
        await layer.group_add(group, channel)
        texts = [secret(), secret()]
        await layer.send(channel, {"type": "m", "text": texts[0]})
        await layer.group_send(group, {"type": "m", "text": texts[1]})
        sent[layer] = [channel, *texts]

    for text in sent[encrypted][1:]:
        assert not await storage_holds(backend_url, text.encode())
    for text in sent[plain][1:]:
        assert await storage_holds(backend_url, text.encode())
    for layer, (channel, *texts) in sent.items():
        assert [(await receive(layer, channel))["text"] for _ in texts] == texts


async def test_an_old_key_second_in_the_list_still_decrypts(
    make_layer: Any, unique: Callable[[str], str]
) -> None:
    """Rotation: a layer that moved to [new, old] reads what a layer still on [old] sends,
    and what it sends itself is under the new key: [new] reads it, [old] does not."""
    old = make_layer(symmetric_encryption_keys=KEYS)
    rotated = make_layer(symmetric_encryption_keys=[NEW_KEY, *KEYS])
    new_only = make_layer(symmetric_encryption_keys=[NEW_KEY])
    channel = unique("rotating")

    await old.send(channel, {"from": "old"})
    assert await receive(rotated, channel) == {"from": "old"}
    await rotated.send(channel, {"from": "rotated"})
    assert await receive(new_only, channel) == {"from": "rotated"}
    await rotated.send(channel, {"from": "rotated", "n": 2})
    with pytest.raises(UndecryptableMessage, match="other keys"):
        await receive(old, channel)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_layer_with_other_keys_cannot_read_and_goes_on_receiving(
    make_layer: Any, unique: Callable[[str], str], kind: str
) -> None:
    """1. A layer with other keys sends two messages, a layer with the receiver's keys one.
    2. Two of the receiver's receives raise UndecryptableMessage naming the channel, each
       consuming its message, and one gets the readable message (in whatever order the
       two senders' messages were stored: send windows keep each sender's order only)."""
    receiver = make_layer(symmetric_encryption_keys=KEYS)
    stranger = make_layer(symmetric_encryption_keys=OTHER_KEYS)
    friend = make_layer(symmetric_encryption_keys=KEYS)
    channel = await channel_of(kind, receiver, unique)
    await stranger.send(channel, {"text": "from a stranger"})
    await stranger.send(channel, {"text": "from a stranger", "n": 2})
    await friend.send(channel, {"text": "from a friend"})

    readable, refused = [], []
    for _ in range(3):
        try:
            readable.append(await receive(receiver, channel))
        except UndecryptableMessage as exc:
            refused.append(str(exc))
    assert readable == [{"text": "from a friend"}]
    assert len(refused) == 2, refused
    assert all(channel in text and "1 symmetric_encryption_keys" in text for text in refused)
    await assert_nothing_within(receiver, channel)


async def test_keys_on_one_side_only_are_named_as_the_cause(
    make_layer: Any, unique: Callable[[str], str]
) -> None:
    """A layer without keys told that a message is encrypted; one with keys, that it is not."""
    plain, encrypted = make_layer(), make_layer(symmetric_encryption_keys=KEYS)
    channel = unique("mixed")

    await encrypted.send(channel, {"text": "sealed"})
    with pytest.raises(UndecryptableMessage, match="encrypted, and this layer has no"):
        await receive(plain, channel)
    await plain.send(channel, {"text": "open"})
    with pytest.raises(UndecryptableMessage, match="it is not encrypted"):
        await receive(encrypted, channel)


async def test_the_size_limit_applies_to_the_ciphertext(
    make_layer: Any, unique: Callable[[str], str]
) -> None:
    """Encryption grows a message by about a third: 900 bytes under a 1,000-byte limit
    pass plain and are refused encrypted, before anything is sent."""
    limit = 1000
    plain = make_layer(max_message_bytes=limit)
    encrypted = make_layer(max_message_bytes=limit, symmetric_encryption_keys=KEYS)
    channel = unique("sized")
    message = {"data": "x" * 900}

    await plain.send(channel, message)
    with pytest.raises(MessageTooLarge):
        await encrypted.send(channel, message)
    assert await receive(plain, channel) == message
    await assert_nothing_within(plain, channel)
