"""Settings that carry over: every key of channels_redis's and channels_postgres's CONFIG
works the same or is refused when the layer is made, saying what to write instead.

No daemon: a layer does no I/O until it is used, and every refusal comes before that.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import pytest
from channels_redis.core import RedisChannelLayer
from channels_redis.pubsub import RedisPubSubChannelLayer, RedisPubSubLoopLayer
from django.core.exceptions import ImproperlyConfigured

from backends.postgres.url import PostgresOptions
from backends.redis.url import RedisSettings
from broker.layer import BrokerChannelLayer, LayerConfigError

#: A value for each key channels_redis takes whose default is None.
SAMPLES: dict[str, Any] = {
    "hosts": ["tcp://127.0.0.1:7733"],
    "channel_capacity": {"http.request": 200, re.compile(r"^websocket.send!"): 20},
    "symmetric_encryption_keys": ["a key of the site"],
    "on_disconnect": lambda: None,
    "on_reconnect": lambda: None,
}
#: channels_redis keys that mean the same here (docs/migrating.md).
CARRIED_OVER = {
    "hosts",
    "prefix",
    "expiry",
    "group_expiry",
    "capacity",
    "channel_capacity",
    "symmetric_encryption_keys",
    "serializer_format",  # its default, "msgpack", is what the layer does
}
#: channels_redis keys with no meaning here: refused, with why (E003).
REFUSED = {"random_prefix_length", "on_disconnect", "on_reconnect"}


def channels_redis_keys() -> dict[str, Any]:
    """Every CONFIG key of the installed channels_redis (core and pubsub), with its default."""
    keys: dict[str, Any] = {}
    for init in (
        RedisChannelLayer.__init__,
        RedisPubSubChannelLayer.__init__,
        RedisPubSubLoopLayer.__init__,
    ):
        for name, parameter in inspect.signature(init).parameters.items():
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                continue
            keys.setdefault(name, parameter.default)
    # RedisPubSubChannelLayer hands its loop layers this one itself; no CONFIG has it.
    for internal in ("self", "channel_layer"):
        keys.pop(internal)
    return keys


def problems_of(**config: Any) -> list[tuple[str, str]]:
    """(key, check id) of each problem the layer names for ``config``; [] if it takes it."""
    try:
        BrokerChannelLayer(**config)
    except LayerConfigError as error:
        return [(problem.key, problem.check_id) for problem in error.problems]
    return []


def refusal(**config: Any) -> str:
    with pytest.raises(LayerConfigError) as caught:
        BrokerChannelLayer(**config)
    return str(caught.value)


def test_every_channels_redis_key_carries_over_or_is_refused_as_foreign() -> None:
    keys = channels_redis_keys()
    assert set(keys) == CARRIED_OVER | REFUSED, "channels_redis changed its keys: decide each"

    for key, default in keys.items():
        value = SAMPLES.get(key, default)
        if key in CARRIED_OVER:
            assert problems_of(**{key: value}) == [], key
        else:
            assert problems_of(**{key: value}) == [(key, "channels_broker.E003")], key


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("random_prefix_length", 12, "mints its own ids: remove it"),
        ("on_disconnect", print, "reconnects to the daemon by itself"),
        ("on_reconnect", print, "messages that waited meanwhile arrive"),
        ("serializer_format", "json", "always packs messages with msgpack"),
    ],
)
def test_a_channels_redis_key_with_no_meaning_here_says_why_and_to_remove_it(
    key: str, value: Any, words: str
) -> None:
    assert f"{key} is channels_redis's: " in refusal(**{key: value})
    assert words in refusal(**{key: value})


@pytest.mark.parametrize(
    ("hosts", "url"),
    [
        pytest.param([("127.0.0.1", 6379)], "redis://127.0.0.1:6379", id="pair"),
        pytest.param([["redis.internal", "6380"]], "redis://redis.internal:6380", id="list-pair"),
        pytest.param(("127.0.0.1", 6379), "redis://127.0.0.1:6379", id="bare-pair"),
        pytest.param(["redis://:s3cret@r1:6379/2"], "redis://:****@r1:6379/2", id="url"),
        pytest.param("rediss://r1:6380/0", "rediss://r1:6380/0", id="one-url"),
        pytest.param(
            [{"address": "rediss://app:s3cret@r1:6380/1", "ssl_cert_reqs": None}],
            "rediss://app:****@r1:6380/1",
            id="address",
        ),
        pytest.param(
            [{"address": "unix:///run/redis/redis.sock"}],
            "redis+unix:///run/redis/redis.sock",
            id="unix-address",
        ),
        pytest.param(
            [{"host": "r1", "port": 6380, "db": 3, "password": "s3cret"}],
            "redis://:****@r1:6380/3",
            id="arguments",
        ),
        pytest.param(
            [{"sentinels": [("s1", 26379), ("s2", 26380)], "master_name": "mymaster", "db": 1}],
            "redis+sentinel://s1:26379,s2:26380/mymaster/1",
            id="sentinel",
        ),
    ],
)
def test_a_redis_address_in_hosts_is_refused_naming_the_daemons_backend_url(
    hosts: Any, url: str
) -> None:
    message = refusal(hosts=hosts)

    assert "is a Redis address" in message
    assert "the daemon talks to Redis" in message
    assert f"`channels-broker serve --backend {url}`" in message
    assert 'list the daemon here instead, as "hosts": ["tcp://127.0.0.1:7733"]' in message
    assert "s3cret" not in message
    assert ("your password where **** is" in message) == ("****" in url)
    RedisSettings.from_url(url.replace("****", "pw"))  # the daemon takes what it names


def test_every_redis_entry_of_hosts_is_named() -> None:
    assert problems_of(hosts=[("r1", 6379), "tcp://127.0.0.1:7733", "redis://r2"]) == [
        ("hosts[0]", "channels_broker.E001"),
        ("hosts[2]", "channels_broker.E001"),
    ]


def test_sentinel_keys_beside_hosts_are_refused_naming_the_sentinel_url() -> None:
    message = refusal(sentinels=[("s1", 26379)], master_name="mymaster")

    assert "`channels-broker serve --backend redis+sentinel://s1:26379/mymaster`" in message


def test_channels_postgres_database_keys_are_refused_naming_the_daemons_backend_url() -> None:
    config = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "site",
        "USER": "app",
        "PASSWORD": "s3cret",
        "HOST": "db.internal",
        "PORT": "5433",
        "PSYCOPG_OPTIONS": {"min_size": 2},
        "expiry": 30,
        "prefix": "site",
    }

    assert problems_of(**config) == [("ENGINE", "channels_broker.E002")]
    message = refusal(**config)
    assert "ENGINE, NAME, USER, PASSWORD, HOST, PORT, PSYCOPG_OPTIONS:" in message
    url = "postgresql://app:****@db.internal:5433/site"
    assert (
        f"the daemon talks to PostgreSQL: start it with `channels-broker serve --backend {url}`"
        in (message)
    )
    assert "s3cret" not in message
    PostgresOptions.from_url(url.replace("****", "pw"))


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"hosts": "tcp://127.0.0.1:7733"}, 'write a list: "hosts": ["tcp://127.0.0.1:7733"]'),
        ({"hosts": ["127.0.0.1:7733"]}, 'is not a daemon address: write "tcp://127.0.0.1:7733"'),
        ({"hosts": [7733]}, "write tcp://host:port (the daemon's --listen)"),
        ({"prefix": "mysite:"}, "prefix 'mysite:' is not a namespace name: "),
        ({"prefix": "mysite:"}, "as 'mysite'"),
        ({"capacity": 0}, "capacity 0 is not a whole number above 0"),
        ({"capacity": True}, "capacity True is not a whole number above 0"),
        ({"expiry": "60"}, "expiry '60' is not a number of seconds above 0"),
        ({"group_expiry": 0}, "(channels_postgres reads 0 as never)"),
        ({"channel_capacity": {"a": 0}}, "gives 'a' 0, not a whole number above 0"),
        ({"channel_capacity": [("a", 1)]}, "channel_capacity [('a', 1)] is not a dict"),
        ({"max_message_bytes": -1}, "max_message_bytes -1 is not a whole number above 0"),
        ({"connect_timeout": float("inf")}, "connect_timeout inf is not a number of seconds"),
        ({"ssl_context": "tls"}, "ssl_context 'tls' is not an ssl.SSLContext"),
        ({"token": 1234}, "token 1234 is not a str"),
        ({"capacty": 50}, "unknown CONFIG key 'capacty': did you mean 'capacity'?"),
    ],
)
def test_a_value_the_layer_cannot_use_is_refused_saying_what_to_write(
    config: dict[str, Any], words: str
) -> None:
    assert words in refusal(**config)


def test_every_problem_is_named_at_once_as_an_improperly_configured_value_error() -> None:
    with pytest.raises(LayerConfigError) as caught:
        BrokerChannelLayer(hosts=[("r1", 6379)], capacity=0, on_reconnect=print, capcity=1)

    assert isinstance(caught.value, ImproperlyConfigured)
    assert isinstance(caught.value, ValueError)
    assert [problem.check_id for problem in caught.value.problems] == [
        "channels_broker.E001",
        "channels_broker.E005",
        "channels_broker.E003",
        "channels_broker.E004",
    ]


def test_the_layer_takes_every_key_of_its_own() -> None:
    layer = BrokerChannelLayer(
        hosts=["tcp://127.0.0.1:7733", "unix:///run/b.sock", "tls://[::1]:7734"],
        token="t",
        prefix="site-2.prod_x",
        capacity=5,
        expiry=1.5,
        group_expiry=10,
        channel_capacity={"http.request": 200},
        symmetric_encryption_keys=None,
        max_message_bytes=1024,
        connect_timeout=0.5,
        ssl_context=None,
        serializer_format="msgpack",
    )

    assert layer.settings.capacity == 5
