"""The Docker runner channel fed bytes: framing over the attached stream, no daemon."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiodocker.stream import Message

from pool.backends.base import RunRequest
from pool.backends.docker.channel import RunEnd, RunnerChannel
from pool.errors import BackendError, SandboxLostError
from pool.protocol import ProtocolViolation
from pool.wire import (
    DISPLAY,
    EXIT,
    FILE_OUT,
    READY,
    REQUEST,
    STATUS,
    STDERR,
    STDOUT,
    Outcome,
    OutcomeLimits,
    OutputCapture,
    content_frames,
    frame,
    header_frame,
)

LIMITS = OutcomeLimits(max_files=4, max_file_bytes=4, max_files_bytes=64, max_display_bytes=64)

STDOUT_STREAM, STDERR_STREAM = 1, 2


class FakeStream:
    """An attached stream that yields the given messages, then ends (or hangs)."""

    def __init__(self, *messages: Message, hang: bool = False, refuse: bool = False) -> None:
        self.messages = list(messages)
        self.hang = hang
        self.refuse = refuse
        self.written = bytearray()
        self.closed = False

    async def read_out(self) -> Message | None:
        if self.messages:
            return self.messages.pop(0)
        if self.hang:
            await asyncio.Event().wait()
        return None

    async def write_in(self, data: bytes) -> None:
        if self.refuse:
            raise ConnectionResetError("the container is gone")
        self.written += data

    async def close(self) -> None:
        self.closed = True


def out(data: bytes) -> Message:
    return Message(STDOUT_STREAM, data)


def exit_frame(status: int) -> bytes:
    return frame(EXIT, STATUS.pack(status))


def channel(*messages: Message, hang: bool = False) -> RunnerChannel:
    return RunnerChannel(FakeStream(*messages, hang=hang), "sbx-test")


async def test_frames_split_across_messages_and_packed_in_one_are_read_in_order() -> None:
    wire = frame(READY) + frame(STDOUT, b"hello\n") + frame(STDERR, b"oops") + exit_frame(3)
    # One byte per message, then everything in a single message: the same frames.
    for messages in ([out(wire[i : i + 1]) for i in range(len(wire))], [out(wire)]):
        runner = channel(*messages)
        frames = []
        while (next_frame := await runner.next_frame()) is not None:
            frames.append(next_frame)
        assert frames == [
            (READY, b""), (STDOUT, b"hello\n"), (STDERR, b"oops"), (EXIT, STATUS.pack(3)),
        ]


async def test_the_runners_own_stderr_is_not_read_as_frames() -> None:
    runner = channel(
        Message(STDERR_STREAM, b"Traceback (most recent call last): garbage"),
        out(frame(READY)),
    )
    await runner.wait_ready()


async def test_ready_needs_the_ready_frame_first() -> None:
    with pytest.raises(ProtocolViolation):
        await channel(out(frame(STDOUT, b"early"))).wait_ready()
    with pytest.raises(BackendError, match="exited before its runner was ready"):
        await channel().wait_ready()


async def test_the_request_is_a_json_header_then_the_files_bytes() -> None:
    stream = FakeStream()
    await RunnerChannel(stream, "sbx-test").send_request(
        RunRequest("print(1)", "in\0put", 5.0, files=(("a.txt", b"\xff"),), env={"K": "v"},
                   argv=("x",)), LIMITS)
    header_size, contents_size = REQUEST.unpack_from(stream.written)
    body = bytes(stream.written[REQUEST.size :])
    assert len(body) == header_size + contents_size
    assert json.loads(body[:header_size]) == {
        "code": "print(1)", "stdin": "in\0put", "files": [["a.txt", 1]], "env": {"K": "v"},
        "argv": ["x"], "limits": LIMITS.to_json(), "session": False,
    }
    assert body[header_size:] == b"\xff"


async def test_a_stream_that_refuses_the_request_is_a_lost_sandbox() -> None:
    runner = RunnerChannel(FakeStream(refuse=True), "sbx-test")
    with pytest.raises(SandboxLostError, match="sbx-test did not take its request"):
        await runner.send_request(RunRequest("print(1)", "", 5.0), LIMITS)


async def test_collect_captures_output_until_the_exit_frame() -> None:
    capture = OutputCapture(1024)
    runner = channel(out(frame(STDOUT, b"a") + frame(READY) + frame(STDERR, b"b") + exit_frame(0)))
    assert await runner.collect(capture, Outcome(LIMITS), 5.0) == (RunEnd.EXITED, 0)
    assert (bytes(capture.stdout), bytes(capture.stderr)) == (b"a", b"b")


async def test_collect_keeps_the_outcome_frames_within_the_pools_limits() -> None:
    capture, outcome = OutputCapture(1024), Outcome(LIMITS)
    file_header = header_frame(FILE_OUT, {"path": "out/a", "kind": "file", "size": 5})
    runner = channel(out(frame(STDOUT, b"a") + file_header + content_frames(b"12345")
                         + header_frame(DISPLAY, {"type": "text/plain"}) + content_frames(b"42")
                         + exit_frame(0)))
    assert await runner.collect(capture, outcome, 5.0) == (RunEnd.EXITED, 0)
    assert [(f.path, bytes(f.content), f.truncated) for f in outcome.files] == [
        ("out/a", b"1234", True)]
    assert [(d.mime, bytes(d.data)) for d in outcome.results] == [("text/plain", b"42")]


async def test_a_forged_outcome_frame_is_a_protocol_violation() -> None:
    forged = header_frame(FILE_OUT, {"path": "/etc/passwd", "kind": "file", "size": 1})
    runner = channel(out(frame(STDOUT, b"x") + forged + exit_frame(0)))
    result = await runner.collect(OutputCapture(1024), Outcome(LIMITS), 5.0)
    assert result == (RunEnd.PROTOCOL_VIOLATION, None)


async def test_collect_stops_at_the_output_cap() -> None:
    capture = OutputCapture(4)
    runner = channel(out(frame(STDOUT, b"abc") + frame(STDOUT, b"defg") + exit_frame(0)))
    assert await runner.collect(capture, Outcome(LIMITS), 5.0) == (RunEnd.OUTPUT_CAPPED, None)
    assert bytes(capture.stdout) == b"abcd"
    assert capture.stdout_truncated


async def test_collect_reports_a_stream_that_ends_without_an_exit_frame() -> None:
    capture = OutputCapture(1024)
    runner = channel(out(frame(STDOUT, b"partial")), out(b"X\0"))  # cut mid-frame
    assert await runner.collect(capture, Outcome(LIMITS), 5.0) == (RunEnd.STREAM_ENDED, None)
    assert bytes(capture.stdout) == b"partial"


async def test_collect_times_out_on_a_silent_runner() -> None:
    capture = OutputCapture(1024)
    runner = channel(out(frame(STDOUT, b"x")), hang=True)
    assert await runner.collect(capture, Outcome(LIMITS), 0.05) == (RunEnd.TIMED_OUT, None)
    assert bytes(capture.stdout) == b"x"


@pytest.mark.parametrize(
    "garbage",
    [
        b"Z\0\0\0\0",  # an unknown frame type
        b"O\xff\xff\xff\xff",  # a frame far over the decoder's limit
        exit_frame(256),  # a status no process can have
        exit_frame(-1),
        frame(EXIT, b"\0\0"),  # a short exit frame
    ],
)
async def test_collect_stops_at_garbled_or_forged_frames_keeping_what_came_before(
    garbage: bytes,
) -> None:
    capture = OutputCapture(1024)
    runner = channel(out(frame(STDOUT, b"before")), out(garbage + frame(STDOUT, b"after")))
    assert await runner.collect(capture, Outcome(LIMITS), 5.0) == (RunEnd.PROTOCOL_VIOLATION, None)
    assert bytes(capture.stdout) == b"before"


async def test_close_closes_the_stream() -> None:
    stream = FakeStream()
    await RunnerChannel(stream, "sbx-test").close()
    assert stream.closed
