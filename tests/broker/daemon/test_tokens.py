"""The token table (broker.daemon.tokens): the file's format, and what each token may use."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import Config
from broker.daemon.tokens import IgnoredTokens, TokenTable, refusal
from broker.errors import ConfigError
from broker.layer.identity import Family
from protocol import PROTOCOL_VERSION, ErrorCode, Hello

FILE = """\
# site A's processes
alpha-token  site-a

beta-token   site-b   # trailing comments are allowed
beta-token   site-b.staging
    # an indented comment
ops-token *
"""


def test_the_file_binds_each_token_to_its_namespaces() -> None:
    table = TokenTable.parse(FILE, "tokens")
    assert len(table) == 3
    assert table.namespaces_of("alpha-token") == frozenset({"site-a"})
    assert table.namespaces_of("beta-token") == frozenset({"site-b", "site-b.staging"})
    assert table.namespaces_of("ops-token") == frozenset({"*"})
    assert table.namespaces_of("alpha") is None
    assert table.namespaces_of("") is None


def hello_with(token: str, prefix: str = "asgi", client_id: str = "") -> Hello:
    return Hello(
        version=PROTOCOL_VERSION,
        token=token,
        client_id=client_id,
        prefix=prefix,
        capacity=100,
        expiry_s=60.0,
        group_expiry_s=86400.0,
    )


def test_a_hello_is_refused_outside_its_tokens_namespaces() -> None:
    table = TokenTable.parse(FILE, "tokens")
    peer = "127.0.0.1:1"
    assert refusal(table, hello_with("alpha-token", "site-a"), peer) is None
    assert refusal(table, hello_with("ops-token", "anything"), peer) is None
    forbidden = refusal(table, hello_with("alpha-token", "site-b"), peer)
    assert forbidden is not None and forbidden[0] is ErrorCode.FORBIDDEN
    unknown = refusal(table, hello_with("guess", "site-a"), peer)
    assert unknown == (ErrorCode.AUTH_FAILED, "invalid token")
    assert refusal(None, hello_with(""), peer) is None  # no token asked for


def test_no_token_is_missing_not_invalid(caplog: pytest.LogCaptureFixture) -> None:
    table = TokenTable.parse(FILE, "tokens")
    refused = refusal(table, hello_with(""), "127.0.0.1:1")
    assert refused is not None
    code, message = refused
    assert code is ErrorCode.AUTH_FAILED
    assert message.startswith("missing token") and "'token'" in message
    assert "no token (tokens asks for one)" in caplog.text


def test_a_token_the_daemon_does_not_ask_for_is_logged_once_per_client_process(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two clients of one process (one family), a reconnect, and another process: the
    HELLOs are all served, and two lines say their tokens are ignored."""
    ignored = IgnoredTokens()
    family = Family()
    first, second = family.mint().client_id, family.mint().client_id
    other = Family().mint().client_id
    for client_id in (first, second, first, other):
        hello = hello_with("s3cret", client_id=client_id)
        assert refusal(None, hello, "127.0.0.1:5", ignored) is None
    assert refusal(None, hello_with(""), "127.0.0.1:5", ignored) is None  # no token: nothing
    lines = [r.getMessage() for r in caplog.records if "sent a token" in r.getMessage()]
    assert len(lines) == 2, lines
    assert first in lines[0] and other in lines[1]
    assert "this daemon has none" in lines[0] and "ignored" in lines[0]
    assert "s3cret" not in caplog.text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("alpha-token\n", "line 1: expected TOKEN NAMESPACE"),
        ("# fine\nalpha-token site-a extra\n", "line 2: expected TOKEN NAMESPACE"),
        ("alpha-token site:a\n", "line 1: 'site:a' is not a namespace"),
        ("# nothing but comments\n\n", "holds no token"),
    ],
)
def test_a_bad_file_is_refused_by_line_without_showing_the_token(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        TokenTable.parse(text, "tokens")
    assert "alpha-token" not in str(raised.value)


def test_the_config_chooses_the_table(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(FILE)
    from_file = TokenTable.from_config(Config(token_file=str(path)))
    assert from_file is not None
    assert from_file.namespaces_of("beta-token") == frozenset({"site-b", "site-b.staging"})
    one = TokenTable.from_config(Config(token="s3cret"))
    assert one is not None and one.namespaces_of("s3cret") == frozenset({"*"})
    assert TokenTable.from_config(Config()) is None
    with pytest.raises(ConfigError, match="cannot read the token file"):
        TokenTable.from_config(Config(token_file=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="not both"):
        Config(token="s3cret", token_file=str(path))
