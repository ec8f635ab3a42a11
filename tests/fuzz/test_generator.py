"""The fuzz generator does what the live run counts on: the same seed gives the same
inputs (so a failure found once is found again), a usual HELLO is a HELLO the daemon takes
in, and a body is requests only, ending in the PING whose PONG the sender waits for."""

from __future__ import annotations

from protocol import (
    Ack,
    Cancel,
    Flush,
    Frame,
    FrameDecoder,
    GroupAdd,
    GroupDiscard,
    GroupSend,
    Hello,
    Ping,
    Pong,
    Receive,
    ReturnRoom,
    Send,
    SendMany,
)
from tests.fuzz.frames import PREFIXES, FrameFuzzer, Script

SCRIPTS = 300
REQUESTS = {
    Send, SendMany, Receive, Cancel, Ack, GroupAdd, GroupDiscard, GroupSend, Flush, Ping,
    ReturnRoom,
}  # fmt: skip


def _decode(data: bytes) -> list[Frame]:
    decoder = FrameDecoder()
    decoder.receive_data(data)
    frames: list[Frame] = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    assert decoder.buffered_bytes == 0
    return frames


def _scripts(seed: int) -> list[Script]:
    fuzzer = FrameFuzzer(seed)
    return [fuzzer.script() for _ in range(SCRIPTS)] + fuzzer.heavy()


def test_one_seed_gives_the_same_inputs() -> None:
    assert _scripts(5) == _scripts(5)
    assert _scripts(5) != _scripts(6)


def test_a_usual_script_is_a_hello_requests_and_a_ping() -> None:
    usual = [script for script in _scripts(7) if script.label == "mix"]
    assert len(usual) > SCRIPTS * 0.8
    for script in usual:
        [hello] = _decode(script.hello)
        assert isinstance(hello, Hello) and hello.prefix in PREFIXES
        *requests, ping = _decode(script.body)
        assert isinstance(ping, Ping) and _decode(script.sentinel) == [Pong(ping.request_id)]
        assert all(type(frame) in REQUESTS for frame in requests)
        # A body is answered whole: no SEND in it spends room (no id with a seq).
        assert not [f for f in requests if type(f) is Send and f.seq and not f.request_id]
        assert script.inputs == 2 + len(requests) + bool(script.tail)
