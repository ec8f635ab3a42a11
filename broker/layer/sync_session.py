"""What a thread of sync code keeps across its connections: the client id it says HELLO
with, the numbers of its group sends, and those the daemon has not yet confirmed.

Theory of operation (docs/flow.md, *Numbered group sends*). To a daemon that numbers
group sends (WELCOME's version), ``broker.layer.sync``'s ``group_send`` writes a
GROUP_SEND with a seq and no request id and returns: nothing waits for an answer, up to
``MAX_UNCONFIRMED_GROUP_SENDS`` unconfirmed (past it the call reads CONFIRMs until one
frees room). CONFIRMs are read when they come: before each numbered write, without
blocking, and while a request waits for its answer. The daemon knows the seqs of the id
(proven by its secret), so after a reconnect the thread sends again, as requests with
their seq, those it has no CONFIRM for, and the daemon delivers each at most once.

A process made by ``fork()`` starts a session of its own (a new id, nothing unconfirmed):
it never sends again what its parent sent, nor writes to its parent's socket.
"""

from __future__ import annotations

import os
from collections.abc import Sized

from protocol import Confirm

from .acks import Unconfirmed
from .identity import Family, Identity

__all__ = ["SyncNumbers", "SyncSession"]


class SyncNumbers:
    """A sync thread's ``acks.Numbering``: group sends only (its SENDs are requests)."""

    __slots__ = ("dropping", "last_seq", "numbers_groups")

    def __init__(self) -> None:
        self.numbers_groups = False
        #: Storage failed a group send sent again: the connection is opened anew (and
        #: everything unconfirmed sent again) before the next call.
        self.dropping = False
        self.last_seq = 0

    @property
    def unsettled(self) -> Sized:
        return ()

    def confirmed(self, frame: Confirm) -> None:
        """Nothing to do: no send of a sync thread is windowed."""

    def drop_later(self) -> None:
        self.dropping = True


class SyncSession:
    """One thread's client id, numbers and unconfirmed group sends, in one process."""

    __slots__ = ("identity", "numbers", "pid", "unconfirmed")

    def __init__(self) -> None:
        #: A family of its own: a sync thread pulls no channel of the layer's loops.
        self.identity: Identity = Family().mint()
        self.pid = os.getpid()
        self.numbers = SyncNumbers()
        self.unconfirmed = Unconfirmed()

    def is_ours(self) -> bool:
        """Made in this process (not inherited through ``fork()``)."""
        return self.pid == os.getpid()
