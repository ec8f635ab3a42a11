"""Client ids proven by a secret (protocol.identity), and the HELLO field that carries it."""

from __future__ import annotations

import secrets

from protocol import (
    CLIENT_ID_LENGTH,
    SECRET_BYTES,
    FrameDecoder,
    Hello,
    client_id_for,
    client_id_of,
    encode_frame,
    family_of,
    is_valid_channel,
    proves,
)


def test_a_secret_proves_its_own_id_and_no_other() -> None:
    secret = secrets.token_bytes(SECRET_BYTES)
    client_id = client_id_for(secret)
    assert len(client_id) == CLIENT_ID_LENGTH
    assert client_id == client_id_for(secret)
    assert proves(secret, client_id)
    assert not proves(secrets.token_bytes(SECRET_BYTES), client_id)
    assert not proves(b"", client_id)
    assert not proves(secret[:-1], client_id)  # a wrong length is refused unhashed
    assert not proves(secret + b"\0", client_id)
    assert not proves(secret, client_id[:-1] + ("0" if client_id[-1] != "0" else "1"))


def test_ids_with_one_family_key_share_a_prefix_and_no_other_key_does() -> None:
    key, other = secrets.token_bytes(SECRET_BYTES // 2), secrets.token_bytes(SECRET_BYTES // 2)
    ids = [client_id_for(key + secrets.token_bytes(SECRET_BYTES // 2)) for _ in range(5)]
    assert len(set(ids)) == 5
    assert len({family_of(client_id) for client_id in ids}) == 1
    assert family_of(client_id_for(other + key)) != family_of(ids[0])
    assert family_of("0123456789abcdef") == ""  # a daemon-minted id is in no family


def test_an_id_fits_a_channel_name_and_is_found_in_it() -> None:
    client_id = client_id_for(secrets.token_bytes(SECRET_BYTES))
    channel = f"specific.{client_id}!{secrets.token_hex(6)}"
    assert is_valid_channel(channel)
    assert client_id_of(channel) == client_id


def test_hello_carries_the_secret_and_an_old_hello_without_it_decodes() -> None:
    secret = secrets.token_bytes(SECRET_BYTES)
    hello = Hello(1, "token", client_id_for(secret), "site", 100, 60.0, 86400.0, (), secret)
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(hello))
    assert decoder.next_frame() == hello
    old = Hello(1, "token", "", "site", 100, 60.0, 86400.0)
    decoder.receive_data(encode_frame(old))
    assert decoder.next_frame() == old
    assert old.secret == b""


def test_no_repr_of_a_hello_shows_its_token_or_secret() -> None:
    secret = b"s" * SECRET_BYTES
    text = repr(Hello(1, "hunter2-token", client_id_for(secret), "site", 1, 1.0, 1.0, (), secret))
    assert "hunter2" not in text
    assert repr(secret) not in text and "sss" not in text
