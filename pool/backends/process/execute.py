"""One request in a direct-mode runner, from the request frame to the verdicts.

Shared by the tiers whose sandboxes run the runner in direct mode (the process
tier's bwrap trees and the fork tier's children): a request is one frame on
the runner's stdin; stdout, stderr and the status come back on the sandbox's
own pipes (``channel.py``). The timeout and the output cap are enforced by
killing the sandbox; the OOM verdict is its cgroup's counter, never the code's
claim.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

import structlog

from pool.backends.base import RunRequest, RunResult
from pool.backends.process.cgroups import SandboxCgroup
from pool.backends.process.channel import OutputPipes, Run, RunnerProtocol, RunState
from pool.config import PoolConfig
from pool.errors import SandboxLostError
from pool.wire import Outcome, OutputCapture

log = structlog.get_logger("sandpool.process")

EXIT_TIMEOUT_S = 5.0  # the runner's death to its exit status: far above a normal reap
# The OOM killer counts its kill before the victim dies, so the counter is
# normally current when the exit frame arrives; allow a little slack.
OOM_COUNTER_GRACE_S = 0.05


class DirectSandbox(Protocol):
    """What a run needs of a sandbox whose runner is in direct mode."""

    @property
    def id(self) -> str: ...

    @property
    def protocol(self) -> RunnerProtocol: ...

    @property
    def pipes(self) -> OutputPipes: ...

    @property
    def cgroup(self) -> SandboxCgroup | None: ...

    def stdin(self) -> asyncio.BaseTransport | None:
        """The write end of the runner's request channel."""

    @property
    def waiting(self) -> bool: ...

    def take_request(self) -> bool: ...

    def kill(self) -> None: ...

    def read_stderr(self) -> str: ...


S = TypeVar("S", bound=DirectSandbox)


async def run_direct(
    sandbox: S, request: RunRequest, config: PoolConfig, report_oom: Callable[[S], None],
    killed_outside: Callable[[], bool] | None = None,
) -> RunResult:
    """Run ``request`` in ``sandbox``; raises SandboxLostError if it never took it.

    ``killed_outside``: whether something other than the request killed the
    sandbox (the fork tier: its template died); a run whose runner then died
    without a word of output counts as lost, not as the code's exit 137.
    """
    protocol = sandbox.protocol
    stdin = sandbox.stdin()
    if (
        protocol.exited.done()
        or protocol.child_gone
        or not isinstance(stdin, asyncio.WriteTransport)
        or stdin.is_closing()
        or not sandbox.take_request()
    ):
        raise SandboxLostError(f"sandbox {sandbox.id} died while idle")
    loop = asyncio.get_running_loop()
    began = time.monotonic()
    limits = config.outcome_limits()
    capture = OutputCapture(config.max_output_bytes, request.output_listener)
    run = Run(capture, loop.create_future(), Outcome(limits), session=request.session)
    protocol.run = run
    sandbox.pipes.watch(loop, run)
    stdin.write(request.to_guest(limits).encode())
    timed_out = False
    try:
        async with asyncio.timeout(request.timeout_s):
            await run.done
    except TimeoutError:
        timed_out = True
    finally:
        sandbox.pipes.unwatch(loop, run)
    execution_s = time.monotonic() - began
    state = run.state
    if timed_out or state.kills:
        sandbox.kill()  # now, not at destroy: the code may be burning CPU
    if state is RunState.VIOLATION:
        log.warning("sandbox_protocol_violation", sandbox=sandbox.id)
    exit_code = run.exit_code
    if state.runner_gone:
        silent = not (run.output and run.output.received)
        if silent and state is RunState.NOT_TAKEN:
            raise SandboxLostError(f"sandbox {sandbox.id} did not take its request")
        if silent and killed_outside is not None and killed_outside():
            # Killed as the request arrived, before anything of the code's came
            # back; a sandbox has no network, so the pool's next one may run the
            # request again without anyone seeing it twice.
            raise SandboxLostError(f"sandbox {sandbox.id} was killed from outside")
        exit_code = await exit_status(sandbox)
    oom_killed = await oom_verdict(sandbox, wait=state.runner_gone or exit_code == 137)
    if oom_killed:
        report_oom(sandbox)
    if request.session and state is RunState.EXITED and not timed_out:
        # Between a session's runs, as before its first: a death is reported.
        protocol.run = None
        if protocol.child_gone and protocol.on_idle_death is not None:
            protocol.on_idle_death()
    return RunResult.from_capture(
        run.capture,
        exit_code=None if timed_out or state.over_cap else exit_code,
        timed_out=timed_out,
        oom_killed=oom_killed,
        execution_s=execution_s,
        outcome=run.outcome,
    )


def report_died_waiting(
    sandbox: S, pool: str, report_died: Callable[[S], None]
) -> None:
    """The runner, or its child, ended while the sandbox waited for a request
    (idle in its pool, or leased between a session's runs): the pool is told."""
    if sandbox.waiting:  # once, before report_died moves it on
        log.warning("sandbox_died_idle", pool=pool, sandbox=sandbox.id,
                    stderr=sandbox.read_stderr())
    report_died(sandbox)


async def exit_status(sandbox: DirectSandbox) -> int | None:
    """The runner died without its exit frame: its own status (128 + N for signal N)."""
    try:
        async with asyncio.timeout(EXIT_TIMEOUT_S):
            returncode = await asyncio.shield(sandbox.protocol.exited)
    except TimeoutError:
        return None
    return returncode if returncode >= 0 else 128 - returncode


async def oom_verdict(sandbox: DirectSandbox, *, wait: bool) -> bool:
    """Whether the kernel OOM-killed in the sandbox's cgroup; never the code's claim."""
    cgroup = sandbox.cgroup
    if cgroup is None:
        return False
    deadline = time.monotonic() + (OOM_COUNTER_GRACE_S if wait else 0.0)
    while True:
        # One pread of a kernfs counter: it never waits on a device.
        if cgroup.oom_kills() > 0:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.005)
