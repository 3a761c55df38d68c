"""An in-memory backend for pool-logic tests: no processes, fully controllable.

Code is interpreted by a tiny command language so tests can ask for behaviour:
``sleep <seconds>``, ``exit <n>``, ``hang`` (until the timeout), anything else
is echoed to stdout.
"""

from __future__ import annotations

import asyncio
import time

from pool.backends.base import EventListener, RunRequest, RunResult, Sandbox, new_sandbox_id
from pool.backends.runtime import Runtime
from pool.config import PoolConfig
from pool.errors import BackendError, SandboxLostError
from pool.wire import OutputCapture


class FakeBackend:
    name = "fake"

    def __init__(self, config: PoolConfig, instance_id: str) -> None:
        self.config = config
        self.instance_id = instance_id
        self.listener: EventListener | None = None
        self.start_delay_s = 0.0
        self.failing_starts = 0  # the next N starts raise BackendError
        self.down = False  # every start fails and ping() is False
        self.begun = 0  # calls of start_sandbox, finished or not
        self.started: list[str] = []
        self.destroyed: list[str] = []
        self.live: dict[str, Sandbox] = {}
        self.waiting_told: list[bool] = []  # what requests_waiting was told, in turn

    async def start(self) -> None:
        if self.down:
            raise BackendError("fake backend is down")

    async def close(self) -> None:
        return None

    def requests_waiting(self, waiting: bool) -> None:
        self.waiting_told.append(waiting)

    async def start_sandbox(self) -> Sandbox:
        self.begun += 1
        await asyncio.sleep(self.start_delay_s)
        if self.down or self.failing_starts > 0:
            self.failing_starts = max(0, self.failing_starts - 1)
            raise BackendError("fake start failure")
        sandbox = Sandbox(new_sandbox_id())
        self.started.append(sandbox.id)
        self.live[sandbox.id] = sandbox
        return sandbox

    async def run(self, sandbox: Sandbox, request: RunRequest) -> RunResult:
        if not sandbox.alive or sandbox.id not in self.live:
            raise SandboxLostError(f"sandbox {sandbox.id} is gone")
        began = time.monotonic()
        capture = OutputCapture(self.config.max_output_bytes, request.output_listener)
        command, _, argument = request.code.partition(" ")
        exit_code: int | None = 0
        timed_out = False
        try:
            async with asyncio.timeout(request.timeout_s):
                if command == "sleep":
                    await asyncio.sleep(float(argument))
                elif command == "hang":
                    await asyncio.Event().wait()
                elif command == "exit":
                    exit_code = int(argument)
                else:
                    capture.add(b"O", request.code.encode())
        except TimeoutError:
            exit_code, timed_out = None, True
        return RunResult.from_capture(
            capture,
            exit_code=exit_code,
            timed_out=timed_out,
            oom_killed=False,
            execution_s=time.monotonic() - began,
        )

    async def destroy_sandbox(self, sandbox: Sandbox) -> None:
        if self.live.pop(sandbox.id, None) is not None:
            self.destroyed.append(sandbox.id)

    async def ping(self) -> bool:
        return not self.down

    def version(self) -> str:
        return "fake"

    def runtime(self) -> Runtime:
        return Runtime(version="fake")

    def kill_idle(self, sandbox: Sandbox) -> None:
        """Simulate a sandbox dying while parked (the Docker backend learns this from events)."""
        if sandbox.mark_dead() and self.listener is not None:
            self.listener(sandbox, "died")
