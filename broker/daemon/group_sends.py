"""Numbered GROUP_SENDs: what each seq came to, off the message path.

Theory of operation (docs/flow.md, *Numbered group sends*). A client that said
``NUMBERED_GROUP_SEND_VERSION`` to a daemon that can keep its numbers (WELCOME answers
that version) numbers its GROUP_SENDs in the sequence of its SENDs. One with no request
id gets no answer: ``handlers`` handles a run of them in order and confirms the run
with one CONFIRM of the highest seq handled. After a reconnect the client sends again,
as requests with their seq, those it has no CONFIRM for; one delivered before is
answered OK and delivered no second time. What each seq came to is the client's
``Seqs`` (``windows``) on ``memory://``, and on Redis and PostgreSQL the record shared
storage keeps for its numbered SENDs (``backends.RecordsSeqs``), looked up for a resend
and written once per run, before its CONFIRM. A numbered GROUP_SEND that breaks the
rules (a name or size a request would be refused for) closes the connection, as a
windowed SEND does: its sender heard nothing, and the daemon counts and logs it.

A new seq on ``memory://`` (the usual case) needs nothing of this module: ``handlers``
moves ``Seqs.highest`` on itself.

The connections of one client handle their runs one at a time (``lock``): the client
sends again, on its new connection, what its old one may still be delivering (a cut
connection's daemon side goes on with the frame in hand), and the record of that run
must be written before a resend of it is looked up.
"""

from __future__ import annotations

import asyncio
import logging

from backends import BackendError, RecordsSeqs
from protocol import FANOUT_VERSION, NUMBERED_GROUP_SEND_VERSION, ErrorCode, GroupSend, Hello, Ok

from .context import Context
from .sends import Sends
from .shell import Shell

__all__ = ["GroupSeqs"]

log = logging.getLogger("channels_broker.connection")


class GroupSeqs:
    """What the numbered GROUP_SENDs of one connection came to."""

    def __init__(self, shell: Shell, ctx: Context, sends: Sends) -> None:
        self.shell = shell
        self.ctx = ctx
        #: Held while a run of this client's numbered GROUP_SENDs is handled (``attach``).
        self.lock = asyncio.Lock()
        #: The connection's SENDs: their ``seqs`` number group sends too.
        self.sends = sends
        backend = ctx.backend
        #: Shared storage's record of numbered sends, or None (``memory://``: ``seqs``).
        self.records = backend if backend.is_shared and isinstance(backend, RecordsSeqs) else None
        #: The daemon can keep the numbers of this client's group sends.
        self.can_number = self.records is not None or not backend.is_shared

    def attach(self, ns: str, client_id: str) -> None:
        """HELLO named the client: share its lock with its other connections."""
        locks = self.ctx.group_send_locks
        self.lock = locks.setdefault((ns, client_id), self.lock)

    def version_for(self, hello: Hello) -> int:
        """The version to answer HELLO with: numbered group sends only where they can be
        kept, else at most the version before them."""
        if hello.version >= NUMBERED_GROUP_SEND_VERSION and not self.can_number:
            return FANOUT_VERSION
        return hello.version

    async def was_stored(self, frame: GroupSend) -> bool:
        """A retry of a seq delivered before? Then it is answered (a request), and True.
        On shared storage only a request can be one (a resend), and the connection's
        ``seqs`` know only its own seqs, so storage's record is asked."""
        seq = frame.seq
        if self.records is None:
            stored = self.sends.seqs.was_stored(seq)
        elif not frame.request_id:
            return False
        else:
            session = self.shell.session
            assert session is not None
            try:
                stored = await self.records.seq_was_stored(session.ns, session.client_id, seq)
            except BackendError:
                return False  # then delivering it fails too, and says so
        if stored:
            self.sends.seqs.handled(seq, stored=True)
            if frame.request_id:
                self.shell.write(Ok(frame.request_id))
        return stored

    async def refused(self, frame: GroupSend) -> None:
        """``frame`` was refused (answered, or the connection closes): not delivered."""
        self.sends.seqs.handled(frame.seq, stored=False)
        await self.record([frame.seq], stored=False)

    async def failed(self, frame: GroupSend, exc: BackendError, stored: list[int]) -> None:
        """Storage failed ``frame``: record the run's delivered ones up to ``stored``
        and this one as not delivered, then answer so, or close (the client sends it,
        and every later one, again)."""
        log.warning("backend error for GroupSend: %s", exc)
        await self.record(stored, stored=True)
        await self.refused(frame)
        if frame.request_id:
            self.shell.fail(frame.request_id, ErrorCode.BACKEND_UNAVAILABLE, str(exc))
        else:  # no answer can say so
            self.shell.fatal(ErrorCode.BACKEND_UNAVAILABLE, f"a numbered GroupSend failed: {exc}")

    async def record(self, seqs: list[int], *, stored: bool) -> None:
        """Shared storage: write each of ``seqs``' outcome, in one storage call."""
        session = self.shell.session
        if not seqs or self.records is None or session is None:
            return
        try:
            await self.records.record_seq(
                session.ns, session.client_id, seqs, stored=stored, keep_s=session.expiry_s
            )
        except BackendError as exc:
            log.warning("could not record group sends of %s: %s", session.client_id, exc)
