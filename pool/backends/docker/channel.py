"""The runner's channel in one container: the request written, frames read back.

The container runs the runner as its main process with stdin open and no TTY
(``definition.py``), attached before it starts. dockerd multiplexes the
container's stdout (stream 1) and stderr (stream 2) on the attached stream;
the runner speaks the wire (``pool/wire.py``) on its stdout: one ready frame,
then, after the one request it reads from stdin, output and exit frames.
Its stderr carries nothing unless the runner itself crashed.

The channel needs only ``read_out``/``write_in``/``close`` of the stream, so
its tests feed it bytes without a daemon.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from typing import Protocol

import aiohttp
import structlog

from pool.backends.base import RunRequest
from pool.errors import BackendError, SandboxLostError
from pool.protocol import FrameDecoder, ProtocolViolation, decode_exit
from pool.wire import (
    EXIT,
    GONE,
    OUTCOME_KINDS,
    READY,
    Outcome,
    OutcomeLimits,
    OutputCapture,
    WireError,
)

log = structlog.get_logger("sandpool.docker")

STDOUT_STREAM = 1  # dockerd's number for the container's stdout on an attached stream


class StreamMessage(Protocol):
    """One chunk of an attached stream (``aiodocker.stream.Message``)."""

    @property
    def stream(self) -> int: ...

    @property
    def data(self) -> bytes: ...


class AttachedStream(Protocol):
    """What the channel uses of ``aiodocker.stream.Stream``."""

    async def read_out(self) -> StreamMessage | None: ...

    async def write_in(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


class RunEnd(enum.Enum):
    """How the reading of one run's result stopped."""

    EXITED = "exited"  # the runner's exit frame came: its status is the verdict
    OUTPUT_CAPPED = "output_capped"  # a stream passed its cap: the pool destroys the sandbox
    STREAM_ENDED = "stream_ended"  # the runner died without its exit frame (OOM kill, crash)
    TIMED_OUT = "timed_out"  # the request's timeout passed first
    # A session's child had ended before it took this request (GONE before any
    # EXIT): nothing ran, and the session takes no further request.
    NOT_TAKEN = "not_taken"
    # Garbage on the channel: the sandbox is not trustworthy any more; what
    # was captured is reported and the pool destroys it.
    PROTOCOL_VIOLATION = "protocol_violation"


class RunnerChannel:
    """The wire spoken to one container's runner over its attached stream."""

    def __init__(self, stream: AttachedStream, sandbox_id: str) -> None:
        self.stream = stream
        self.sandbox_id = sandbox_id
        self._decoder = FrameDecoder()
        self._pending: deque[tuple[bytes, bytes]] = deque()  # decoded, not yet taken
        # The relay said GONE: a session's child has ended, no request is taken any more.
        self.child_gone = False

    async def next_frame(self) -> tuple[bytes, bytes] | None:
        """The next runner frame; None once the stream ends. Raises ProtocolViolation."""
        while not self._pending:
            message = await self.stream.read_out()
            if message is None:
                return None
            if message.stream != STDOUT_STREAM:
                # The runner's own stderr: only a crashed runner writes there.
                log.debug("runner_stderr", sandbox=self.sandbox_id, size=len(message.data))
                continue
            self._pending.extend(self._decoder.feed(message.data))
        return self._pending.popleft()

    async def wait_ready(self) -> None:
        """Wait for the runner's ready frame.

        Raises BackendError if the stream ends first, ProtocolViolation if
        anything else comes first.
        """
        frame = await self.next_frame()
        if frame is None:
            raise BackendError(
                "the container exited before its runner was ready (is python3 in the image?)"
            )
        if frame[0] != READY:
            raise ProtocolViolation("the runner sent output before it was ready")

    async def send_request(self, request: RunRequest, limits: OutcomeLimits) -> None:
        """Write the one request. Raises SandboxLostError if the stream no longer takes it."""
        try:
            await self.stream.write_in(request.to_guest(limits).encode())
        except (RuntimeError, ConnectionError, aiohttp.ClientError) as e:
            raise SandboxLostError(
                f"sandbox {self.sandbox_id} did not take its request: {e}"
            ) from None

    async def collect(
        self, capture: OutputCapture, outcome: Outcome, timeout_s: float
    ) -> tuple[RunEnd, int | None]:
        """Read output frames into ``capture`` and outcome frames into ``outcome``
        until the run ends; how it ended and its status.

        The status is the runner's, and only with ``RunEnd.EXITED``. Errors of
        the stream itself (the Docker connection) propagate.
        """
        try:
            async with asyncio.timeout(timeout_s):
                while (frame := await self.next_frame()) is not None:
                    kind, payload = frame
                    if kind == EXIT:
                        # GONE, if it follows, came in the same write: the
                        # session ends with this run.
                        if self._pending and self._pending[0][0] == GONE:
                            self._pending.popleft()
                            self.child_gone = True
                        return RunEnd.EXITED, decode_exit(payload)
                    if kind == GONE:
                        self.child_gone = True
                        return RunEnd.NOT_TAKEN, None
                    if kind in OUTCOME_KINDS:
                        outcome.add(kind, payload)
                    elif kind != READY and not capture.add(kind, payload):
                        return RunEnd.OUTPUT_CAPPED, None
                return RunEnd.STREAM_ENDED, None
        except TimeoutError:
            return RunEnd.TIMED_OUT, None
        except (ProtocolViolation, WireError):
            log.warning("sandbox_protocol_violation", sandbox=self.sandbox_id)
            return RunEnd.PROTOCOL_VIOLATION, None

    async def close(self) -> None:
        await self.stream.close()
