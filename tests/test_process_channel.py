"""The process tier's channel fed bytes: no bwrap, no daemon.

``RunnerProtocol`` gets what asyncio would hand it from bwrap's stdout, and
``OutputPipes`` real pipes written by the test in place of the code, so each
verdict a run can reach is checked from the bytes that lead to it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest

from pool.backends.process.channel import OutputPipes, Run, RunnerProtocol, RunState
from pool.errors import BackendError
from pool.protocol import ProtocolViolation
from pool.wire import (
    EXIT,
    FILE_OUT,
    READY_FRAME,
    SESSION,
    STATUS,
    STDOUT,
    Outcome,
    OutcomeLimits,
    OutputCapture,
    content_frames,
    frame,
    header_frame,
)

LIMITS = OutcomeLimits(max_files=2, max_file_bytes=1 << 20, max_files_bytes=1 << 21,
                       max_display_bytes=1 << 20)

CAP = 64  # bytes of stdout or stderr a run keeps


def ready_protocol() -> RunnerProtocol:
    protocol = RunnerProtocol(asyncio.get_running_loop())
    protocol.pipe_data_received(1, READY_FRAME)
    assert protocol.ready.done()
    assert protocol.ready.exception() is None
    return protocol


def new_run(protocol: RunnerProtocol | None = None) -> Run:
    run = Run(OutputCapture(CAP), asyncio.get_running_loop().create_future(), Outcome(LIMITS))
    if protocol is not None:
        protocol.run = run
    return run


@pytest.fixture
def pipes() -> Iterator[OutputPipes]:
    pipes = OutputPipes()
    try:
        yield pipes
    finally:
        pipes.close()


def write_ends(pipes: OutputPipes) -> tuple[int, int, int]:
    stdout_w, stderr_w, status_w = pipes.write_ends
    return stdout_w, stderr_w, status_w


# --- readiness ----------------------------------------------------------------


async def test_the_ready_frame_counts_however_it_is_split() -> None:
    protocol = RunnerProtocol(asyncio.get_running_loop())
    for byte in READY_FRAME:
        assert not protocol.ready.done()
        protocol.pipe_data_received(1, bytes([byte]))
    assert protocol.ready.done()
    assert protocol.ready.exception() is None


async def test_output_before_the_ready_frame_fails_the_start() -> None:
    protocol = RunnerProtocol(asyncio.get_running_loop())
    protocol.pipe_data_received(1, frame(STDOUT, b"hello"))
    with pytest.raises(ProtocolViolation, match="before it was ready"):
        await protocol.ready


async def test_garbage_before_the_ready_frame_fails_the_start() -> None:
    protocol = RunnerProtocol(asyncio.get_running_loop())
    protocol.pipe_data_received(1, b"Traceback (most recent call last):\n")
    with pytest.raises(ProtocolViolation):
        await protocol.ready


async def test_bwrap_gone_before_the_ready_frame_fails_the_start() -> None:
    protocol = RunnerProtocol(asyncio.get_running_loop())
    protocol.pipe_connection_lost(1, None)
    with pytest.raises(BackendError, match="exited before its runner was ready"):
        await protocol.ready


async def test_only_bwraps_stdout_is_the_runners_channel() -> None:
    protocol = RunnerProtocol(asyncio.get_running_loop())
    protocol.pipe_data_received(2, b"garbage on stderr")
    protocol.pipe_data_received(1, READY_FRAME)
    assert protocol.ready.exception() is None


# --- a run's end, from the runner's frames --------------------------------------


async def test_an_exit_frame_ends_the_run_with_its_status() -> None:
    protocol = ready_protocol()
    run = new_run(protocol)
    protocol.pipe_data_received(1, frame(EXIT, STATUS.pack(137)))
    await run.done
    assert (run.state, run.exit_code) == (RunState.EXITED, 137)
    assert run.state.runner_gone is False
    assert run.state.kills is False


@pytest.mark.parametrize("status", [-1, 256, 1 << 30])
async def test_a_forged_exit_frame_is_a_violation_without_an_exit_code(status: int) -> None:
    protocol = ready_protocol()
    run = new_run(protocol)
    protocol.pipe_data_received(1, frame(EXIT, STATUS.pack(status)))
    await run.done
    assert (run.state, run.exit_code) == (RunState.VIOLATION, None)
    assert run.state.kills is True


async def test_a_short_exit_frame_is_a_violation() -> None:
    protocol = ready_protocol()
    run = new_run(protocol)
    protocol.pipe_data_received(1, frame(EXIT, b"\x00\x01"))
    await run.done
    assert run.state is RunState.VIOLATION


async def test_an_output_frame_in_direct_mode_is_a_violation() -> None:
    protocol = ready_protocol()
    run = new_run(protocol)
    protocol.pipe_data_received(1, frame(STDOUT, b"direct mode sends output on pipes"))
    await run.done
    assert run.state is RunState.VIOLATION


async def test_garbage_during_a_run_is_a_violation_and_nothing_after_it_counts() -> None:
    protocol = ready_protocol()
    run = new_run(protocol)
    protocol.pipe_data_received(1, b"Z" + bytes(8))
    protocol.pipe_data_received(1, frame(EXIT, STATUS.pack(0)))
    await run.done
    assert (run.state, run.exit_code) == (RunState.VIOLATION, None)


async def test_frames_after_the_verdict_change_nothing() -> None:
    protocol = ready_protocol()
    run = new_run(protocol)
    protocol.pipe_data_received(1, frame(EXIT, STATUS.pack(3)))
    protocol.pipe_data_received(1, frame(EXIT, STATUS.pack(4)) + b"garbage")
    assert (run.state, run.exit_code) == (RunState.EXITED, 3)


async def test_the_runner_gone_without_an_exit_frame_ends_the_run() -> None:
    protocol = ready_protocol()
    run = new_run(protocol)
    protocol.pipe_connection_lost(1, None)
    await run.done
    assert run.state is RunState.RUNNER_GONE
    assert run.state.runner_gone is True
    assert run.state.over_cap is False


@pytest.mark.parametrize("refused_first", [True, False])
async def test_a_request_that_could_not_be_written_was_not_taken(refused_first: bool) -> None:
    protocol = ready_protocol()
    run = new_run(protocol)
    events = [
        lambda: protocol.pipe_connection_lost(0, BrokenPipeError()),
        lambda: protocol.pipe_connection_lost(1, None),
    ]
    for event in events if refused_first else reversed(events):
        event()
    await run.done
    assert run.state is RunState.NOT_TAKEN
    assert run.state.runner_gone is True


async def test_a_status_after_the_refusal_shows_the_request_was_taken() -> None:
    protocol = ready_protocol()
    run = new_run(protocol)
    protocol.pipe_connection_lost(0, BrokenPipeError())
    protocol.pipe_connection_lost(1, None)
    run.answer(STATUS.pack(0))
    assert run.state is RunState.RUNNER_GONE


async def test_stdin_closed_cleanly_refuses_nothing() -> None:
    protocol = ready_protocol()
    run = new_run(protocol)
    protocol.pipe_connection_lost(0, None)
    protocol.pipe_connection_lost(1, None)
    assert run.state is RunState.RUNNER_GONE


async def test_a_refused_request_still_waits_for_its_answer() -> None:
    protocol = ready_protocol()
    run = new_run(protocol)
    protocol.pipe_connection_lost(0, BrokenPipeError())
    assert run.state is RunState.REFUSED
    assert not run.done.done()
    protocol.pipe_data_received(1, frame(EXIT, STATUS.pack(1)))
    assert (run.state, run.exit_code) == (RunState.EXITED, 1)


# --- a parked sandbox -------------------------------------------------------------


@pytest.mark.parametrize("how", ["stdout_closed", "process_exited"])
async def test_a_parked_runners_death_is_reported(how: str) -> None:
    protocol = ready_protocol()
    deaths: list[None] = []
    protocol.on_idle_death = lambda: deaths.append(None)
    if how == "stdout_closed":
        protocol.pipe_connection_lost(1, None)
    else:
        protocol.process_exited()
        assert protocol.exited.result() < 0  # no transport: as if SIGKILLed
    assert deaths == [None]


async def test_a_death_during_a_run_is_the_runs_not_the_pools() -> None:
    protocol = ready_protocol()
    deaths: list[None] = []
    protocol.on_idle_death = lambda: deaths.append(None)
    run = new_run(protocol)
    protocol.pipe_connection_lost(1, None)
    protocol.process_exited()
    assert run.state is RunState.RUNNER_GONE
    assert deaths == []


# --- the code's own pipes ------------------------------------------------------------


async def test_the_status_pipe_ends_the_run_with_the_output_before_it(
    pipes: OutputPipes,
) -> None:
    loop = asyncio.get_running_loop()
    run = new_run()
    pipes.watch(loop, run)
    stdout_w, stderr_w, status_w = write_ends(pipes)
    os.write(stdout_w, b"out")
    os.write(stderr_w, b"err")
    os.write(status_w, frame(EXIT, STATUS.pack(7)))
    await asyncio.wait_for(run.done, 5)
    pipes.unwatch(loop, run)
    assert (run.state, run.exit_code) == (RunState.EXITED, 7)
    assert (bytes(run.capture.stdout), bytes(run.capture.stderr)) == (b"out", b"err")


async def test_outcome_frames_on_the_status_pipe_come_before_its_status(
    pipes: OutputPipes,
) -> None:
    loop = asyncio.get_running_loop()
    run = new_run()
    pipes.watch(loop, run)
    big = bytes(range(256)) * 1024  # 256 KiB: several chunks and wake-ups
    header = header_frame(FILE_OUT, {"path": "out/big", "kind": "file", "size": len(big)})
    status_w = write_ends(pipes)[2]
    writer = asyncio.create_task(asyncio.to_thread(
        os.write, status_w, header + content_frames(big) + frame(EXIT, STATUS.pack(0))))
    await asyncio.wait_for(run.done, 5)
    await writer
    pipes.unwatch(loop, run)
    assert (run.state, run.exit_code) == (RunState.EXITED, 0)
    assert run.outcome is not None
    assert [(f.path, bytes(f.content)) for f in run.outcome.files] == [("out/big", big)]


async def test_an_output_frame_on_the_status_pipe_is_a_violation(pipes: OutputPipes) -> None:
    loop = asyncio.get_running_loop()
    run = new_run()
    pipes.watch(loop, run)
    os.write(write_ends(pipes)[2], frame(STDOUT, b"forged") + frame(EXIT, STATUS.pack(0)))
    await asyncio.wait_for(run.done, 5)
    pipes.unwatch(loop, run)
    assert (run.state, run.exit_code) == (RunState.VIOLATION, None)


async def test_a_status_drains_what_the_code_wrote_before_it(pipes: OutputPipes) -> None:
    loop = asyncio.get_running_loop()
    run = new_run()
    pipes.watch(loop, run)
    stdout_w, _, _ = write_ends(pipes)
    os.write(stdout_w, b"written just before the status")
    run.answer(STATUS.pack(0))  # before the loop has polled the output pipe
    pipes.unwatch(loop, run)
    assert bytes(run.capture.stdout) == b"written just before the status"


async def test_a_forged_status_on_the_pipe_is_a_violation(pipes: OutputPipes) -> None:
    loop = asyncio.get_running_loop()
    run = new_run()
    pipes.watch(loop, run)
    os.write(write_ends(pipes)[2], frame(EXIT, STATUS.pack(-9)))
    await asyncio.wait_for(run.done, 5)
    pipes.unwatch(loop, run)
    assert (run.state, run.exit_code) == (RunState.VIOLATION, None)


async def test_a_status_pipe_closed_without_a_status_leaves_the_verdict_to_the_runner(
    pipes: OutputPipes,
) -> None:
    loop = asyncio.get_running_loop()
    protocol = ready_protocol()
    run = new_run(protocol)
    pipes.watch(loop, run)
    status_w = write_ends(pipes)[2]
    os.write(status_w, b"\x00\x01")  # short: closed by exec, or garbage
    await asyncio.sleep(0.05)
    assert run.state is RunState.WAITING
    protocol.pipe_data_received(1, frame(EXIT, STATUS.pack(2)))
    pipes.unwatch(loop, run)
    assert (run.state, run.exit_code) == (RunState.EXITED, 2)


async def test_output_past_the_cap_ends_the_run(pipes: OutputPipes) -> None:
    loop = asyncio.get_running_loop()
    run = new_run()
    pipes.watch(loop, run)
    os.write(write_ends(pipes)[0], b"x" * (CAP + 1))
    await asyncio.wait_for(run.done, 5)
    pipes.unwatch(loop, run)
    assert run.state is RunState.OVER_CAP
    assert run.state.kills
    assert run.state.over_cap
    assert bytes(run.capture.stdout) == b"x" * CAP
    assert run.capture.stdout_truncated


async def test_a_status_whose_drain_passes_the_cap_is_over_cap(pipes: OutputPipes) -> None:
    loop = asyncio.get_running_loop()
    run = new_run()
    pipes.watch(loop, run)
    os.write(write_ends(pipes)[0], b"x" * (CAP + 1))
    run.answer(STATUS.pack(0))
    pipes.unwatch(loop, run)
    assert (run.state, run.exit_code) == (RunState.OVER_CAP, 0)


async def test_a_gone_runner_whose_output_passed_the_cap_is_both(pipes: OutputPipes) -> None:
    loop = asyncio.get_running_loop()
    protocol = ready_protocol()
    run = new_run(protocol)
    pipes.watch(loop, run)
    os.write(write_ends(pipes)[1], b"e" * (CAP + 1))
    protocol.pipe_connection_lost(1, None)
    pipes.unwatch(loop, run)
    assert run.state is RunState.RUNNER_GONE_OVER_CAP
    assert run.state.runner_gone
    assert run.state.over_cap
    assert run.state.kills


async def test_a_forged_status_stays_a_violation_when_its_drain_passes_the_cap(
    pipes: OutputPipes,
) -> None:
    loop = asyncio.get_running_loop()
    run = new_run()
    pipes.watch(loop, run)
    os.write(write_ends(pipes)[0], b"x" * (CAP + 1))
    run.answer(STATUS.pack(1000))
    pipes.unwatch(loop, run)
    assert run.state is RunState.VIOLATION
    assert run.capture.stdout_truncated  # the output is kept all the same


async def test_closing_the_write_ends_leaves_the_read_ends(pipes: OutputPipes) -> None:
    stdout_w, _, _ = write_ends(pipes)
    os.write(stdout_w, b"kept")
    pipes.close_write_ends()
    assert pipes.write_ends == ()
    assert os.read(pipes.stdout_r, 16) == b"kept"
    assert os.read(pipes.stdout_r, 16) == b""  # EOF: no writer is left


# --- a session's runs -------------------------------------------------------------------


def session_run(protocol: RunnerProtocol | None = None) -> Run:
    run = new_run(protocol)
    run.session = True
    return run


async def test_a_session_childs_death_before_it_took_the_run_is_not_its_status() -> None:
    # The runner's exit frame for a child that died between runs arrives while the
    # next run waits: nothing ran, whatever status the frame holds.
    protocol = ready_protocol()
    run = session_run(protocol)
    protocol.pipe_data_received(1, frame(EXIT, STATUS.pack(0)))
    await run.done
    assert run.state is RunState.NOT_TAKEN
    assert run.exit_code is None
    assert protocol.child_gone is True


async def test_a_session_child_that_took_the_run_answers_it(pipes: OutputPipes) -> None:
    loop = asyncio.get_running_loop()
    run = session_run()
    pipes.watch(loop, run)
    _, _, status_w = write_ends(pipes)
    os.write(status_w, frame(SESSION) + frame(EXIT, STATUS.pack(3)))
    await asyncio.wait_for(run.done, 5)
    pipes.unwatch(loop, run)
    assert (run.taken, run.state, run.exit_code) == (True, RunState.EXITED, 3)


async def test_session_on_a_single_use_runs_status_pipe_is_a_violation(
    pipes: OutputPipes,
) -> None:
    loop = asyncio.get_running_loop()
    run = new_run()
    pipes.watch(loop, run)
    _, _, status_w = write_ends(pipes)
    os.write(status_w, frame(SESSION) + frame(EXIT, STATUS.pack(0)))
    await asyncio.wait_for(run.done, 5)
    pipes.unwatch(loop, run)
    assert run.state is RunState.VIOLATION


async def test_a_childs_death_between_a_sessions_runs_is_reported() -> None:
    protocol = ready_protocol()
    deaths: list[None] = []
    protocol.on_idle_death = lambda: deaths.append(None)
    protocol.pipe_data_received(1, frame(EXIT, STATUS.pack(3)))  # no run in flight
    assert (deaths, protocol.child_gone) == ([None], True)
