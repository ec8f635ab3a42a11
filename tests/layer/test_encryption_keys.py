"""``symmetric_encryption_keys`` without a daemon: keys as channels_redis takes them (a site
keeps its keys), what is refused at construction, why a token is refused, and that
``cryptography`` is loaded only by a layer given keys."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from channels_redis.core import RedisChannelLayer
from cryptography.fernet import Fernet

from broker.layer import BrokerChannelLayer, UndecryptableMessage
from broker.layer.encryption import Encryption, encryption_for, fernet_key

ROOT = Path(__file__).resolve().parent.parent.parent
KEYS = ["a key this site has used for years"]
MESSAGE = {"type": "chat.message", "text": "hello", "raw": b"\x00\xff", "n": [1, 2.5, None]}
EXPIRY_S = 60
#: expiry + 10 s, the age channels_redis lets a token reach.
TTL_S = EXPIRY_S + 10


def open_payload(layer: BrokerChannelLayer, token: bytes) -> Any:
    """What ``receive()`` does with a payload: decrypt, then unpack."""
    assert layer._encryption is not None
    return msgpack.unpackb(layer._encryption.decrypt(token, "chat"), raw=False)


def encryption() -> Encryption:
    made = encryption_for(KEYS, EXPIRY_S)
    assert made is not None
    return made


@pytest.mark.parametrize(
    "keys",
    [
        pytest.param(KEYS, id="str"),
        pytest.param([b"\x00bytes key\xff"], id="bytes"),
        pytest.param(["new key", b"old key", "older key"], id="rotation"),
        pytest.param(("tuple", "of keys"), id="tuple"),
    ],
)
def test_keys_work_as_channels_redis_makes_them(keys: Any) -> None:
    """Each side reads what the other encrypted with the same CONFIG value."""
    ours = BrokerChannelLayer(symmetric_encryption_keys=keys)
    theirs = RedisChannelLayer(symmetric_encryption_keys=keys, random_prefix_length=0)

    assert theirs.deserialize(ours._serialize(MESSAGE)) == MESSAGE
    assert open_payload(ours, theirs.serialize(MESSAGE)) == MESSAGE


def test_the_first_key_encrypts_and_every_key_decrypts() -> None:
    rotated = BrokerChannelLayer(symmetric_encryption_keys=["new", "old"])
    token = rotated._serialize(MESSAGE)

    assert Fernet(fernet_key(b"new")).decrypt(token) == msgpack.packb(MESSAGE)
    old = Fernet(fernet_key(b"old")).encrypt(msgpack.packb(MESSAGE))
    assert open_payload(rotated, old) == MESSAGE


@pytest.mark.parametrize("keys", [None, [], ()])
def test_without_keys_the_payload_is_plain_msgpack(keys: Any) -> None:
    layer = BrokerChannelLayer(symmetric_encryption_keys=keys)

    assert layer._encryption is None
    assert layer._serialize(MESSAGE) == msgpack.packb(MESSAGE, use_bin_type=True)


@pytest.mark.parametrize(
    ("keys", "error", "words"),
    [
        pytest.param("one key", TypeError, "a list of keys", id="bare-str"),
        pytest.param(b"one key", TypeError, "a list of keys", id="bare-bytes"),
        pytest.param(12345, TypeError, "not int", id="int"),
        pytest.param(["fine", 12345], TypeError, r"\[1\] must be str or bytes", id="int-key"),
        pytest.param(["fine", ""], ValueError, r"\[1\] is empty", id="empty-str"),
        pytest.param([b""], ValueError, r"\[0\] is empty", id="empty-bytes"),
    ],
)
def test_keys_that_cannot_be_right_are_refused_at_construction(
    keys: Any, error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words):
        BrokerChannelLayer(symmetric_encryption_keys=keys)


def test_a_token_older_than_expiry_plus_ten_seconds_is_refused() -> None:
    fernet, now = Fernet(fernet_key(KEYS[0].encode())), int(time.time())
    fresh_enough = fernet.encrypt_at_time(b"\x80", now - TTL_S + 5)
    replayed = fernet.encrypt_at_time(b"\x80", now - TTL_S - 30)

    assert encryption().decrypt(fresh_enough, "chat") == b"\x80"
    with pytest.raises(UndecryptableMessage, match=r"encrypted 10\d s ago.*\(70 s\)"):
        encryption().decrypt(replayed, "chat")


def test_a_token_from_a_clock_far_ahead_is_refused() -> None:
    """Fernet allows 60 s of clock skew into the future."""
    fernet = Fernet(fernet_key(KEYS[0].encode()))
    ahead = fernet.encrypt_at_time(b"\x80", int(time.time()) + 600)

    with pytest.raises(UndecryptableMessage, match=r"clock is (599|600) s ahead"):
        encryption().decrypt(ahead, "chat")


def test_an_altered_token_is_refused() -> None:
    token = bytearray(encryption().encrypt(msgpack.packb(MESSAGE)))
    token[40] = ord("B") if token[40] != ord("B") else ord("C")  # still valid base64

    with pytest.raises(UndecryptableMessage, match="'chat'.*other keys, or it was altered"):
        encryption().decrypt(bytes(token), "chat")


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )


def test_only_a_layer_given_keys_loads_cryptography() -> None:
    done = run_python(
        "import sys\n"
        "from broker.layer import BrokerChannelLayer\n"
        "layer = BrokerChannelLayer(symmetric_encryption_keys=[])\n"
        "layer._serialize({'type': 'm'})\n"
        "print('cryptography' in sys.modules)\n"
        "BrokerChannelLayer(symmetric_encryption_keys=['k'])._serialize({'type': 'm'})\n"
        "print('cryptography' in sys.modules)\n"
    )

    assert done.stdout.split() == ["False", "True"], done.stderr


def test_keys_without_cryptography_installed_say_how_to_install_it() -> None:
    done = run_python(
        "import sys\n"
        "sys.modules['cryptography'] = None  # what an environment without it gives\n"
        "from broker.layer import BrokerChannelLayer\n"
        "BrokerChannelLayer()\n"
        "BrokerChannelLayer(symmetric_encryption_keys=['k'])\n"
    )

    assert done.returncode == 1
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ImportError: symmetric_encryption_keys needs the cryptography")
    assert "pip install 'channels-broker[channels]'" in last_line
