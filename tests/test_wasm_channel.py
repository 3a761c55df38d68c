"""The wasm tier's channel to one guest, fed bytes and outcomes: no daemon, no wasmtime.

The guest's side of each pipe is played by the test: it writes the ready
frame (or something else), reads the request, writes output past the cap.
How ``_start`` ended becomes an exit code by ``exit_code`` alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Iterator

import pytest

from pool.backends.wasm.channel import (
    TRAP_EXIT_CODE,
    GuestChannel,
    GuestExit,
    Handshake,
    ReadyFrame,
    exit_code,
    open_pipes,
)
from pool.errors import BackendError
from pool.wire import READY_FRAME, WASI_MAX_STATUS, OutputCapture

GuestEnds = tuple[int, int, int]  # the guest's stdin (read), stdout and stderr (write)


@pytest.fixture
def pipes() -> Iterator[tuple[GuestChannel, GuestEnds]]:
    channel, guest = open_pipes()
    try:
        yield channel, guest
    finally:
        for fd in (channel.stdin_w, channel.stdout_r, channel.stderr_r, *guest):
            with contextlib.suppress(OSError):
                if fd >= 0:
                    os.close(fd)


def read_all(fd: int) -> bytes:
    """The guest reading its stdin to EOF (blocking: call it from a thread)."""
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


# --- the ready frame ----------------------------------------------------------


def test_the_ready_frame_whole_or_byte_by_byte_is_ready() -> None:
    assert ReadyFrame().feed(READY_FRAME) is Handshake.READY
    frame = ReadyFrame()
    for i, byte in enumerate(READY_FRAME):
        assert frame.missing == len(READY_FRAME) - i  # never asks past the frame
        state = frame.feed(bytes([byte]))
        assert state is (Handshake.READY if i == len(READY_FRAME) - 1 else Handshake.WAITING)
    assert frame.missing == 0


@pytest.mark.parametrize(
    "received",
    [
        [b"Traceback (most recent call last):\n"],
        [READY_FRAME[:1], b"\xff"],
        [READY_FRAME[:-1], b""],  # EOF one byte short
        [b""],  # EOF at once
    ],
)
def test_other_bytes_or_an_early_eof_are_not_ready(received: list[bytes]) -> None:
    frame = ReadyFrame()
    states = [frame.feed(data) for data in received]
    assert states[-1] is Handshake.FAILED
    assert frame.feed(READY_FRAME) is Handshake.FAILED  # decided once: no later rescue


async def test_a_guest_that_writes_the_frame_is_ready_and_its_output_stays_in_the_pipe(
    pipes: tuple[GuestChannel, GuestEnds],
) -> None:
    channel, (_, stdout_w, _) = pipes
    os.write(stdout_w, READY_FRAME[:3])
    ready = channel.await_ready(asyncio.get_running_loop())
    await asyncio.sleep(0.05)
    assert not ready.done()
    os.write(stdout_w, READY_FRAME[3:] + b"first output")
    async with asyncio.timeout(5):
        await ready
    assert os.read(channel.stdout_r, 100) == b"first output"


@pytest.mark.parametrize("guest_writes", [b"not a frame at all", None], ids=["garbage", "eof"])
async def test_a_guest_that_writes_anything_else_or_ends_is_not_ready(
    pipes: tuple[GuestChannel, GuestEnds], guest_writes: bytes | None
) -> None:
    channel, (_, stdout_w, _) = pipes
    ready = channel.await_ready(asyncio.get_running_loop())
    if guest_writes is None:
        os.close(stdout_w)
    else:
        os.write(stdout_w, guest_writes)
    with pytest.raises(BackendError, match="did not report ready"):
        async with asyncio.timeout(5):
            await ready


# --- the request --------------------------------------------------------------


async def test_a_request_arrives_whole_then_eof(pipes: tuple[GuestChannel, GuestEnds]) -> None:
    channel, (stdin_r, _, _) = pipes
    channel.send(b"request and its stdin")
    assert channel.stdin_w == -1  # all written at once: closed at once
    assert await asyncio.to_thread(read_all, stdin_r) == b"request and its stdin"


async def test_a_request_larger_than_the_pipe_goes_out_as_the_guest_reads(
    pipes: tuple[GuestChannel, GuestEnds],
) -> None:
    channel, (stdin_r, _, _) = pipes
    payload = os.urandom(3 * 1024 * 1024)  # far past a pipe's 64 KiB buffer
    channel.send(payload)  # returns at once: the loop writes the rest
    assert channel.stdin_w >= 0
    async with asyncio.timeout(30):
        received = await asyncio.to_thread(read_all, stdin_r)
    assert received == payload
    assert channel.stdin_w == -1


async def test_closing_stdin_mid_request_stops_the_writer_and_the_guest_sees_eof(
    pipes: tuple[GuestChannel, GuestEnds],
) -> None:
    channel, (stdin_r, _, _) = pipes
    channel.send(b"x" * (1024 * 1024))
    channel.close_stdin()  # a kill while the request is still going out
    channel.close_stdin()  # idempotent
    received = await asyncio.to_thread(read_all, stdin_r)
    assert 0 < len(received) < 1024 * 1024


async def test_a_request_to_a_guest_that_is_gone_raises_oserror(
    pipes: tuple[GuestChannel, GuestEnds],
) -> None:
    channel, (stdin_r, _, _) = pipes
    os.close(stdin_r)
    with pytest.raises(BrokenPipeError):
        channel.send(b"request")


# --- the output -----------------------------------------------------------------


async def test_output_past_the_cap_is_cut_and_drained_so_the_guest_never_blocks(
    pipes: tuple[GuestChannel, GuestEnds],
) -> None:
    channel, (_, stdout_w, stderr_w) = pipes
    loop = asyncio.get_running_loop()
    capture = OutputCapture(1000)
    over_cap = threading.Event()
    output = channel.output(loop, capture, over_cap.set)

    def guest() -> None:  # blocks on a full pipe unless the loop keeps reading
        os.write(stderr_w, b"warning\n")
        for _ in range(64):
            os.write(stdout_w, b"y" * 65536)
        os.close(stdout_w)
        os.close(stderr_w)

    try:
        async with asyncio.timeout(30):
            await asyncio.to_thread(guest)
        output.drain()
    finally:
        output.stop()
    assert over_cap.is_set()
    assert bytes(capture.stdout) == b"y" * 1000
    assert capture.stdout_truncated
    assert bytes(capture.stderr) == b"warning\n"
    assert not capture.stderr_truncated
    channel.close()
    channel.close()  # idempotent
    assert channel.stdout_r == channel.stderr_r == -1


# --- the exit code ----------------------------------------------------------------


def no_status_file() -> bytes:
    raise AssertionError("read only for a status of WASI_MAX_STATUS")


@pytest.mark.parametrize("status", [0, 1, 3, WASI_MAX_STATUS - 1])
def test_a_wasi_exit_status_is_the_exit_code(status: int) -> None:
    assert exit_code(GuestExit(status=status), no_status_file, sandbox_id="s") == status


def test_a_trap_is_reported_like_sigabrt() -> None:
    outcome = GuestExit(status=None, trap="wasm trap: call stack exhausted")
    assert exit_code(outcome, no_status_file, sandbox_id="s") == TRAP_EXIT_CODE == 134
    assert outcome.describe() == "wasm trap: call stack exhausted"
    assert GuestExit(status=7).describe() == "exit status 7"


@pytest.mark.parametrize(
    ("status_file", "expected"),
    [
        (b"200", 200),
        (b"255\n", 255),
        (b"256", WASI_MAX_STATUS),  # no exit code is above 255
        (b"100", WASI_MAX_STATUS),  # a status WASI carries is never the file's to say
        (b"-3", WASI_MAX_STATUS),
        (b"not a number", WASI_MAX_STATUS),
        (b"", WASI_MAX_STATUS),
    ],
)
def test_the_status_file_speaks_only_for_statuses_wasi_cannot_carry(
    status_file: bytes, expected: int
) -> None:
    outcome = GuestExit(status=WASI_MAX_STATUS)
    assert exit_code(outcome, lambda: status_file, sandbox_id="s") == expected


def test_an_unreadable_or_missing_status_file_leaves_the_wasi_status() -> None:
    def unreadable() -> bytes:
        raise OSError("a link the guest planted")

    outcome = GuestExit(status=WASI_MAX_STATUS)
    assert exit_code(outcome, unreadable, sandbox_id="s") == WASI_MAX_STATUS
    assert exit_code(outcome, None, sandbox_id="s") == WASI_MAX_STATUS
