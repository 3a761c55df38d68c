"""The one interface every sandbox backend implements, and the values it passes.

A backend starts sandboxes ahead of demand, hands one request to a started
sandbox, and destroys it. The pool manager only ever talks to this Protocol, so
it knows nothing of Docker, bubblewrap or wasmtime.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

from pool.wire import OutputCapture


@dataclass(frozen=True, slots=True)
class RunRequest:
    code: str
    stdin: str
    timeout_s: float


@dataclass(frozen=True, slots=True)
class RunResult:
    """What happened to one request. Every verdict comes from the daemon, not the sandbox."""

    exit_code: int | None  # None when the daemon killed the sandbox (timeout, output cap)
    stdout: bytes
    stderr: bytes
    timed_out: bool
    oom_killed: bool
    stdout_truncated: bool
    stderr_truncated: bool
    execution_s: float

    @classmethod
    def from_capture(
        cls,
        capture: OutputCapture,
        *,
        exit_code: int | None,
        timed_out: bool,
        oom_killed: bool,
        execution_s: float,
    ) -> RunResult:
        return cls(
            exit_code=exit_code,
            stdout=bytes(capture.stdout),
            stderr=bytes(capture.stderr),
            timed_out=timed_out,
            oom_killed=oom_killed,
            stdout_truncated=capture.stdout_truncated,
            stderr_truncated=capture.stderr_truncated,
            execution_s=execution_s,
        )


_sequence = itertools.count(1)


def new_sandbox_id() -> str:
    """A sandbox id unique for this host's lifetime: pid-prefixed, never reused."""
    return f"{os.getpid():x}-{next(_sequence):06x}-{os.urandom(3).hex()}"


class Sandbox:
    """One started sandbox. Backends subclass it to keep their handles."""

    def __init__(self, sandbox_id: str) -> None:
        self.id = sandbox_id
        # Cleared by the backend when it learns the sandbox died while idle; the
        # pool never hands out a sandbox that is not alive.
        self.alive = True

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} alive={self.alive}>"


SandboxT = TypeVar("SandboxT", bound=Sandbox)


class Backend(Protocol[SandboxT]):
    """Starts, runs and destroys sandboxes of one pool. Every method has a bounded duration."""

    name: str
    # Set by the pool: called when the backend learns, outside a run, that a
    # sandbox died ("died") or that the kernel OOM-killed in it ("oom").
    listener: EventListener | None

    async def start(self) -> None:
        """Connect and check prerequisites (image present, binary installed).

        Raises BackendError with a line that says what to do.
        """

    async def close(self) -> None:
        """Release connections; sandboxes are destroyed by the pool before this."""

    async def start_sandbox(self) -> SandboxT:
        """Start one sandbox and wait until its runner reports ready.

        Raises BackendError; on failure or cancellation nothing is left behind.
        """
        ...

    async def run(self, sandbox: SandboxT, request: RunRequest) -> RunResult:
        """Hand the request to the sandbox and wait for its result.

        Enforces ``request.timeout_s`` and the output cap by killing the
        sandbox. Raises SandboxLostError if the sandbox was dead before it took
        the request (the pool retries), BackendError for other failures.
        """
        ...

    async def destroy_sandbox(self, sandbox: SandboxT) -> None:
        """Kill the sandbox and release everything it holds. Idempotent."""

    async def ping(self) -> bool:
        """True if the backend answers now (for /readyz)."""
        ...

    def version(self) -> str:
        """The backend's version string, for sandpool_build_info."""
        ...


SandboxEvent = Literal["died", "oom"]
EventListener = Callable[[Sandbox, SandboxEvent], None]
