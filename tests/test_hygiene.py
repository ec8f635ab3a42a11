"""The suite changes nothing outside what it owns: no server-wide Redis command (SCRIPT
FLUSH, FLUSHALL, FLUSHDB, CONFIG SET, ACL SETUSER...) and no PostgreSQL server setting,
except through ``tests.servers.server_command``, which runs one only on a server the
session started. The Redis at ``REDIS_URL`` may serve other applications (whose Lua
scripts SCRIPT FLUSH would drop) and other test runs.

Read from the sources, not run: every call in ``tests/`` that sends a command (redis-py's
methods, ``execute_command``, a subprocess, bytes on a socket) is checked for one.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
#: The guarded helper: where such a command may be sent (it checks the server first).
GUARDED = ("servers.py", "server_command")
#: redis-py's methods for server-wide commands.
GLOBAL_METHODS = frozenset(
    {
        "flushall", "flushdb", "script_flush", "script_kill", "config_set",
        "config_rewrite", "config_resetstat", "function_flush", "function_delete",
        "function_restore", "acl_setuser", "acl_deluser", "client_kill", "client_pause",
        "swapdb", "replicaof", "slaveof", "failover", "sentinel_set", "sentinel_remove",
        "sentinel_reset", "sentinel_failover", "shutdown_server",
    }
)  # fmt: skip
#: Calls that send a command given as strings: a driver's, a process's, a socket's.
SENDERS = frozenset(
    {
        "execute_command", "execute", "run", "Popen", "check_call", "check_output",
        "call", "sendall", "send", "write", "fetch", "fetchval",
    }
)  # fmt: skip
#: Server-wide commands, as the words a command starts with (any case).
GLOBAL_COMMANDS = re.compile(
    r"\b(FLUSHALL|FLUSHDB|SWAPDB|REPLICAOF|SLAVEOF|FAILOVER|SHUTDOWN|DEBUG"
    r"|SCRIPT\s+(FLUSH|KILL)|CONFIG\s+(SET|REWRITE|RESETSTAT)|FUNCTION\s+(FLUSH|DELETE|RESTORE)"
    r"|ACL\s+(SETUSER|DELUSER)|CLIENT\s+(KILL|PAUSE)|SENTINEL\s+(SET|REMOVE|RESET|FAILOVER)"
    r"|ALTER\s+SYSTEM|DROP\s+DATABASE|PG_TERMINATE_BACKEND|PG_RELOAD_CONF)\b",
    re.IGNORECASE,
)


def _callee(call: ast.Call) -> str:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else ""


def _words(call: ast.Call) -> str:
    """The string and bytes constants among the call's arguments, in order, joined."""
    found = []
    for argument in call.args:
        for node in ast.walk(argument):
            if isinstance(node, ast.Constant) and isinstance(node.value, str | bytes):
                value = node.value
                found.append(value.decode(errors="replace") if isinstance(value, bytes) else value)
    return " ".join(found)


def _guarded_lines(path: Path, tree: ast.Module, root: Path) -> set[int]:
    if path.relative_to(root).as_posix() != GUARDED[0]:
        return set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == GUARDED[1]:
            return set(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    raise AssertionError(f"tests/{GUARDED[0]} has no {GUARDED[1]}")


def global_commands(path: Path, root: Path = TESTS) -> list[str]:
    """``file:line: call`` for each server-wide command ``path`` (a file under ``root``)
    sends outside the guarded helper."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    guarded = _guarded_lines(path, tree, root)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or node.lineno in guarded:
            continue
        callee = _callee(node)
        if callee in GLOBAL_METHODS or (callee in SENDERS and GLOBAL_COMMANDS.search(_words(node))):
            found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_test_sends_a_server_wide_command_but_through_the_guarded_helper() -> None:
    sources = sorted(p for p in TESTS.rglob("*.py") if p != Path(__file__).resolve())
    assert len(sources) > 50
    found = [line for path in sources for line in global_commands(path)]
    assert found == [], "use tests.servers.server_command on a server of ours:\n" + "\n".join(found)


def test_the_scan_finds_each_way_of_sending_one(tmp_path: Path) -> None:
    """The scan is not blind: each form a test could take is found."""
    path = tmp_path / "example.py"
    path.write_text(
        "client.flushall()\n"
        "client.config_set('save', '')\n"
        "await pipe.execute('SCRIPT', 'FLUSH')\n"
        "client.execute_command('config', 'set', 'maxmemory', '1mb')\n"
        "subprocess.run(['redis-cli', '-p', '6379', 'FLUSHDB'])\n"
        "sock.sendall(b'SCRIPT FLUSH\\r\\n')\n"
        "await conn.execute('ALTER SYSTEM SET work_mem = 1')\n"
        # Not global: a namespace's flush, a script load, a key deletion, a log line.
        "await backend.flush(ns)\n"
        "client.execute_command('SCRIPT', 'LOAD', body)\n"
        "client.unlink(*keys)\n"
        "broker.wait_for_log(lambda line: 'shutdown deadline' in line)\n"
    )
    found = global_commands(path, tmp_path)
    assert sorted(int(line.split(":")[1]) for line in found) == list(range(1, 8)), found
