"""Free TCP ports on 127.0.0.1, for the daemons and servers the tests start, and an
address of this machine that is not loopback, for what other hosts would reach."""

from __future__ import annotations

import contextlib
import socket

import pytest

__all__ = ["free_port", "free_ports", "is_free", "outside_address"]


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that nothing listens on right now."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def outside_address() -> str:
    """An IPv4 address of this machine other hosts could reach: where an attacker's
    packets arrive. (A UDP "connect" sends nothing; it only picks the interface.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: routed, never answered
            address: str = probe.getsockname()[0]
        except OSError:
            address = socket.gethostbyname(socket.gethostname())
    if address.startswith("127."):
        pytest.fail("this machine has no address but loopback: nothing to reach it from")
    return address
