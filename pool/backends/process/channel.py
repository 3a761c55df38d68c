"""The channel to one process sandbox, from the bytes it sends to one run's verdicts.

The runner speaks in its direct mode (``pool/wire.py``): on bwrap's stdout
only its ready frame and, if the code dies without reporting, an exit frame;
the code's stdout and stderr come back raw on two pipes of the sandbox's own,
and its outcome frames and exit frame on a third, the status pipe.
``RunnerProtocol`` reads the former as asyncio delivers it, ``OutputPipes``
the latter on the event loop, and both move one ``Run``
through its ``RunState``. Nothing here starts or kills a process: the tests
feed it bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass

from pool.errors import BackendError
from pool.pipes import PipeReader, read_nonblocking
from pool.protocol import FrameDecoder, ProtocolViolation, decode_exit
from pool.wire import (
    CHUNK,
    DRAIN_READS,
    EXIT,
    OUTCOME_KINDS,
    READY,
    SESSION,
    Outcome,
    OutputCapture,
    WireError,
)

# Chunks of the status pipe read per wake-up: the outcome (files, figures) may
# be megabytes, and the loop must get back to other sandboxes in between.
STATUS_READS = 16


class RunState(enum.Enum):
    """Where one request is. WAITING and REFUSED wait; any other state has ended the run.

    The first cause ends it, with one exception: the output the code left
    when it ended is drained first, and passing the cap there is the verdict
    (OVER_CAP, or RUNNER_GONE_OVER_CAP when the runner is gone as well).
    """

    WAITING = "waiting"  # the request is written; nothing decisive came back yet
    REFUSED = "refused"  # writing the request failed (the runner's stdin is gone): still waiting
    EXITED = "exited"  # a status or an exit frame came back
    OVER_CAP = "over_cap"  # stdout or stderr passed max_output_bytes
    VIOLATION = "violation"  # a forged status, or bytes the runner may not send
    RUNNER_GONE = "runner_gone"  # the runner's stdout closed before an exit frame
    RUNNER_GONE_OVER_CAP = "runner_gone_over_cap"  # ... and its output had passed the cap
    NOT_TAKEN = "not_taken"  # RUNNER_GONE, the request was never written, nothing came back

    @property
    def waiting(self) -> bool:
        return self in (RunState.WAITING, RunState.REFUSED)

    @property
    def over_cap(self) -> bool:
        """The daemon cut the run at the output cap: no exit code."""
        return self in (RunState.OVER_CAP, RunState.RUNNER_GONE_OVER_CAP)

    @property
    def kills(self) -> bool:
        """The daemon kills the sandbox now, not at destroy: the code may be burning CPU."""
        return self.over_cap or self is RunState.VIOLATION

    @property
    def runner_gone(self) -> bool:
        """The exit status is bwrap's, and the OOM counter may lag behind it."""
        return self in (RunState.RUNNER_GONE, RunState.RUNNER_GONE_OVER_CAP, RunState.NOT_TAKEN)


_GONE_OVER_CAP = {
    RunState.RUNNER_GONE: RunState.RUNNER_GONE_OVER_CAP,
    RunState.NOT_TAKEN: RunState.RUNNER_GONE_OVER_CAP,  # output came: it was taken
}


@dataclass(slots=True, eq=False)
class Run:
    """One request in flight; the protocol's and the pipes' callbacks move its state."""

    capture: OutputCapture
    done: asyncio.Future[None]  # set when the state leaves WAITING and REFUSED
    outcome: Outcome | None = None  # files, results and error, from the status pipe
    output: PipeReader | None = None  # the code's stdout and stderr, once watched
    exit_code: int | None = None  # the last valid status that came back
    state: RunState = RunState.WAITING
    session: bool = False  # a session's run: the child says SESSION as it takes it
    taken: bool = False  # ... and has said it

    def answer(self, payload: bytes) -> None:
        """A status came back (status pipe or exit frame): the code has ended.

        A forged one (pool.wire.decode_exit refuses it) gives no exit code and
        ends the run as a VIOLATION, so the sandbox is killed.
        """
        if self.session and not self.taken:
            # A session's child that ended before it took this request: its
            # status is not this run's.
            self.finish(RunState.NOT_TAKEN)
            return
        if self.state is RunState.NOT_TAKEN:
            self.state = RunState.RUNNER_GONE  # it was taken after all
        try:
            self.exit_code = decode_exit(payload)
        except ProtocolViolation:
            self.finish(RunState.VIOLATION)
            return
        self.finish(RunState.EXITED)

    def refuse(self) -> None:
        """Writing the request failed: the runner was gone before it took it."""
        if self.state is RunState.WAITING:
            self.state = RunState.REFUSED
        elif self.state is RunState.RUNNER_GONE:
            self.state = RunState.NOT_TAKEN

    def runner_gone(self) -> None:
        """The runner's stdout closed before an exit frame."""
        self.finish(RunState.NOT_TAKEN if self.state is RunState.REFUSED else RunState.RUNNER_GONE)

    def violation(self) -> None:
        """Bytes on the runner's channel that it may not send: nothing after them is trusted."""
        self._end(RunState.VIOLATION)

    def stop_at_cap(self) -> None:
        self._end(RunState.OVER_CAP)

    def finish(self, cause: RunState) -> None:
        """The run ends for ``cause``: take what the code wrote before, then the verdict."""
        if not self.state.waiting:
            return
        if cause is RunState.VIOLATION:
            self._end(cause)  # the drain below keeps the output; it decides nothing
        if self.output is not None:
            self.output.drain(DRAIN_READS)
        if self.state is RunState.OVER_CAP and cause in _GONE_OVER_CAP:
            self.state = _GONE_OVER_CAP[cause]
        self._end(cause)

    def _end(self, state: RunState) -> None:
        if self.state.waiting:
            self.state = state
            # Cancelled already when the request awaiting it was (its client left).
            if not self.done.done():
                self.done.set_result(None)


