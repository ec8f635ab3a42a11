"""``manage.py check`` for CHANNEL_LAYERS (``broker.layer.checks``), entry by entry.

The checks as Django runs them, through ``manage.py check`` in a real site, are in
tests/migrating/test_migrating_doc.py; here the same function meets each mistake.
"""

from __future__ import annotations

from typing import Any

from broker.layer.checks import channel_layer_messages

OURS = "broker.layer.BrokerChannelLayer"


def ids(layers: dict[str, Any]) -> list[tuple[str, str]]:
    return [(message.obj, message.id) for message in channel_layer_messages(layers)]


def test_a_good_entry_and_other_layers_entries_give_nothing() -> None:
    layers = {
        "default": {"BACKEND": OURS, "CONFIG": {"hosts": ["tcp://10.0.0.1:7733"]}},
        "bare": {"BACKEND": OURS},
        "redis": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [("127.0.0.1", 6379)]},
        },
        "gone": {"BACKEND": "some_uninstalled_layer.Layer", "CONFIG": {"x": 1}},
    }

    assert channel_layer_messages(layers) == []


def test_each_mistake_is_an_error_with_its_id_on_its_entry() -> None:
    layers = {
        "default": {
            "BACKEND": OURS,
            "CONFIG": {"hosts": [("127.0.0.1", 6379)], "symmetric_encryption_keys": "one"},
            "TEST_CONFIG": {"NAME": "db", "USER": "app", "random_prefix_length": 12, "cap": 1},
        },
        "typo": {"BACKEND": "broker.layers.BrokerChannelLayer"},
        "subclass": {
            "BACKEND": "broker.layer.channel_layer.BrokerChannelLayer",
            "CONFIG": {"capacity": 0},
        },
    }

    assert ids(layers) == [
        ("CHANNEL_LAYERS['default']['CONFIG']", "channels_broker.E001"),
        ("CHANNEL_LAYERS['default']['CONFIG']", "channels_broker.E006"),
        ("CHANNEL_LAYERS['default']['TEST_CONFIG']", "channels_broker.E003"),
        ("CHANNEL_LAYERS['default']['TEST_CONFIG']", "channels_broker.E002"),
        ("CHANNEL_LAYERS['default']['TEST_CONFIG']", "channels_broker.E004"),
        ("CHANNEL_LAYERS['typo']", "channels_broker.E007"),
        ("CHANNEL_LAYERS['subclass']['CONFIG']", "channels_broker.E005"),
    ]


def test_an_error_carries_what_is_wrong_and_the_hint_what_to_write() -> None:
    (error,) = channel_layer_messages({"default": {"BACKEND": OURS, "CONFIG": {"capacity": 0}}})

    assert error.is_serious()
    assert error.msg == "capacity 0 is not a whole number above 0"
    assert error.hint == "write how many messages may wait per channel, as 100"


def test_a_backend_typo_says_what_to_write() -> None:
    (error,) = channel_layer_messages({"default": {"BACKEND": "broker.layer.Broker"}})

    assert "cannot be imported" in error.msg
    assert error.hint == f'write "BACKEND": "{OURS}"'


def test_hosts_that_look_like_redis_are_a_warning() -> None:
    hosts = ["tcp://127.0.0.1:6379", "unix:///run/redis/redis.sock", "tcp://127.0.0.1:7733"]

    messages = channel_layer_messages({"default": {"BACKEND": OURS, "CONFIG": {"hosts": hosts}}})

    assert [(message.id, message.is_serious()) for message in messages] == [
        ("channels_broker.W001", False),
        ("channels_broker.W001", False),
    ]
    assert "Redis goes in the daemon's --backend" in messages[0].hint
