"""What a run leaves in the daemon's memory once it is answered: nothing.

Every backend, driven directly. A run's capture (up to ``max_output_bytes`` per
stream) and its sandbox are freed by reference counting as the sandbox is
destroyed. A reference cycle among them would keep each run's output until the
cyclic collector's next pass over them: with output at the cap, a megabyte per
run in the daemon's heap. It did, in the process and fork tiers: the daemon's
RSS climbed by ~1 MiB per flooding run and fell back every ten or so.
"""

from __future__ import annotations

import gc
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pool.backends.base import BackendBase, RunRequest, Sandbox
from pool.backends.docker.backend import DockerBackend
from pool.backends.fork.backend import ForkBackend
from pool.backends.process import ProcessBackend
from pool.backends.wasm.backend import WasmBackend
from pool.config import PoolConfig
from pool.wire import OutputCapture

BACKENDS: dict[str, type[BackendBase[Any]]] = {
    "process": ProcessBackend, "fork": ForkBackend, "wasm": WasmBackend, "docker": DockerBackend,
}
OUTPUT_CAP = 256 * 1024
FLOOD = "while True: print('x' * 10**5)"


@pytest.fixture(params=[
    "process", "fork", "wasm", pytest.param("docker", marks=pytest.mark.docker),
])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[BackendBase[Any]]:
    kind = str(request.param)
    config = PoolConfig(name=f"t{uuid.uuid4().hex[:8]}", backend=kind, min_idle=0, max_size=1,
                        max_output_bytes=OUTPUT_CAP)
    started = BACKENDS[kind](config, f"test-{uuid.uuid4().hex[:8]}")
    await started.start()
    try:
        yield started
    finally:
        await started.close()


async def flood(backend: BackendBase[Any]) -> None:
    """One sandbox, one run that writes past the cap, destroyed; nothing of it kept here."""
    sandbox = await backend.start_sandbox()
    try:
        result = await backend.run(sandbox, RunRequest(code=FLOOD, stdin="", timeout_s=10))
    finally:
        await backend.destroy_sandbox(sandbox)
    assert result.stdout_truncated
    assert len(result.stdout) == OUTPUT_CAP
    assert not result.timed_out


async def test_a_destroyed_sandbox_and_its_runs_output_are_freed_without_the_collector(
    backend: BackendBase[Any],
) -> None:
    await flood(backend)  # what a backend makes once (a template, caches) is not the run's
    gc.collect()
    before = {id(o) for o in gc.get_objects() if isinstance(o, (OutputCapture, Sandbox))}
    gc.disable()
    try:
        await flood(backend)
        left = [o for o in gc.get_objects()
                if isinstance(o, (OutputCapture, Sandbox)) and id(o) not in before]
    finally:
        gc.enable()
    assert left == []