class OutputPipes:
    """A sandbox's stdout, stderr and status pipes (the runner's direct mode): read ends here."""

    def __init__(self) -> None:
        self.status_frames = FrameDecoder()  # the code's outcome, then its exit frame
        self.stdout_r, stdout_w = os.pipe()
        self.stderr_r, stderr_w = os.pipe()
        self.status_r, status_w = os.pipe()
        self.write_ends: tuple[int, ...] = (stdout_w, stderr_w, status_w)
        for fd in (self.stdout_r, self.stderr_r, self.status_r):
            os.set_blocking(fd, False)

    def close_write_ends(self) -> None:
        for fd in self.write_ends:
            os.close(fd)
        self.write_ends = ()

    def watch(self, loop: asyncio.AbstractEventLoop, run: Run) -> None:
        run.output = PipeReader(loop, self.stdout_r, self.stderr_r, run.capture, run.stop_at_cap)
        loop.add_reader(self.status_r, self._on_status, loop, run)

    def unwatch(self, loop: asyncio.AbstractEventLoop, run: Run) -> None:
        if run.output is not None:
            run.output.stop()
        loop.remove_reader(self.status_r)

    def _on_status(self, loop: asyncio.AbstractEventLoop, run: Run) -> None:
        """Outcome frames into the run's outcome until the exit frame (its status).

        The code can write here too: a frame the wire refuses ends the run as a
        VIOLATION; the pipe closing first leaves the status to the runner.
        """
        for _ in range(STATUS_READS):
            data = read_nonblocking(self.status_r, CHUNK)
            if data is None:
                return
            if not data:
                loop.remove_reader(self.status_r)
                return
            try:
                for kind, payload in self.status_frames.feed(data):
                    if kind == EXIT:
                        loop.remove_reader(self.status_r)
                        run.answer(payload)
                        return
                    if kind == SESSION and run.session and not run.taken and not payload:
                        run.taken = True
                        continue
                    if kind not in OUTCOME_KINDS or run.outcome is None:
                        raise WireError(f"unexpected frame {kind!r} on the status pipe")
                    run.outcome.add(kind, payload)
            except (ProtocolViolation, WireError):
                loop.remove_reader(self.status_r)
                run.finish(RunState.VIOLATION)
                return

    def close(self) -> None:
        for fd in (*self.write_ends, self.stdout_r, self.stderr_r, self.status_r):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.write_ends = ()


class RunnerProtocol(asyncio.SubprocessProtocol):
    """Reads runner frames from bwrap's stdout as they arrive; no task per sandbox."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.decoder = FrameDecoder()
        self.ready: asyncio.Future[None] = loop.create_future()
        # A start cancelled before it awaited readiness never reads the failure.
        self.ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.exited: asyncio.Future[int] = loop.create_future()
        self.transport: asyncio.SubprocessTransport | None = None
        self.run: Run | None = None
        self.on_idle_death: Callable[[], None] | None = None
        # The runner's EXIT frame says the child (the code's process) has ended:
        # a session's sandbox takes no further request.
        self.child_gone = False
        self._broken = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.SubprocessTransport)
        self.transport = transport

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        if fd != 1 or self._broken:
            return
        try:
            frames = self.decoder.feed(bytes(data) if isinstance(data, bytes) else data.encode())
        except ProtocolViolation as e:
            # Garbage on the runner's channel: nothing after it can be trusted.
            self._broken = True
            self._fail(e)
            return
        for kind, payload in frames:
            self._on_frame(kind, payload)

    def _on_frame(self, kind: bytes, payload: bytes) -> None:
        if not self.ready.done():
            if kind == READY:
                self.ready.set_result(None)
            else:
                self._broken = True
                self.ready.set_exception(
                    ProtocolViolation("the runner sent output before it was ready")
                )
            return
        run = self.run
        if kind == EXIT:
            self.child_gone = True
            if run is None and self.on_idle_death is not None:
                self.on_idle_death()  # between a session's runs, or idle before the first
        if run is None or not run.state.waiting:
            return  # after the status, or while parked: nothing the verdict needs
        if kind == EXIT:
            run.answer(payload)
        else:  # the runner's direct mode sends nothing else after its ready frame
            self._fail(ProtocolViolation(f"unexpected frame {kind!r} from the runner"))

    def _fail(self, error: ProtocolViolation) -> None:
        if not self.ready.done():
            self.ready.set_exception(error)
        elif self.run is not None:
            self.run.violation()

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        run = self.run
        if fd == 0 and exc is not None and run is not None:
            run.refuse()
        if fd != 1:
            return
        if not self.ready.done():
            self.ready.set_exception(BackendError("the sandbox exited before its runner was ready"))
        elif run is not None and run.state.waiting:
            run.runner_gone()
        elif run is None and self.on_idle_death is not None:
            self.on_idle_death()

    def process_exited(self) -> None:
        returncode = self.transport.get_returncode() if self.transport is not None else None
        self.exited_with(returncode if returncode is not None else -signal.SIGKILL)

    def exited_with(self, returncode: int) -> None:
        """The sandbox's first process is gone: bwrap here, or as the fork tier's template
        reports it (``returncode`` as subprocess gives it: minus N for signal N)."""
        if not self.exited.done():
            self.exited.set_result(returncode)
        if not self.ready.done():
            self.ready.set_exception(BackendError("the sandbox exited before its runner was ready"))
        if self.run is None and self.on_idle_death is not None:
            self.on_idle_death()
