"""The token table (broker.daemon.tokens): the file's format, and what each token may use."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import Config
from broker.daemon.tokens import TokenTable, refusal
from broker.errors import ConfigError
from protocol import ErrorCode

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


def test_a_hello_is_refused_outside_its_tokens_namespaces() -> None:
    table = TokenTable.parse(FILE, "tokens")
    peer = "127.0.0.1:1"
    assert refusal(table, "alpha-token", "site-a", peer) is None
    assert refusal(table, "ops-token", "anything", peer) is None
    forbidden = refusal(table, "alpha-token", "site-b", peer)
    assert forbidden is not None and forbidden[0] is ErrorCode.FORBIDDEN
    unknown = refusal(table, "guess", "site-a", peer)
    assert unknown is not None and unknown[0] is ErrorCode.AUTH_FAILED
    assert refusal(None, "", "any", peer) is None  # no token asked for


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
