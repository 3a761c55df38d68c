"""What a run leaves in the daemon's memory once it is answered: nothing.

Every backend, driven directly. A run's request (its files), capture (up to
``max_output_bytes`` per stream), outcome (the files it returned) and its
sandbox are freed by reference counting as the sandbox is destroyed. A
reference cycle among them would keep each run's data until the cyclic
collector's next pass over them: with output at the cap, a megabyte per run in
the daemon's heap. It did, in the process and fork tiers: the daemon's RSS
climbed by ~1 MiB per flooding run and fell back every ten or so.
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
from pool.wire import Outcome, OutputCapture

BACKENDS: dict[str, type[BackendBase[Any]]] = {
    "process": ProcessBackend, "fork": ForkBackend, "wasm": WasmBackend, "docker": DockerBackend,
}
OUTPUT_CAP = 256 * 1024
# What a run and its sandbox are made of that holds data: request, output, outcome.
RUNS_OWN = (RunRequest, OutputCapture, Outcome, Sandbox)
UPLOAD = ("in.bin", b"u" * 512 * 1024)
OUTPUT = 200 * 1024  # under the cap: a run that ends by itself returns its out/ files
CODE = f"""
import os
os.makedirs("out", exist_ok=True)
with open("out/copy.bin", "wb") as f:
    f.write(open("in.bin", "rb").read()[:100_000])
print("x" * {OUTPUT}, end="")
"""


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


async def one_run(backend: BackendBase[Any]) -> None:
    """One sandbox, one run with a file each way and output near the cap, destroyed."""
    sandbox = await backend.start_sandbox()
    try:
        result = await backend.run(
            sandbox, RunRequest(code=CODE, stdin="", timeout_s=10, files=(UPLOAD,))
        )
    finally:
        await backend.destroy_sandbox(sandbox)
    assert (result.exit_code, len(result.stdout)) == (0, OUTPUT)
    assert result.outcome is not None
    assert [(f.path, f.size) for f in result.outcome.files] == [("out/copy.bin", 100_000)]


async def test_a_destroyed_sandbox_and_its_runs_output_are_freed_without_the_collector(
    backend: BackendBase[Any],
) -> None:
    await one_run(backend)  # what a backend makes once (a template, caches) is not the run's
    gc.collect()
    before = {id(o) for o in gc.get_objects() if isinstance(o, RUNS_OWN)}
    gc.disable()
    try:
        await one_run(backend)
        left = [o for o in gc.get_objects() if isinstance(o, RUNS_OWN) and id(o) not in before]
    finally:
        gc.enable()
    assert left == []
