"""The one interface every sandbox backend implements, and the values it passes.

A backend starts sandboxes ahead of demand, hands one request to a started
sandbox, and destroys it. The pool manager only ever talks to this Protocol, so
it knows nothing of Docker, bubblewrap or wasmtime.
"""

from __future__ import annotations

import enum
import itertools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Generic, Literal, Protocol, TypeVar

from pool.backends.runtime import Runtime
from pool.config import PoolConfig
from pool.wire import GuestRequest, Outcome, OutcomeLimits, OutputCapture

# A run still going this long after its request is busy, in every tier: its
# sandbox then takes only CPU that short runs, starts and the daemon leave
# (wasm: the guest's thread in SCHED_IDLE; process and fork: cpu.idle on the
# sandbox's and, while the pool runs nothing else, the pool's cgroup; Docker:
# the container's CPU shares at their least, after 5 x this, as that costs a
# `runc update`). A short run meets none of it.
BUSY_AFTER_S = 0.1


@dataclass(frozen=True, slots=True)
class RunRequest:
    code: str
    stdin: str
    timeout_s: float
    # Validated by the API (api/schema.py): relative paths under the working directory.
    files: tuple[tuple[str, bytes], ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    argv: tuple[str, ...] = ()
    # Called with (kind, bytes) as the capture keeps output (OutputCapture's
    # listener): how a streamed response sees a run's output as it comes.
    output_listener: Callable[[bytes, bytes], None] | None = field(
        default=None, compare=False, repr=False
    )
    # Called once a sandbox has the request, just before it is sent to it: from
    # then on the code may run (the API answers a drain's cut differently).
    on_start: Callable[[], None] | None = field(default=None, compare=False, repr=False)
    # A session's run (pool/sessions.py): the sandbox is leased, the code runs
    # in the session's __main__ and the sandbox takes further requests.
    session: bool = False

    def to_guest(self, limits: OutcomeLimits) -> GuestRequest:
        """What the guest is sent; ``limits`` are the pool's (outcome_limits)."""
        return GuestRequest(
            self.code, self.stdin, list(self.files), dict(self.env), list(self.argv), limits,
            self.session,
        )


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
    # Files under out/, rich results and the uncaught error: the program's
    # claims, kept within the pool's limits (None: the tier returned none).
    outcome: Outcome | None = None

    @classmethod
    def from_capture(
        cls,
        capture: OutputCapture,
        *,
        exit_code: int | None,
        timed_out: bool,
        oom_killed: bool,
        execution_s: float,
        outcome: Outcome | None = None,
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
            outcome=outcome,
        )


_sequence = itertools.count(1)


def new_sandbox_id() -> str:
    """A sandbox id unique for this host's lifetime: pid-prefixed, never reused."""
    return f"{os.getpid():x}-{next(_sequence):06x}-{os.urandom(3).hex()}"


class SandboxState(enum.Enum):
    """Where a started sandbox is in its single life. Only forward moves (``Sandbox._move``).

    IDLE -> BUSY -> DESTROYED is a normal life; a sandbox that dies by itself
    goes to DEAD (from IDLE: the pool is told, "died"; from BUSY: its run
    reports it) and is destroyed afterwards. DESTROYED is final. A session's
    sandbox goes IDLE -> LEASED instead, takes any number of requests there,
    and is destroyed at the session's end; one that dies while LEASED is
    reported as an idle one is, between runs or not.
    """

    IDLE = "idle"  # ready and parked: may be handed out
    BUSY = "busy"  # took its one request
    LEASED = "leased"  # a session's: takes its requests, one at a time
    DEAD = "dead"  # died by itself; never handed out
    DESTROYED = "destroyed"  # the backend released it


_FORWARD = {
    SandboxState.IDLE: {
        SandboxState.BUSY, SandboxState.LEASED, SandboxState.DEAD, SandboxState.DESTROYED
    },
    SandboxState.BUSY: {SandboxState.DEAD, SandboxState.DESTROYED},
    SandboxState.LEASED: {SandboxState.DEAD, SandboxState.DESTROYED},
    SandboxState.DEAD: {SandboxState.DESTROYED},
    SandboxState.DESTROYED: set(),
}


class Sandbox:
    """One started sandbox. Backends subclass it to keep their handles.

    A backend makes it once the sandbox reported ready (state IDLE) and
    moves it with ``take_request``, ``mark_dead`` and ``mark_destroyed``.
    """

    def __init__(self, sandbox_id: str) -> None:
        self.id = sandbox_id
        self.state = SandboxState.IDLE

    @property
    def alive(self) -> bool:
        """The pool hands out only a sandbox that is alive."""
        return self.state in (SandboxState.IDLE, SandboxState.BUSY, SandboxState.LEASED)

    def _move(self, to: SandboxState) -> bool:
        """Go to ``to`` if that is forward from here; False (and no change) otherwise."""
        if to not in _FORWARD[self.state]:
            return False
        self.state = to
        return True

    def lease(self) -> bool:
        """IDLE -> LEASED: it becomes one session's; False if it is no longer idle."""
        return self._move(SandboxState.LEASED)

    def take_request(self) -> bool:
        """IDLE -> BUSY; False if it is no longer idle (dead or destroyed: the pool retries).

        A LEASED sandbox takes each of its session's requests and stays LEASED.
        """
        if self.state is SandboxState.LEASED:
            return True
        return self._move(SandboxState.BUSY)

    @property
    def waiting(self) -> bool:
        """Between requests: idle in its pool, or leased to a session."""
        return self.state in (SandboxState.IDLE, SandboxState.LEASED)

    def mark_dead(self) -> bool:
        """It died by itself; True if it was idle or leased, so the pool must be told."""
        was_waiting = self.waiting
        return self._move(SandboxState.DEAD) and was_waiting

    def mark_destroyed(self) -> bool:
        """True the first time: the caller releases what the sandbox holds, once."""
        return self._move(SandboxState.DESTROYED)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.state.value}>"


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

    def requests_waiting(self, waiting: bool) -> None:
        """The pool says whether one of its requests waits for a sandbox now
        (called on each change). A start is then wanted now, not only a refill."""

    async def ping(self) -> bool:
        """True if the backend answers now (for /readyz)."""
        ...

    def version(self) -> str:
        """The backend's version string, for sandpool_build_info."""
        ...

    def runtime(self) -> Runtime:
        """What runs in the sandboxes (language version, key packages); known after start."""
        ...


SandboxEvent = Literal["died", "oom"]
EventListener = Callable[[Sandbox, SandboxEvent], None]


class BackendBase(Generic[SandboxT]):
    """What every backend shares: its pool's config and daemon instance, the
    pool's listener and the reports it gets."""

    name: str

    def __init__(self, config: PoolConfig, instance_id: str) -> None:
        self.config = config
        self.instance_id = instance_id  # labels and names what this daemon made
        self.listener: EventListener | None = None

    def requests_waiting(self, waiting: bool) -> None:
        """Nothing by default: only a pool's CPU standing (process/cpu.py) uses it."""

    def report_died(self, sandbox: SandboxT) -> None:
        """The sandbox died by itself: tell the pool if it was parked (a run reports its own)."""
        if sandbox.mark_dead() and self.listener is not None:
            self.listener(sandbox, "died")

    def report_oom(self, sandbox: SandboxT) -> None:
        """The kernel OOM-killed inside the sandbox, outside or after its run's verdict."""
        if self.listener is not None:
            self.listener(sandbox, "oom")
