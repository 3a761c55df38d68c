"""The wire between the event loop and one guest: three pipes, and what ends a run.

The guest's stdin, stdout and stderr are pipes; the loop keeps one end of
each, non-blocking, and the worker hands the others to wasmtime. The guest
runner writes the ready frame on stdout once warm (``ReadyFrame``), then
blocks reading its stdin. A request is written on that pipe and the host then
closes its end, so the guest's stdin ends where the request's data ends
(``GuestChannel.send``). stdout and stderr count against the output cap as
Docker's attach stream does; past the cap they are drained and discarded, so
the guest never blocks on a full pipe while it is being stopped. How
``_start`` returned (``GuestExit``) and the status file decide the exit code
(``exit_code``).

Nothing here imports wasmtime: the tests feed it bytes and outcomes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from pool.errors import BackendError
from pool.pipes import PipeReader, read_nonblocking
from pool.wire import READY_FRAME, WASI_MAX_STATUS, OutputCapture

log = structlog.get_logger("sandpool.wasm")

TRAP_EXIT_CODE = 128 + 6  # a wasm trap (abort, stack overflow): reported like SIGABRT


@dataclass(frozen=True, slots=True)
class GuestExit:
    """How ``_start`` returned: a WASI exit status, or a trap's first line."""

    status: int | None
    trap: str | None = None

    def describe(self) -> str:
        return self.trap or f"exit status {self.status}"


class Handshake(enum.Enum):
    WAITING = "waiting"  # a prefix of the ready frame so far
    READY = "ready"  # the whole frame, nothing else
    FAILED = "failed"  # other bytes, or EOF before the frame ended


class ReadyFrame:
    """The guest runner's ready frame, fed as the guest's stdout delivers it.

    Invariant: never asks for more than the rest of the frame (``missing``),
    so no byte after it (the request's output) is taken from the pipe here.
    """

    def __init__(self) -> None:
        self._received = bytearray()
        self.state = Handshake.WAITING

    @property
    def missing(self) -> int:
        return len(READY_FRAME) - len(self._received)

    def feed(self, data: bytes) -> Handshake:
        """Add what the pipe gave (``b""`` is EOF); returns the new state."""
        if self.state is not Handshake.WAITING:
            return self.state
        self._received.extend(data)
        if not data or not READY_FRAME.startswith(self._received):
            self.state = Handshake.FAILED
        elif not self.missing:
            self.state = Handshake.READY
        return self.state


def open_pipes() -> tuple[GuestChannel, tuple[int, int, int]]:
    """A channel over three new pipes, and the guest's ends (stdin, stdout, stderr).

    The caller hands the guest's ends to the worker, which closes them once
    wasmtime has opened its own (by /proc path: a pipe has no name).
    """
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    stderr_r, stderr_w = os.pipe()
    return GuestChannel(stdin_w, stdout_r, stderr_r), (stdin_r, stdout_w, stderr_w)


class GuestChannel:
    """The event loop's ends of one guest's pipes. Owned by the loop's thread.

    ``stdin_w`` is -1 once closed (the guest then reads EOF); ``stdout_r`` and
    ``stderr_r`` are -1 once ``close`` ran.
    """

    def __init__(self, stdin_w: int, stdout_r: int, stderr_r: int) -> None:
        self.stdin_w, self.stdout_r, self.stderr_r = stdin_w, stdout_r, stderr_r
        for fd in (stdin_w, stdout_r, stderr_r):
            os.set_blocking(fd, False)
        self._writer_pending = False

    def await_ready(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """Read the ready frame from stdout; the future fails with BackendError on other bytes.

        Stops reading once decided; ``stop_awaiting_ready`` stops it earlier.
        """
        ready: asyncio.Future[None] = loop.create_future()
        frame = ReadyFrame()

        def on_ready_bytes() -> None:
            data = read_nonblocking(self.stdout_r, frame.missing)
            if data is None:
                return
            state = frame.feed(data)
            if state is Handshake.WAITING:
                return
            loop.remove_reader(self.stdout_r)
            if ready.done():
                return
            if state is Handshake.READY:
                ready.set_result(None)
            else:
                ready.set_exception(BackendError("the guest runner did not report ready"))

        loop.add_reader(self.stdout_r, on_ready_bytes)
        return ready

    def stop_awaiting_ready(self, loop: asyncio.AbstractEventLoop) -> None:
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(self.stdout_r)

    def send(self, payload: bytes) -> None:
        """Write the request without blocking the loop; the rest goes out as the guest reads.

        Closes the loop's end once everything is written, so the guest sees EOF
        after its stdin data. Raises OSError if the guest is gone.
        """
        view = memoryview(payload)
        written = _write_nonblocking(self.stdin_w, view)
        if written == len(view):
            self.close_stdin()
            return
        rest = view[written:]

        def on_writable() -> None:
            nonlocal rest
            try:
                written = _write_nonblocking(self.stdin_w, rest)
            except OSError:  # the guest ended without reading its stdin: fine
                written = len(rest)
            rest = rest[written:]
            if not rest:
                self.close_stdin()

        self._writer_pending = True
        asyncio.get_running_loop().add_writer(self.stdin_w, on_writable)

    def close_stdin(self) -> None:
        """On the loop: the guest reads EOF (a parked one then ends). Idempotent."""
        if self.stdin_w < 0:
            return
        if self._writer_pending:
            asyncio.get_running_loop().remove_writer(self.stdin_w)
            self._writer_pending = False
        os.close(self.stdin_w)
        self.stdin_w = -1

    def close_stdin_at_exit(self) -> None:
        """At interpreter exit, when no event loop runs any more and this thread owns the fd."""
        if self.stdin_w >= 0:
            os.close(self.stdin_w)
            self.stdin_w = -1

    def output(
        self,
        loop: asyncio.AbstractEventLoop,
        capture: OutputCapture,
        on_over_cap: Callable[[], None],
    ) -> PipeReader:
        """Read stdout and stderr into ``capture`` until the reader is stopped."""
        return PipeReader(loop, self.stdout_r, self.stderr_r, capture, on_over_cap)

    def close(self) -> None:
        """Close the output pipes' ends (stdin's is closed by ``close_stdin``). Idempotent."""
        for fd in (self.stdout_r, self.stderr_r):
            if fd >= 0:
                os.close(fd)
        self.stdout_r = self.stderr_r = -1


def exit_code(
    outcome: GuestExit, read_status: Callable[[], bytes] | None, *, sandbox_id: str
) -> int:
    """The exit code of a guest that ended by itself.

    A trap is TRAP_EXIT_CODE. WASI caps exit statuses at WASI_MAX_STATUS, so
    at that status the runner's status file (``read_status``; None if the
    sandbox has none) may claim a larger one below 256; anything unreadable
    or out of range leaves WASI_MAX_STATUS.
    """
    if outcome.status is None:
        log.info("wasm_guest_trapped", sandbox=sandbox_id, trap=outcome.trap)
        return TRAP_EXIT_CODE
    if outcome.status != WASI_MAX_STATUS:
        return outcome.status
    if read_status is None:
        return WASI_MAX_STATUS
    with contextlib.suppress(OSError, ValueError):
        # At most 16 bytes from a tmpfs or a local disk: not worth a thread.
        claimed = int(read_status())
        if WASI_MAX_STATUS < claimed < 256:
            return claimed
    return WASI_MAX_STATUS


def _write_nonblocking(fd: int, data: memoryview) -> int:
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0
